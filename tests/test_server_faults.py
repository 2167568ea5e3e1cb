"""The server path under faults and hostile input, without vLLM: routing, the upload route of `tandem serve`
(FastAPI's test client), adapter names, a run's identity, and servers that are slow, refuse, drop or race,
played by stand-ins (tests/standins.py). What is about vLLM itself is in tests/test_servers.py."""

import io
import json
import os
import tarfile
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from standins import DROP, FakeVLLM, reply_text  # noqa: E402

from tandem.errors import EngineError  # noqa: E402
from tandem.lm import Request, load_lm  # noqa: E402
from tandem.lm.cache import CachedLM, adapter_digest  # noqa: E402
from tandem.lm.openai_server import OpenAIEngine  # noqa: E402
from tandem.lm.servers import STRIKES, Pool, Server, prefix_key  # noqa: E402


def ask(question: str, system: str = "Be brief.", adapter: str | None = None) -> Request:
    return Request(({"role": "system", "content": system}, {"role": "user", "content": question}),
                   max_new_tokens=8, adapter=adapter)


def write_adapter(folder, weights: bytes, name: str = "adapter_model.safetensors"):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / name).write_bytes(weights)
    return folder


# -- routing ---------------------------------------------------------------------------------------------

def test_calls_that_share_a_prefix_meet_on_one_server_and_a_busy_one_gives_way():
    import openai

    servers = [Server(f"http://127.0.0.1:{9 + i}/v1", openai, api_key="x", max_retries=0, timeout=1) for i in range(3)]
    pool = Pool(servers, slack=2)
    for prefix in range(6):  # the last message differs, what precedes it is shared: one server's prefix cache
        assert len({pool.pick(prefix_key(ask(f"question {q}", f"instructions {prefix}"))) for q in range(20)}) == 1
    assert {pool.pick(prefix_key(ask("q", f"instructions {p}"))) for p in range(30)} == set(servers)
    adapter = {pool.pick(prefix_key(ask("q", f"instructions {p}", adapter="/a"))) for p in range(30)}
    assert adapter == set(servers)  # the adapter is part of the key, and spreads too
    key = prefix_key(ask("q"))
    preferred = pool.pick(key)
    preferred.inflight = pool.slack
    assert pool.pick(key) is preferred
    preferred.inflight = pool.slack + 1  # busier than the least busy by more than `slack`: it gives way
    assert pool.pick(key) is not preferred


# -- the upload route ------------------------------------------------------------------------------------

def tar_of(*members: tuple[str, bytes | str | None]) -> bytes:
    """A tar of (name, content) members: bytes a file, "->target" a symlink, None a folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content.removeprefix("->")
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


ADAPTER = (("adapter_config.json", b'{"r": 4}'), ("adapter_model.safetensors", b"w" * 1000))
LIMIT = 256 * 1024


@pytest.fixture()
def routes(tmp_path):
    """(test client, adapter folder) of `tandem serve`'s routes taking LIMIT bytes; the folder holds `kept`."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tandem.serve import adapter_routes

    folder = tmp_path / "adapters"
    write_adapter(folder / "kept", b"k")
    app = FastAPI()
    app.include_router(adapter_routes(folder, LIMIT))
    return TestClient(app), folder


def unchanged(folder) -> bool:
    """Nothing written (no adapter, no leftover upload) and nothing removed."""
    return sorted(p.name for p in folder.iterdir()) == ["kept"] and (folder / "kept" / "adapter_config.json").exists()


