"""tandem inside other frameworks, each an optional extra: `dspy` (pip install tandem[dspy]).

May import anything of tandem's below the optimizers (lm, training, settings); nothing of tandem imports it."""
