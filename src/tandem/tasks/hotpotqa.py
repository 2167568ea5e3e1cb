"""HotPotQA: two-hop retrieval QA; each hop writes a search query, BM25 fetches 3 passages a hop.

The data is a pooled-distractor setting (see ../shared/data/README.md): 741 dev questions and the
7,215 paragraphs of their distractor sets. Splits, with a fixed seed: 200 train, 200 val, 341 test.
"""

from __future__ import annotations

import random
from typing import Sequence

from ..program import MODULE_LABELS, ChainOfThought, Example, Prediction, Program, Run, TraceEntry
from ..retrieve import BM25Retriever
from .base import SPLIT_SEED, Task, find_data_file, read_jsonl
from .metrics import normalize_answer, token_f1

TRAIN_SIZE, VAL_SIZE = 200, 200
QUERY_INSTRUCTIONS = "Write a short search query that finds the missing information needed to answer the question."
ANSWER_INSTRUCTIONS = "Answer the question from the context with a short factoid answer: a few words, often a name, a date or yes/no."


class MultiHopQA(Program):
    def __init__(self, retriever: BM25Retriever, hops: int = 2, passages_per_hop: int = 3):
        self.retriever = retriever
        self.passages_per_hop = passages_per_hop
        self.generate_query = [
            ChainOfThought("context, question -> search_query", QUERY_INSTRUCTIONS, max_new_tokens=256) for _ in range(hops)
        ]
        self.generate_answer = ChainOfThought("context, question -> answer", ANSWER_INSTRUCTIONS)

    def forward(self, run: Run, question: str) -> Prediction:
        context: list[str] = []
        for hop in self.generate_query:
            query = hop(run, context=context, question=question).search_query
            context = list(dict.fromkeys(context + self.retriever(query, self.passages_per_hop)))
        answer = self.generate_answer(run, context=context, question=question)
        return Prediction(answer, context=context)


def metric(example: Example, prediction: Prediction) -> float:
    return float(normalize_answer(prediction.answer) == normalize_answer(example.answer))


def f1(example: Example, prediction: Prediction) -> float:
    """Token F1, reported beside exact match for a finer view of a weak model."""
    return token_f1(prediction.answer, example.answer)


def title_of(passage: str) -> str:
    """The title of a passage as the corpus renders it: "Title | text"."""
    return passage.split(" | ", 1)[0]


def gold_module_labels(question: str, answer: str, gold: Sequence[str], retriever: BM25Retriever) -> dict[str, dict]:
    """Labels for every module from the two gold paragraphs, so Π has labeled demos to start from.

    The paragraph that the question itself retrieves better is hop 1 (its title is the query); the
    other, usually the bridge entity, is hop 2's query, read from hop 1's paragraph. The answer
    module sees both. Only final answers are labeled in the paper's setup; HotPotQA also labels
    its supporting paragraphs, and these labels use them for demos only, never for scoring.
    """
    ranked = retriever(question, k=20)
    first, second = sorted(gold, key=lambda p: ranked.index(p) if p in ranked else len(ranked))
    return {
        "generate_query[0]": {"context": [], "question": question, "search_query": title_of(first)},
        "generate_query[1]": {"context": [first], "question": question, "search_query": title_of(second)},
        "generate_answer": {"context": [first, second], "question": question, "answer": answer},
    }


def gold_found(example: Example, prediction: Prediction) -> float | None:
    """Share of the gold paragraphs that retrieval put in the answer module's context (None without gold titles)."""
    if not example.gold_titles:
        return None
    titles = {title_of(passage) for passage in prediction.get("context", [])}
    return sum(t in titles for t in example.gold_titles) / len(example.gold_titles)


def feedback(example: Example, prediction: Prediction | None, trace: Sequence[TraceEntry]) -> str:
    """For the reflection LM (g steps): the gold answer beside the one given, and for each hop its
    query and whether it retrieved a gold passage (a hop's passages are what the next module's
    context gained), so the query modules hear about their own part of the run."""
    given = f"the answer given was {prediction.answer!r}" if prediction is not None else "no answer was given"
    lines = [f"The correct answer is {example.answer!r}; {given}."]
    gold = set(example.get("gold_titles") or [])
    for n, (i, entry) in enumerate([(i, e) for i, e in enumerate(trace) if e.module.startswith("generate_query")], 1):
        query = (entry.outputs or {}).get("search_query")
        after = trace[i + 1].inputs.get("context") if i + 1 < len(trace) else \
            (prediction.get("context") if prediction is not None else None)
        if query is None or after is None:
            lines.append(f"Hop {n} wrote no usable search query." if query is None else
                         f"Hop {n} searched {query!r}; the run stopped before its passages were used.")
            continue
        found = sorted({title_of(p) for p in after if p not in entry.inputs.get("context", [])} & gold)
        lines.append(f"Hop {n} searched {query!r} and " + (f"retrieved gold passage(s): {', '.join(found)}." if found
                                                            else "retrieved no gold passage."))
    if gold:
        lines.append(f"The gold passages are titled: {', '.join(sorted(gold))}.")
    return " ".join(lines)


def load(data_dir: str | None = None) -> Task:
    corpus = list(read_jsonl(find_data_file("hotpotqa/corpus.jsonl", data_dir)))
    passages = {d["title"]: f"{d['title']} | {d['text']}" for d in corpus}
    retriever = BM25Retriever(list(passages.values()))
    rows = []
    for r in read_jsonl(find_data_file("hotpotqa/questions.jsonl", data_dir)):
        gold = [passages[t] for t in r.get("gold_titles") or [] if t in passages]
        labels = {MODULE_LABELS: gold_module_labels(r["question"], r["answer"], gold, retriever)} if len(gold) == 2 else {}
        rows.append(Example(question=r["question"], answer=r["answer"], gold_titles=r.get("gold_titles") or [], **labels,
                            inputs=("question",)))
    random.Random(SPLIT_SEED).shuffle(rows)
    train, val, test = rows[:TRAIN_SIZE], rows[TRAIN_SIZE : TRAIN_SIZE + VAL_SIZE], rows[TRAIN_SIZE + VAL_SIZE :]
    return Task("hotpotqa", train, val, test, lambda: MultiHopQA(retriever), metric,
                {"answer F1": f1, "gold paragraphs retrieved": gold_found}, feedback=feedback)
