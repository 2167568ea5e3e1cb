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
from .grammar import VALUE_TOKENS, ReplyFormat, choice_variants

LATER_TEXT_TOKENS = 24  # room kept for a free-text field that comes after another one (a short answer)


def token_pieces(tokenizer, vocab_size: int | None = None) -> list[bytes]:
    """Each token's bytes as it adds them to a reply (SentencePiece's leading "▁" as the space it is,
    byte-fallback tokens as their byte), from xgrammar: the view its matchers take of the vocabulary."""
    import xgrammar

    return list(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).decoded_vocab)


def _whole_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class Budget:
    """What a reply format costs in one tokenizer's tokens: the tokens of each field break
    ("\\n<Label>:"), and for each field the tokens the fields after it need at most (`reserve`).
    Every engine that bounds free text uses it: the local engine forces a break mid-decode, vLLM
    stops a free field early and continues after the break."""

    def __init__(self, tokenizer, jump_forward: bool = True, pieces: Sequence[bytes] | None = None):
        """`jump_forward`: the engine writes text the format fixes in its usual tokens (the local
        engine); without it a model may spell a choice one letter a token, and it is priced so.
        `pieces`: each token's bytes in a reply (`token_pieces`), computed here if not given."""
        self.tokenizer = tokenizer
        self.jump_forward = jump_forward
        self.pieces = list(pieces) if pieces is not None else token_pieces(tokenizer)
        self._tokenized: dict[str, tuple[int, ...]] = {}
        self._plans: dict[ReplyFormat, tuple[list[int], list[tuple[int, ...]]]] = {}
        self._by_piece: dict[bytes, int] | None = None
        # A vocabulary with pieces that are part of a character (byte fallback, byte-level BPE) may spend
        # up to 4 tokens on one character, and a field can only end between characters.
        self.char_slack = 3 if any(not _whole_utf8(p) for p in self.pieces) else 0

    def spell(self, ids: Sequence[int]) -> bytes:
        """The bytes `ids` add to a reply, as the grammar matcher sees them."""
        return b"".join(self.pieces[i] for i in ids)

    def tokens(self, text: str) -> tuple[int, ...]:
        """`text` as tokens that add exactly its bytes where a reply continues (so the grammar accepts
        them), in the tokenizer's usual tokens where it has them; () if the vocabulary cannot spell it.

        The check is on the pieces the matcher sees, not on `decode`: a SentencePiece tokenizer puts
        "▁" (a space) before text and its decoder drops that space again, so `decode(ids) == text`
        holds for ids that would write " Species:" into the reply. After an anchor ("\\n") such a
        tokenizer adds no space, so the text's tokens are read off the anchored encoding."""
        if text not in self._tokenized:
            want = text.encode()
            found: tuple[int, ...] = ()
            for anchor in ("", "\n", "a"):
                prefix = self._encode(anchor) if anchor else []
                ids = self._encode(anchor + text)
                if ids[: len(prefix)] == prefix and self.spell(ids[len(prefix):]) == want:
                    found = tuple(ids[len(prefix):])
                    break
            self._tokenized[text] = found or self._greedy(want)
        return self._tokenized[text]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _greedy(self, want: bytes) -> tuple[int, ...]:
        """Longest pieces first: a spelling the matcher accepts where the tokenizer gives none."""
        if self._by_piece is None:
            special = set(getattr(self.tokenizer, "all_special_ids", ()))
            self._by_piece = {}
            for i, piece in enumerate(self.pieces):
                if piece and i not in special:
                    self._by_piece.setdefault(piece, i)
        longest = max(map(len, self._by_piece), default=0)
        ids, at = [], 0
        while at < len(want):
            size = next((n for n in range(min(longest, len(want) - at), 0, -1) if want[at : at + n] in self._by_piece), 0)
            if not size:
                return ()
            ids.append(self._by_piece[want[at : at + size]])
            at += size
        return tuple(ids)

    def plan(self, fmt: ReplyFormat) -> tuple[list[int], list[tuple[int, ...]]]:
        """(reserve, breaks): reserve[i] tokens are needed after field i; breaks[i] starts field i + 1."""
        if fmt not in self._plans:
            breaks = [self.tokens(f"\n{f.label}:") for f in fmt.fields[1:]] + [()]
            costs = [len(breaks[i - 1]) + self._value_cost(f) if i else 0 for i, f in enumerate(fmt.fields)]
            self._plans[fmt] = ([sum(costs[i + 1:]) for i in range(len(fmt.fields))], breaks)
        return self._plans[fmt]

    def smallest(self, fmt: ReplyFormat) -> int:
        """The fewest tokens in which the format's worst case fits: the first label, the least the first
        field takes (a required free text: a space and one piece), and what the fields after it need."""
        first = fmt.fields[0]
        least = (0 if first.optional else 2 + self.char_slack) if first.type == "text" else self._value_cost(first)
        return len(self.tokens(f"{first.label}:")) + least + self.plan(fmt)[0][0]

    def _value_cost(self, f) -> int:
        if f.type == "choice":  # a space, then at worst one letter a token until one choice is left
            variants = choice_variants(f)
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

    The first label is written for the model, as the local engine writes fixed text (a model free to
    spell it may take a token a letter). Then each phase writes one field's value and the next field's
    label (`grammar()`), within the tokens the later fields leave it (`max_tokens()`), counted without
    the end-of-sequence token that closes a phase. A free field gets what is not reserved for the
    fields after it, break included; cut at that share, it has any half-written label dropped and the
    break appended. A typed field gets its priced cost and the break, which it writes itself; cut while
    writing the break, it gets the break appended the same way. So the reply stays within
    `max_new_tokens` and every later field keeps the share it was priced. The engine calls
    `next_phase()` before each request and `take()` after it.
    """

    def __init__(self, request, budget: Budget):
        self.request, self.budget = request, budget
        fmt = request.format
        self.text = f"{fmt.fields[0].label}:" if fmt is not None else ""  # the reply so far
        self.used = len(budget.tokens(self.text)) if self.text else 0  # reply tokens so far, labels included
        self.field = 0  # the field the next phase starts at
        self.finish = "stop"
        self.done = False

    def grammar(self) -> str | None:
        return None if self.request.format is None else self.request.format.grammar(phase=self.field)

    def _last(self) -> bool:
        fmt = self.request.format
        return fmt is None or self.field >= len(fmt.fields) - 1

    def max_tokens(self) -> int:
        """The most tokens the next phase may write."""
        room = self.request.max_new_tokens - self.used
        if self._last():
            return room
        reserve, breaks = self.budget.plan(self.request.format)
        room -= reserve[self.field]  # the later fields' breaks and values ...
        if self.request.format.fields[self.field].type != "text":
            room += len(breaks[self.field])  # ... less the break a typed phase writes itself
        return room

    def next_phase(self) -> bool:
        """Whether a phase is to be generated now; a free field left no room is ended at once (empty)."""
        while not self.done and self.max_tokens() < 1:
            if self._last() or self.request.format.fields[self.field].type != "text":
                self.finish, self.done = "length", True
            else:
                self.take("", 0, "length")
        return not self.done

    def take(self, text: str, tokens: int, finish: str) -> None:
        """One phase's output: its text (special tokens left out), the reply tokens it generated (the
        end-of-sequence token not counted) and its finish reason."""
        self.used += tokens
        self.finish = "length" if finish == "length" else "stop"
        if self._last():
            self.text += text
            self.done = True
            if self.finish == "length" and self._whole_choice(text):
                self.finish = "stop"  # cut where the end-of-sequence token would have come: nothing is missing
            return
        fmt = self.request.format
        label = f"\n{fmt.fields[self.field + 1].label}:"
        if text.endswith(label):
            self.text += text
            self.field += 1
            self.finish = "stop"
            return
        free = fmt.fields[self.field].type == "text"
        cut = next((k for k in range(len(label) - 1, 0, -1) if text.endswith(label[:k])), 0)
        brk = len(self.budget.plan(fmt)[1][self.field])
        if finish != "length" or not brk or not (free or cut):
            self.text += text  # stopped, or cut inside a typed value: the parser will say what is missing
            self.done = True
            return
        if cut:  # a half-written label: its tokens leave the reply with it
            self.used -= min(tokens, len(self.budget.tokens(text[len(text) - cut:])))
        if self.used + brk > self.request.max_new_tokens:
            self.text += text
            self.done = True
            return
        self.text += text[: len(text) - cut] + label
        self.used += brk
        self.field += 1
        self.finish = "stop"

    def _whole_choice(self, text: str) -> bool:
        """Whether `text` completes the last field's choice, so that nothing more could follow."""
        fmt = self.request.format
        f = fmt.fields[self.field] if fmt is not None else None
        if f is None or f.type != "choice":
            return False
        variants = choice_variants(f)
        value = text.strip()
        return value in variants and not any(v != value and v.startswith(value) for v in variants)