def test_the_upload_route_takes_an_adapter_whole_and_removes_it(routes):
    client, folder = routes
    answer = client.put("/v1/tandem/adapters/tandem-abc", content=tar_of(*ADAPTER))
    assert answer.status_code == 200 and answer.json() == {"path": str(folder / "tandem-abc")}
    assert sorted(p.name for p in (folder / "tandem-abc").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    assert client.delete("/v1/tandem/adapters/tandem-abc").status_code == 200 and unchanged(folder)


@pytest.mark.parametrize("members, says", [
    ((*ADAPTER, ("link", "->/etc/passwd")), "no folders, links or dot-files"),
    ((*ADAPTER, ("sub/adapter_model.safetensors", b"w")), "no folders, links or dot-files"),
    ((*ADAPTER, ("sub", None)), "no folders, links or dot-files"),
    ((*ADAPTER, (".hidden", b"x")), "no folders, links or dot-files"),
    ((*ADAPTER, ("../escape", b"x")), "no folders, links or dot-files"),
    ((ADAPTER[1],), "no adapter_config.json"),
], ids=["symlink", "path", "folder", "dot-file", "dot-dot", "no-config"])
def test_the_upload_route_refuses_what_is_not_an_adapters_files(routes, members, says):
    client, folder = routes
    answer = client.put("/v1/tandem/adapters/tandem-abc", content=tar_of(*members))
    assert answer.status_code == 400 and says in answer.text
    assert unchanged(folder) and not (folder.parent / "escape").exists()


def test_the_name_dot_dot_is_refused_on_put_and_delete(routes):
    client, folder = routes
    for method in ("PUT", "DELETE"):
        answer = client.request(method, "/v1/tandem/adapters/%2E%2E", content=tar_of(*ADAPTER))
        assert answer.status_code == 400 and "not '..'" in answer.text, method
    assert unchanged(folder) and sorted(p.name for p in folder.parent.iterdir()) == ["adapters"]


def test_the_upload_route_refuses_compressed_and_oversized_bodies(routes):
    import gzip

    client, folder = routes
    bomb = gzip.compress(tar_of(("adapter_config.json", b"{}"), ("adapter_model.safetensors", bytes(10 * LIMIT))))
    assert len(bomb) < LIMIT
    answer = client.put("/v1/tandem/adapters/tandem-gz", content=bomb)
    assert answer.status_code == 415 and "uncompressed tar" in answer.text
    big = tar_of(("adapter_config.json", b"{}"), ("adapter_model.safetensors", bytes(2 * LIMIT)))
    answer = client.put("/v1/tandem/adapters/tandem-big", content=big)
    assert answer.status_code == 413 and "--max-adapter-mb" in answer.text
    chunks = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no Content-Length: counted as it comes
    answer = client.put("/v1/tandem/adapters/tandem-big", content=chunks)
    assert answer.status_code == 413 and "the upload is larger" in answer.text
    many = tar_of(*ADAPTER, *((f"f{i}", b"x") for i in range(80)))
    answer = client.put("/v1/tandem/adapters/tandem-many", content=many)
    assert answer.status_code == 413 and "files" in answer.text
    assert unchanged(folder)


def test_serve_warns_where_it_listens_beyond_loopback_without_a_key(monkeypatch):
    from tandem.serve import exposure

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert "every interface without --api-key" in exposure(None, None)
    assert exposure("0.0.0.0", None) and exposure("::", []) and exposure("node1.example", None)
    assert exposure("127.0.0.1", None) is None and exposure("::1", None) is None and exposure("localhost", None) is None
    assert exposure("0.0.0.0", ["secret"]) is None and exposure(None, None, uds="/tmp/s.sock") is None
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    assert exposure("0.0.0.0", None) is None


# -- adapter names ---------------------------------------------------------------------------------------

def test_two_bin_adapters_with_one_config_get_different_digests(tmp_path):
    a = write_adapter(tmp_path / "a", bytes(64), "adapter_model.bin")
    b = write_adapter(tmp_path / "b", bytes([1]) * 64, "adapter_model.bin")
    assert adapter_digest(str(a)) != adapter_digest(str(b))
    (b / "adapter_model.bin").write_bytes(bytes(64))
    (b / "training.json").write_text(json.dumps({"seconds": 1.5}))  # a record of the training, not the adapter
    assert adapter_digest(str(a)) == adapter_digest(str(b))


def test_two_identical_trainings_get_one_digest(tiny_model_dir, tmp_path):
    from tandem.lm.local import LocalLM
    from tandem.settings import LoraSettings
    from tandem.training.lora import finetune

    lm = LocalLM(tiny_model_dir, dtype="float32")
    calls = [[{"role": "user", "content": f"Thing {i}"}, {"role": "assistant", "content": f"Color: {c}"}]
             for i, c in enumerate(["blue", "green", "red", "white"])]
    settings = LoraSettings(rank=4, alpha=8, learning_rate=5e-3, epochs=1, batch_size=2, min_steps=1)
    for out in ("a", "b"):
        finetune(lm, calls, tmp_path / out, settings, progress=False)
    seconds = [json.loads((tmp_path / out / "training.json").read_text())["seconds"] for out in ("a", "b")]
    assert seconds[0] != seconds[1]  # wall-clock time differs between the two
    assert adapter_digest(str(tmp_path / "a")) == adapter_digest(str(tmp_path / "b"))


# -- a run's identity ------------------------------------------------------------------------------------

def test_a_run_and_its_cache_are_not_tied_to_the_servers_that_served_them(tmp_path):
    from tandem.rundir import check, claim, describe_lm

    with FakeVLLM() as a, FakeVLLM() as b:
        two, one = OpenAIEngine("m", [a.url, b.url], max_retries=0), OpenAIEngine("m", b.url, max_retries=0)
        claim(tmp_path / "run", {"lm": describe_lm(two)})
        check(tmp_path / "run", {"lm": describe_lm(one)})  # resumed on the server that is left
        assert json.loads((tmp_path / "run" / "config.json").read_text())["lm"]["base_url"] == [a.url, b.url]
        requests = [ask(f"question {i}", f"instructions {i}") for i in range(8)]
        first = CachedLM(two, tmp_path / "cache.sqlite").generate(requests)
        chats = b.chats
        again = CachedLM(one, tmp_path / "cache.sqlite").generate(requests)
        assert all(c.cached for c in again) and [c.text for c in again] == [c.text for c in first]
        assert b.chats == chats
        two.close(), one.close()


# -- servers that fail -----------------------------------------------------------------------------------

def test_copies_to_a_share_made_at_once_leave_one_whole_adapter(tmp_path):
    from tandem.lm.servers import Share, copy_to_share

    adapter = write_adapter(tmp_path / "adapter", os.urandom(8 * 2**20))
    share, start, paths, errors = Share.parse(str(tmp_path / "share")), threading.Barrier(4), [], []

    def copy():
        start.wait()
        try:
            paths.append(copy_to_share(adapter, share, "tandem-x"))
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=copy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and paths == [str(tmp_path / "share" / "tandem-x")] * 4
    assert [p.name for p in (tmp_path / "share").iterdir()] == ["tandem-x"]
    assert all((tmp_path / "share" / "tandem-x" / f.name).read_bytes() == f.read_bytes() for f in adapter.iterdir())


def test_two_share_servers_load_one_adapter_at_once(tmp_path):
    share = tmp_path / "share"
    with FakeVLLM() as a, FakeVLLM() as b:
        engine = OpenAIEngine("m", [a.url, b.url], adapter_share=str(share), max_retries=0)
        names = []
        for i in range(6):
            adapter = write_adapter(tmp_path / f"adapter-{i}", os.urandom(8 * 2**20))
            names.append(engine.load_adapter(str(adapter)))
            copy = share / names[-1]
            assert a.loaded[names[-1]] == b.loaded[names[-1]] == str(copy)
            assert all((copy / f.name).read_bytes() == f.read_bytes() for f in adapter.iterdir())
        assert sorted(p.name for p in share.iterdir()) == sorted(names)  # no temporary folder left behind
        engine.close()


def test_a_server_that_answers_after_the_timeout_stays_in_the_pool():
    slow = threading.Event()

    def slow_once(method, path, body):
        if path == "/v1/chat/completions" and not slow.is_set():
            slow.set()
            time.sleep(3.0)

    with FakeVLLM(hook=slow_once) as server:
        engine = OpenAIEngine("m", server.url, max_retries=0, timeout=1.0)
        [completion] = engine.generate([ask("hi")])
        assert completion.text == reply_text("m", list(ask("hi").messages))
        assert engine.servers[0].alive and engine.retries == 1
        engine.close()


def test_a_server_that_keeps_timing_out_is_taken_out_and_its_calls_go_to_another():
    hang = threading.Event()

    def hung(method, path, body):
        if path == "/v1/chat/completions" and hang.is_set():
            time.sleep(3.0)

    with FakeVLLM(hook=hung) as slow, FakeVLLM() as fine:
        engine = OpenAIEngine("m", [slow.url, fine.url], max_retries=0, timeout=1.0)
        hang.set()
        requests = [ask("q", f"instructions {i}") for i in range(12)]
        completions = engine.generate(requests)
        assert [c.text for c in completions] == [reply_text("m", list(r.messages)) for r in requests]
        assert not engine.servers[0].alive and engine.servers[1].alive and engine.retries >= 3
        engine.close()


ENGINE_DEAD = {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                         "type": "InternalServerError", "code": 500}}


