"""Answer comparisons the tasks share: normalized exact match, containment, token F1, numbers.

Each takes the model's text and the gold text and returns a score in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections import Counter

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The usual SQuAD/HotPotQA normalization: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact(got: str, gold: str) -> float:
    return float(normalize_answer(got) == normalize_answer(gold))


def contains(got: str, gold: str) -> float:
    """The gold answer appears in the reply, as whole words (normalized)."""
    return float(f" {normalize_answer(gold)} " in f" {normalize_answer(got)} ")


def token_f1(got: str, gold: str) -> float:
    got_tokens, gold_tokens = normalize_answer(got).split(), normalize_answer(gold).split()
    common = sum((Counter(got_tokens) & Counter(gold_tokens)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def parse_number(text: str) -> float | None:
    """The last number in the text, ignoring thousands separators and currency signs."""
    numbers = _NUMBER.findall(str(text).replace(",", "").replace("$", ""))
    return float(numbers[-1]) if numbers else None


def same_number(got: str, gold: str) -> float:
    a, b = parse_number(got), parse_number(gold)
    return float(a is not None and b is not None and abs(a - b) < 1e-6)


COMPARISONS = {"exact": exact, "contains": contains, "f1": token_f1, "number": same_number}
