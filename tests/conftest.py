"""Shared fixtures: a tiny transformers model built locally, and a tokenizer from the embedded model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The embedded SmolLM2 converted to safetensors (once, in the tandem cache folder)."""
    from tandem.lm.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir) -> str:
    """A 2-layer Llama with random weights and the embedded model's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # wide enough that a small LoRA can move its (tied) logits
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory, embedded_model_dir) -> str:
    """The tiny Llama with 64-wide attention heads, a size vLLM's CPU attention kernels take."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-vllm-model")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    """Keeps each test's call cache apart while sharing the converted embedded model."""
    import os

    from tandem.lm.models import cache_root

    models = cache_root() / "models"
    root = tmp_path / "cache"
    (root).mkdir()
    if models.exists():
        os.symlink(models, root / "models")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(root))
    return root