@pytest.mark.parametrize("status, body, at_once", [
    (500, ENGINE_DEAD, True),  # vLLM's answer once its engine process died: the server exits next
    (502, b"<html>502 Bad Gateway</html>", False),  # a proxy with no server behind it
    (503, {"error": {"message": "Service Unavailable"}}, False),
    (504, b"<html>504 Gateway Time-out</html>", False),
])
def test_a_server_that_answers_it_is_not_serving_is_taken_out_and_its_calls_go_to_another(status, body, at_once):
    down = threading.Event()

    def not_serving(method, path, _):
        if path == "/v1/chat/completions" and down.is_set():
            return status, body

    with FakeVLLM(hook=not_serving) as bad, FakeVLLM() as fine:
        engine = OpenAIEngine("m", [bad.url, fine.url], max_retries=0, timeout=5, concurrency=1)  # one at a time
        down.set()
        requests = [ask("q", f"instructions {i}") for i in range(12)]
        assert any(engine.pool.pick(prefix_key(r)) is engine.servers[0] for r in requests)
        completions = engine.generate(requests)
        assert [c.text for c in completions] == [reply_text("m", list(r.messages)) for r in requests]
        assert not engine.servers[0].alive and engine.servers[1].alive
        assert engine.retries == (1 if at_once else STRIKES)
        engine.close()


