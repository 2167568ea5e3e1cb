"""tandem inside other frameworks, each an optional extra: `dspy` (pip install tandem[dspy])."""
