"""Why xgrammar: the cost of masking one token, xgrammar against lm-format-enforcer, on one reply.

Both libraries constrain the same Iris reply ("Reasoning: <text>\\nSpecies: <choice>") over the
embedded SmolLM2's 49k-token vocabulary; the bench feeds the reply's tokens one by one and times
computing the set of allowed next tokens at each step (the work a decode step adds). Outlines was
not measured: it compiles a regex to an index over the whole vocabulary ahead of time, and tandem's
formats change with every signature.

    pip install lm-format-enforcer   # optional: without it only xgrammar is measured
    python bench/grammar_engines.py
"""

from __future__ import annotations

import time

REPLY = "Reasoning: The petals are long and wide, so this is the largest of the three kinds.\nSpecies: virginica"
REGEX = r"Reasoning: [^\n]*\nSpecies: (setosa|versicolor|virginica|Setosa|Versicolor|Virginica)"


def main() -> None:
    from transformers import AutoTokenizer

    from tandem.lm.constrained import Constraints
    from tandem.lm.models import resolve_model
    from tandem.program import ChainOfThought
    from tandem.prompts import reply_format
    from tandem.tasks.iris import FEATURES, SPECIES

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ids = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    print(f"{len(tokenizer)} tokens in the vocabulary, {len(ids)} in the reply")

    import torch

    started = time.perf_counter()
    builder = Constraints(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    fmt = reply_format(ChainOfThought(f"{', '.join(FEATURES)} -> species: {'|'.join(SPECIES)}").signature)
    row = builder.row(fmt, 10_000)
    setup = time.perf_counter() - started
    logits = torch.zeros(1, len(tokenizer))
    started = time.perf_counter()
    for t in ids:
        builder.apply(logits, [row], [0])
        row.forced.clear()
        row.accept(t)
    rates = {"xgrammar": ((time.perf_counter() - started) / len(ids), setup)}

    try:
        import transformers.tokenization_utils as legacy

        legacy.PreTrainedTokenizerBase = getattr(legacy, "PreTrainedTokenizerBase", None) or __import__(
            "transformers").PreTrainedTokenizerBase  # lm-format-enforcer 0.11 imports it from where transformers 4 had it
        from lmformatenforcer import RegexParser, TokenEnforcer
        from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data
    except ImportError as exc:
        print(f"lm-format-enforcer not measured ({exc})")
    else:
        started = time.perf_counter()
        enforcer = TokenEnforcer(build_token_enforcer_tokenizer_data(tokenizer), RegexParser(REGEX))
        setup = time.perf_counter() - started
        started = time.perf_counter()
        for k in range(len(ids)):
            enforcer.get_allowed_tokens(ids[:k])
        rates["lm-format-enforcer"] = ((time.perf_counter() - started) / len(ids), setup)

    print(f"{'library':<20}{'ms per token':>14}{'set-up s':>10}")
    for name, (per_token, setup) in rates.items():
        print(f"{name:<20}{per_token * 1e3:14.3f}{setup:10.2f}")
    if len(rates) == 2:
        print(f"ratio lm-format-enforcer / xgrammar: {rates['lm-format-enforcer'][0] / rates['xgrammar'][0]:.0f}x")


if __name__ == "__main__":
    main()
