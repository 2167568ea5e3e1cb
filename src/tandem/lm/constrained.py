"""Constrained decoding for the local engine: every reply has every field, in order, typed.

A request's `ReplyFormat` compiles (once per format) to an xgrammar grammar; each row of a batch
gets its own matcher, which masks the logits to the tokens the format allows next. xgrammar was
chosen by measurement (bench/grammar_engines.py, SmolLM2's 49k vocabulary): 0.2 ms per token against
95 ms for lm-format-enforcer (which also needs a shim to import under transformers 5), and it is
what vLLM's structured outputs use, so both engines enforce the same grammar (lm/grammar.py).

A grammar alone cannot keep free text (the reasoning) from spending the whole token budget. So the
decode loop asks `plan()` at every step: once a row's free field has used up all but the tokens the
fields after it need (`reserve`), the row is made to write "\\n<Next label>:" and goes on with the
next field. Where the format leaves only one way on (a label, the rest of a choice once its first
letters are written), that text is written in its usual tokens instead of being sampled piece by
piece. So the answer field is always reached within the limit, however the model would tokenize.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import EngineError
from .base import VALUE_TOKENS, ReplyFormat

LATER_TEXT_TOKENS = 24  # room kept for a free-text field that comes after another one (a short answer)


class Budget:
    """What a reply format costs in one tokenizer's tokens: the tokens of each field break
    ("\\n<Label>:"), and for each field the tokens the fields after it need at most (`reserve`).
    Every engine that bounds free text uses it: the local engine forces a break mid-decode, vLLM
    stops a free field early and continues after the break."""

    def __init__(self, tokenizer, jump_forward: bool = True):
        """`jump_forward`: the engine writes text the format fixes in its usual tokens (the local
        engine); without it a model may spell a choice one letter a token, and it is priced so."""
        self.tokenizer = tokenizer
        self.jump_forward = jump_forward
        self._tokenized: dict[str, tuple[int, ...]] = {}
        self._plans: dict[ReplyFormat, tuple[list[int], list[tuple[int, ...]]]] = {}

    def tokens(self, text: str) -> tuple[int, ...]:
        """`text` in the tokenizer's usual tokens, exactly (no added prefix space); () if it has none."""
        if text not in self._tokenized:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.tokenizer.decode(ids) != text:  # SentencePiece adds a leading space: cut a known prefix off
                anchor = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
                ids = self.tokenizer("\n" + text, add_special_tokens=False)["input_ids"][len(anchor):]
            self._tokenized[text] = tuple(ids) if self.tokenizer.decode(ids) == text else ()
        return self._tokenized[text]

    def plan(self, fmt: ReplyFormat) -> tuple[list[int], list[tuple[int, ...]]]:
        """(reserve, breaks): reserve[i] tokens are needed after field i; breaks[i] starts field i + 1."""
        if fmt not in self._plans:
            breaks = [self.tokens(f"\n{f.label}:") for f in fmt.fields[1:]] + [()]
            costs = [len(breaks[i - 1]) + self._value_cost(f) if i else 0 for i, f in enumerate(fmt.fields)]
            self._plans[fmt] = ([sum(costs[i + 1:]) for i in range(len(fmt.fields))], breaks)
        return self._plans[fmt]

    def _value_cost(self, f) -> int:
        if f.type == "choice":  # a space, then at worst one letter a token until one choice is left
            variants = [v for c in f.choices for v in dict.fromkeys((c, c[:1].upper() + c[1:]))]
            if not self.jump_forward:
                return 1 + max(len(v) for v in variants)

            def unique_after(v: str) -> int:
                return next((k for k in range(1, len(v) + 1)
                             if not any(o != v and o.startswith(v[:k]) for o in variants)), len(v))

            return 1 + max(k + len(self.tokens(v[k:]) or v[k:]) for v in variants for k in range(1, unique_after(v) + 1))
        return VALUE_TOKENS.get(f.type, LATER_TEXT_TOKENS)


