"""Training: LoRA fine-tuning (w, w+ steps, the DSPy provider) and policy updates (r steps), with peft,
on the model an engine lends (`lm.base.Trainable.training`), and training under a launcher.

    lora.finetune(lm, conversations, out_dir, settings)            -> TrainReport
    policy.train_policy(lm, calls, start, out_dir, lora, policy)   -> PolicyReport
    launch.launch(launcher, ...)                                   one process per GPU (torchrun, accelerate)
    reports: TrainReport, PolicyCall, PolicyReport                 plain data, no torch

May import: errors, settings, lm.base (the LM protocol, `Trainee`, `chat_prompt`). Never an engine:
engines lend a model and serve the adapter it leaves by path, and import nothing from here. An LM that
trains itself (its own `finetune` / `train_policy`, as the scripted LM of the tests) is asked directly.
"""