def test_an_error_answer_about_the_request_stops_the_step_and_leaves_the_server_in():
    started = threading.Event()

    def broken(method, path, _):
        if path == "/v1/chat/completions" and started.is_set():
            return 500, {"error": {"message": "list index out of range", "type": "InternalServerError", "code": 500}}

    with FakeVLLM(hook=broken) as server, FakeVLLM() as other:
        engine = OpenAIEngine("m", [server.url, other.url], max_retries=0, timeout=5)
        started.set()
        chats = other.chats
        request = next(r for r in (ask("q", f"instructions {i}") for i in range(50))
                       if engine.pool.pick(prefix_key(r)) is engine.servers[0])
        with pytest.raises(EngineError, match=f"the server at {server.url}.*list index out of range"):
            engine.generate([request])
        assert engine.servers[0].alive and engine.retries == 0 and other.chats == chats
        engine.close()


def test_a_request_that_times_out_where_others_are_answered_stops_the_step():
    """The server answers every other request meanwhile, so it stays in, and this request is the trouble."""
    def long_reply(method, path, body):
        if path == "/v1/chat/completions" and "too long" in json.dumps(body.get("messages")):
            time.sleep(1.5)

    with FakeVLLM(hook=long_reply) as server:
        engine = OpenAIEngine("m", server.url, max_retries=0, timeout=1.0)
        done = threading.Event()

        def others():
            while not done.is_set():
                engine.generate([ask(f"quick {time.time()}")])
                time.sleep(0.05)

        worker = threading.Thread(target=others)
        worker.start()
        try:
            with pytest.raises(EngineError, match=f"a request went unanswered {STRIKES} times.*{server.url}"):
                engine.generate([ask("too long")])
        finally:
            done.set()
            worker.join()
        assert engine.servers[0].alive
        engine.close()


def test_calls_without_an_adapter_are_answered_while_a_slow_server_loads_one(tmp_path):
    adapter = str(write_adapter(tmp_path / "adapter", b"w"))
    loading, release = threading.Event(), threading.Event()

    def slow_load(method, path, _):
        if path == "/v1/load_lora_adapter":
            loading.set()
            release.wait(10)

    with FakeVLLM(hook=slow_load) as server:
        engine = OpenAIEngine("m", server.url, max_retries=0, timeout=20)
        tuned = threading.Thread(target=engine.generate, args=([ask("q", adapter=adapter)],))
        tuned.start()
        assert loading.wait(10)
        base = threading.Thread(target=engine.generate, args=([ask("q")],))
        base.start()
        base.join(5)
        answered = not base.is_alive()
        release.set()
        tuned.join(10)
        assert answered and engine.usage.requests == 2
        engine.close()


def test_request_timeout_reaches_every_servers_client():
    with FakeVLLM() as a, FakeVLLM() as b:
        engine = load_lm("m", engine="openai", base_url=(a.url, b.url), request_timeout=7.5)
        assert [s.client.timeout for s in engine.servers] == [7.5, 7.5]
        engine.close()


def test_a_gateway_without_its_server_is_said_so_at_the_start():
    with FakeVLLM(hook=lambda method, path, _: (502, b"<html>502 Bad Gateway</html>")) as gateway:
        with pytest.raises(EngineError, match=f"the server at {gateway.url} is not serving: .* 502 Bad Gateway"):
            OpenAIEngine("m", gateway.url, max_retries=0, timeout=5)