class PhasedReply:
    """A constrained reply written a field at a time, for engines that cannot end a free field in the
    middle of a request (vLLM in process, an OpenAI-compatible server).

    Each phase writes one field's value and the next field's label (`grammar()`), within the tokens
    the later fields leave it (`max_tokens()`). A free field cut at its share has any half-written
    label dropped and the break written for it; the next phase continues from `text`.
    """

    def __init__(self, request, budget: Budget):
        self.request, self.budget = request, budget
        self.text = ""  # the reply so far
        self.used = 0  # tokens spent so far, breaks included
        self.field = 0  # the field the next phase starts at
        self.finish = "stop"
        self.done = False

    def grammar(self) -> str | None:
        return None if self.request.format is None else self.request.format.grammar(phase=self.field)

    def max_tokens(self) -> int:
        room = self.request.max_new_tokens - self.used
        fmt = self.request.format
        if fmt is not None and self.field < len(fmt.fields) - 1:
            reserve, breaks = self.budget.plan(fmt)
            room -= reserve[self.field] - len(breaks[self.field])  # this phase writes the next label itself
        return max(room, 1)

    def take(self, text: str, tokens: int, finish: str) -> None:
        """One phase's output: its text (special tokens left out), tokens generated, finish reason."""
        self.used += tokens
        self.finish = "length" if finish == "length" else "stop"
        fmt = self.request.format
        if fmt is None or self.field >= len(fmt.fields) - 1:
            self.text += text
            self.done = True
            return
        label = f"\n{fmt.fields[self.field + 1].label}:"
        if text.endswith(label):
            self.text += text
            self.field += 1
            return
        breaks = self.budget.plan(fmt)[1]
        if finish != "length" or fmt.fields[self.field].type != "text" or not breaks[self.field]:
            self.text += text  # cut inside a typed value: the parser will say what is missing
            self.done = True
            return
        cut = next((k for k in range(len(label) - 1, 0, -1) if text.endswith(label[:k])), 0)
        self.text += text[: len(text) - cut]
        if self.used + len(breaks[self.field]) > self.request.max_new_tokens:
            self.done = True
            return
        self.text += label
        self.used += len(breaks[self.field])
        self.field += 1
        self.finish = "stop"


class RowConstraint:
    """One reply being decoded under a format: its matcher, the field it is in, tokens to force."""

    def __init__(self, matcher, fmt: ReplyFormat, limit: int, reserve: Sequence[int], breaks: Sequence[list[int]],
                 constraints: "Constraints"):
        self.matcher, self.fmt, self.limit = matcher, fmt, limit
        self.reserve, self.breaks, self.constraints = reserve, breaks, constraints
        self.field = 0  # index of the field being written
        self.tail = ""  # the end of what the row wrote, to see the next field's label arrive
        self.forced: list[int] = []

    def plan(self, written: int, allowed: torch.Tensor) -> None:
        """Before a step: queue "\\n<Next label>:" if the free field being written must end now, or
        the only text the format allows next."""
        if self.forced:
            return
        f = self.field
        if (f < len(self.fmt.fields) - 1 and self.fmt.fields[f].type == "text" and self.breaks[f]
                and self.limit - written <= self.reserve[f]):
            first = self.breaks[f][0]
            if (allowed[first // 32] >> (first % 32)) & 1:  # not allowed: the field is still empty and must not be
                self.forced = list(self.breaks[f])
                return
        jump = self.matcher.find_jump_forward_string()
        if jump:
            self.forced = list(self.constraints.tokens(jump))

    def next_forced(self) -> int | None:
        return self.forced.pop(0) if self.forced else None

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise EngineError(f"constrained decoding: token {token} rejected by the reply format (a tandem bug)")
        if token < len(self.constraints.pieces):
            self.tail = (self.tail + self.constraints.pieces[token])[-64:]
        # The format lets "\n<Label>:" appear only where that field begins (lm/grammar.py).
        if self.field + 1 < len(self.fmt.fields) and self.tail.endswith(f"\n{self.fmt.fields[self.field + 1].label}:"):
            self.field += 1


class Constraints:
    """Builds row constraints for one tokenizer; grammars are compiled once and kept."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        try:
            import xgrammar
        except ImportError as exc:  # a dependency of tandem: only a broken install gets here
            raise EngineError("constrained decoding needs the xgrammar package: pip install xgrammar") from exc
        self.xgr = xgrammar
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(dict.fromkeys(stop_token_ids)))
        self.compiler = xgrammar.GrammarCompiler(info)
        self._compiled: dict[ReplyFormat, tuple] = {}
        self.budget = Budget(tokenizer)
        self.pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])  # each token's text

    def tokens(self, text: str) -> tuple[int, ...]:
        return self.budget.tokens(text)

    def _prepare(self, fmt: ReplyFormat) -> tuple:
        if fmt not in self._compiled:
            reserve, breaks = self.budget.plan(fmt)
            self._compiled[fmt] = (self.compiler.compile_grammar(fmt.grammar()), reserve, breaks)
        return self._compiled[fmt]

    def row(self, fmt: ReplyFormat, limit: int) -> RowConstraint:
        compiled, reserve, breaks = self._prepare(fmt)
        return RowConstraint(self.xgr.GrammarMatcher(compiled), fmt, limit, reserve, breaks, self)

    def apply(self, logits: torch.Tensor, rows: Sequence[RowConstraint | None], written: Sequence[int]) -> torch.Tensor:
        """Mask `logits` (one row per active reply) to what each format allows; plan forced breaks."""
        logits = logits.float()
        bitmask = self.xgr.allocate_token_bitmask(len(rows), self.vocab_size)  # all allowed
        for j, (row, n) in enumerate(zip(rows, written)):
            if row is not None:
                row.matcher.fill_next_token_bitmask(bitmask, j)
                row.plan(n, bitmask[j])
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
        return logits
