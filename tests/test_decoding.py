"""What made a constrained reply is part of its key and of a run's record; a server that ignores the
grammar is found out and the run says so, never claiming constrained decoding it did not get."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tandem.lm import CachedLM, Completion, Request, honest_generation
from tandem.program import ChainOfThought
from tandem.prompts import reply_format
from tandem.settings import GenerationSettings

MODULE = ChainOfThought("petal_length, petal_width -> species: setosa|versicolor|virginica")


def formatted(**options) -> Request:
    return Request(tuple(MODULE.messages({"petal_length": 1.4, "petal_width": 0.2})),
                   format=reply_format(MODULE.signature), **options)


class Counting:
    """An engine that counts its calls; `decoding` says how it makes constrained replies."""

    name = "counting"

    def __init__(self, decoding: str):
        self.decoding, self.calls = decoding, 0

    def generate(self, requests):
        self.calls += len(requests)
        return [Completion("Reasoning: petals are small, so it is a setosa.\nSpecies: setosa") for _ in requests]


def test_a_constrained_reply_made_by_other_decoding_is_not_served_from_the_cache(tmp_path):
    path = tmp_path / "calls.sqlite"
    first = Counting("forced-v2")
    CachedLM(first, path).generate([formatted()])
    CachedLM(first, path).generate([formatted()])
    assert first.calls == 1  # same decoding: read back
    other = Counting("phased-v2")
    CachedLM(other, path).generate([formatted()])
    assert other.calls == 1  # another decoding made it: asked again
    free = Request(formatted().messages)
    assert free.key("m", None, "forced-v2") == free.key("m", None, "phased-v2") == free.key("m")


def test_the_engine_record_holds_its_decoding_and_no_library_versions(tiny_model_dir, tmp_path):
    from tandem.lm.local import LocalLM
    from tandem.rundir import claim, describe_lm

    lm = LocalLM(tiny_model_dir, dtype="float32")
    record = describe_lm(lm)
    assert record["decoding"].startswith("forced-v") and not {"vllm", "openai", "torch"} & set(record)
    claim(tmp_path, {"lm": record})
    config = json.loads((tmp_path / "config.json").read_text())
    config["versions"]["transformers"] = "0.0.1"  # an upgrade since: recorded, not compared
    (tmp_path / "config.json").write_text(json.dumps(config))
    claim(tmp_path, {"lm": record})
    with pytest.raises(Exception, match="lm.decoding"):
        claim(tmp_path, {"lm": {**record, "decoding": "forced-v1"}})
    lm.close()


def stand_in_server(honoured: str | None):
    """An OpenAI-compatible stand-in that writes free text, or the one string a grammar allows when it
    comes in the field `honoured`; it keeps every request body it gets."""
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, data: dict) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._reply({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(request)
            grammar = request.get(honoured) if honoured else None
            grammar = grammar.get("grammar") if isinstance(grammar, dict) else grammar
            text = grammar.split('"')[1] if grammar and grammar.startswith("root ::= \"") else \
                "Reasoning: the petals are short and narrow.\nSpecies: setosa"
            self._reply({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, bodies


def test_a_server_that_ignores_the_grammar_is_found_out_and_the_run_says_free(caplog):
    pytest.importorskip("openai")
    from tandem.lm.openai_server import OpenAIEngine

    httpd, bodies = stand_in_server(honoured=None)
    try:
        engine = OpenAIEngine("m", f"http://127.0.0.1:{httpd.server_port}/v1", max_retries=0)
        with caplog.at_level(logging.WARNING):
            assert engine.constrains is False and engine.constrains is False  # asked once
        assert [r.getMessage() for r in caplog.records if "ignores reply grammars" in r.getMessage()] != []
        assert len([r for r in caplog.records if "ignores reply grammars" in r.getMessage()]) == 1
        assert engine.describe()["decoding"] == "free"
        assert honest_generation(engine, GenerationSettings(constrained=True)).constrained is False
        probes = len(bodies)
        completion = engine.generate([formatted(max_new_tokens=40)])[0]
        assert completion.text.endswith("Species: setosa")
        assert not any(field in bodies[probes] for field in ("structured_outputs", "guided_grammar", "ebnf"))
    finally:
        httpd.shutdown()


def test_a_server_that_takes_the_grammar_in_another_field_is_constrained_through_it():
    pytest.importorskip("openai")
    from tandem.lm.openai_server import OpenAIEngine

    httpd, bodies = stand_in_server(honoured="guided_grammar")
    try:
        engine = OpenAIEngine("m", f"http://127.0.0.1:{httpd.server_port}/v1", max_retries=0)
        assert engine.constrains is True
        assert honest_generation(engine, GenerationSettings(constrained=True)).constrained is True
        probes = len(bodies)
        engine._budgets = False  # no local tokenizer for "m": the whole grammar in one request
        engine.generate([formatted(max_new_tokens=40)])
        assert "guided_grammar" in bodies[probes] and "structured_outputs" not in bodies[probes]
    finally:
        httpd.shutdown()
