"""A stand-in for vLLM's OpenAI-compatible server, for tests of faults that are not about vLLM itself: it
answers what tandem asks of one (the model list, chat completions, runtime LoRA loading by path) from a
thread on a loopback port, and a hook puts faults in (a slow answer, a dropped connection, an order of
events). With `receive`, it also has `tandem serve`'s own upload routes (the real ones, through FastAPI's
test client), so it stands for a `tandem serve` node."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

DROP = object()  # a hook's answer: close the connection without a reply


def reply_text(model: str, messages: list) -> str:
    """What every stand-in answers: the same for the same model (or adapter) and messages, on any of them."""
    return "Answer: " + hashlib.sha256(json.dumps([model, messages]).encode()).hexdigest()[:8]


class FakeVLLM:
    """Serves `model`; loads an adapter whose folder holds adapter_config.json. `hook(method, path, body)`
    is asked first: None goes on, (status, json) is the answer, DROP closes the connection unanswered.
    `port`: 0 for a free one, or the port of a stand-in stopped before (a restart)."""

    def __init__(self, model: str = "m", *, receive: Path | None = None,
                 hook: Callable[[str, str, dict], object] | None = None, port: int = 0):
        self.model = model
        self.hook = hook
        self.loaded: dict[str, str] = {}  # adapter name -> path
        self.chats = 0  # chat completions answered
        self._lock = threading.Lock()
        self._routes = None
        if receive is not None:
            from fastapi import FastAPI
            from fastapi.testclient import TestClient

            from tandem.serve import adapter_routes

            app = FastAPI()
            app.state.args = SimpleNamespace(max_lora_rank=64, enable_lora=True)
            app.include_router(adapter_routes(receive))
            self._routes = TestClient(app)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = fake.answer(method, self.path, raw)
                if answer is DROP:
                    self.close_connection = True
                    return
                status, content = answer
                content = content if isinstance(content, bytes) else json.dumps(content).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def do_GET(self):
                self._any("GET")

            def do_POST(self):
                self._any("POST")

            def do_PUT(self):
                self._any("PUT")

            def do_DELETE(self):
                self._any("DELETE")

            def log_message(self, *args):
                pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True  # stop() from a handler's own thread must not wait for that thread

            def handle_error(self, request, client_address):
                pass

        self.httpd = Quiet(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Gone: connections to its port are refused from now on."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, method: str, path: str, raw: bytes):
        body = {} if path.startswith("/v1/tandem/") or not raw else json.loads(raw)  # tandem's routes take tars
        if self.hook is not None:
            answer = self.hook(method, path, body)
            if answer is not None:
                return answer
        if path.startswith("/v1/tandem/"):
            return self.tandem(method, path, raw)
        if method == "GET" and path == "/v1/models":
            with self._lock:
                adapters = [{"id": n, "object": "model", "root": where, "parent": self.model}
                            for n, where in self.loaded.items()]
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model", "root": self.model,
                                                     "parent": None}, *adapters]}
        if method == "POST" and path == "/v1/load_lora_adapter":
            name, where = body.get("lora_name"), body.get("lora_path")
            if not name or not where:
                return 400, {"error": {"message": "lora_name and lora_path are required"}}
            with self._lock:
                if name in self.loaded:
                    return 400, {"error": {"message": f"The lora adapter '{name}' has already been loaded."}}
                if not (Path(where) / "adapter_config.json").is_file():
                    return 404, {"error": {"message": f"No adapter found for {where}"}}
                self.loaded[name] = where
            return 200, b"Success"
        if method == "POST" and path == "/v1/unload_lora_adapter":
            with self._lock:
                self.loaded.pop(body.get("lora_name"), None)
            return 200, b"Success"
        if method == "POST" and path == "/v1/chat/completions":
            model = body.get("model")
            with self._lock:
                if model != self.model and model not in self.loaded:
                    return 404, {"error": {"message": f"The model `{model}` does not exist.", "code": 404}}
                self.chats += 1
            text = reply_text(model, body["messages"])
            return 200, {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": model,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
        return 404, {"detail": "Not Found"}

    def tandem(self, method: str, path: str, raw: bytes = b"") -> tuple[int, bytes]:
        """`tandem serve`'s routes: (status, body) of their answer; 404 without `receive`."""
        if self._routes is None:
            return 404, b'{"detail": "Not Found"}'
        r = self._routes.request(method, path, content=raw)
        return r.status_code, r.content

    def __enter__(self) -> "FakeVLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