class RowConstraint:
    """One reply being decoded under a format: its matcher, the field it is in, tokens to force."""

    def __init__(self, matcher, fmt: ReplyFormat, limit: int, reserve: Sequence[int], breaks: Sequence[list[int]],
                 constraints: "Constraints"):
        self.matcher, self.fmt, self.limit = matcher, fmt, limit
        self.reserve, self.breaks, self.constraints = reserve, breaks, constraints
        self.field = 0  # index of the field being written
        self.tail = b""  # the end of what the row wrote, to see the next field's label arrive
        self.forced: list[int] = []

    def plan(self, written: int, allowed: torch.Tensor) -> None:
        """Before a step: queue "\\n<Next label>:" if the free field being written must end now, or
        the only text the format allows next."""
        if self.forced:
            return
        f = self.field
        slack = self.constraints.budget.char_slack  # a break cannot come inside a character
        if (f < len(self.fmt.fields) - 1 and self.fmt.fields[f].type == "text" and self.breaks[f]
                and self.limit - written <= self.reserve[f] + slack):
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
        pieces = self.constraints.budget.pieces
        piece = pieces[token] if token < len(pieces) else b""
        self.tail = (self.tail + piece)[-(256 + len(piece)):]
        if self.field + 1 >= len(self.fmt.fields):
            return
        # The format lets "\n<Label>:" appear only where that field begins (lm/grammar.py). A token may
        # carry the label's end and more (":x" is one token in Llama-3's vocabulary): the label counts
        # when it ends anywhere inside the new piece, not only at its end.
        label = f"\n{self.fmt.fields[self.field + 1].label}:".encode()
        if label in self.tail[-(len(label) + len(piece) - 1):]:
            self.field += 1
            self.tail = self.tail[self.tail.rindex(label) + len(label):]


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
        self.budget = Budget(tokenizer, pieces=info.decoded_vocab)

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