def test_a_server_that_refuses_is_taken_out_at_once_and_put_back_when_it_answers(tmp_path):
    adapter = str(write_adapter(tmp_path / "adapter", b"w"))
    requests = [ask("q", f"instructions {i}", adapter=adapter) for i in range(12)]
    a, b = FakeVLLM(), FakeVLLM()
    engine = OpenAIEngine("m", [a.url, b.url], max_retries=0, timeout=5)
    engine.pool.recheck = 0.1
    name = engine.load_adapter(adapter)
    first = [c.text for c in engine.generate(requests)]
    a.stop()
    assert [c.text for c in engine.generate(requests)] == first  # every call answered, by b
    assert not engine.servers[0].alive and engine.retries >= 1
    again = FakeVLLM(port=a.port)  # restarted: the model, no adapter
    deadline = time.time() + 10
    while not engine.servers[0].alive and time.time() < deadline:
        time.sleep(0.05)
    assert engine.servers[0].alive
    assert [c.text for c in engine.generate(requests)] == first
    assert again.chats and name in again.loaded  # back in use, its adapter loaded again before any call
    engine.close()
    again.stop(), b.stop()


def test_with_every_server_out_requests_wait_for_one_to_come_back_then_stop():
    a = FakeVLLM()
    engine = OpenAIEngine("m", a.url, max_retries=0, timeout=5)
    engine.pool.recheck = 0.1
    first = engine.generate([ask("q")])
    a.stop()
    restarted = []
    threading.Timer(1.0, lambda: restarted.append(FakeVLLM(port=a.port))).start()  # back a second later
    assert [c.text for c in engine.generate([ask("q")])] == [c.text for c in first]
    assert engine.servers[0].alive and restarted and restarted[0].chats == 1
    restarted[0].stop()
    engine.pool.grace = 0.5  # gone for good: the step stops once the grace is over
    started = time.monotonic()
    with pytest.raises(EngineError, match="every server stopped answering"):
        engine.generate([ask("another")])
    assert 0.5 <= time.monotonic() - started < 5
    engine.close()


def test_a_server_that_drops_while_an_adapter_is_loaded_again_fails_over(tmp_path):
    adapter = str(write_adapter(tmp_path / "adapter", b"w"))
    restarted = threading.Event()

    def drops(method, path, body):
        if restarted.is_set() and path == "/v1/load_lora_adapter":
            a.stop()  # the node goes while its adapter is pushed again
            return DROP

    a, b = FakeVLLM(hook=drops), FakeVLLM()
    engine = OpenAIEngine("m", [a.url, b.url], max_retries=0, timeout=5)
    engine.load_adapter(adapter)
    request = next(r for r in (ask("q", f"instructions {i}", adapter=adapter) for i in range(50))
                   if engine.pool.pick(prefix_key(r)) is engine.servers[0])
    a.loaded.clear()  # a restarted: it answers 404 for the adapter, then drops as it is loaded again
    restarted.set()
    [completion] = engine.generate([request])
    assert completion.text == reply_text(engine.load_adapter(adapter), list(request.messages))
    assert not engine.servers[0].alive and b.chats
    engine.close()
    b.stop()


def test_two_clients_probing_one_tandem_serve_at_once_both_pass(tiny_model_dir, tmp_path):
    """The first probe's load waits until both clients sent their files, the second's until a probe was
    removed: probes of one name would remove each other's files."""
    puts, loads, deleted, lock = [], [], threading.Event(), threading.Condition()

    def interleave(method, path, body):
        if method == "PUT":
            with lock:
                puts.append(path)
                lock.notify_all()
        elif method == "DELETE":
            answer = server.tandem(method, path)  # removed before the waiting load goes on
            deleted.set()
            return answer
        elif path == "/v1/load_lora_adapter" and body.get("lora_name"):
            with lock:
                loads.append(body["lora_name"])
                first = len(loads) == 1
                if first:
                    lock.wait_for(lambda: len(puts) >= 2, timeout=10)
            if not first:
                deleted.wait(10)

    errors = []

    def probe(engine, folder):
        try:
            engine.check_adapters(folder, 4)
        except Exception as exc:  # reported below, with the other client's
            errors.append(exc)

    with FakeVLLM(tiny_model_dir, receive=tmp_path / "received", hook=interleave) as server:
        (tmp_path / "received").mkdir()
        engines = [OpenAIEngine(tiny_model_dir, server.url, max_retries=0) for _ in range(2)]
        threads = [threading.Thread(target=probe, args=(e, tmp_path / f"run-{i}")) for i, e in enumerate(engines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(set(loads)) == 2
        assert not server.loaded and not list((tmp_path / "received").iterdir())
        for e in engines:
            e.close()
