"""Engine guards: a cancelled batcher serves the next call, and `--dtype auto` decides the same way each time."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from tandem.lm.batching import Cancelled, DynamicBatcher
from tandem.lm.local import choose_dtype, pick_dtype, probe_dtype_speeds, probe_shape


def test_a_batcher_cancelled_while_its_batch_fills_serves_the_next_call():
    class Spy(threading.Condition):  # tells when the worker waits for the batch to fill (a timed wait)
        filling = threading.Event()

        def wait(self, timeout=None):
            if timeout is not None:
                self.filling.set()
            return super().wait(timeout)

    batcher = DynamicBatcher(lambda items: [i * 10 for i in items], max_batch=8, max_wait=0.2)
    batcher._cond = Spy()
    errors, results = [], []

    def call(i):
        try:
            results.extend(batcher.submit([i]))
        except Cancelled as exc:
            errors.append(exc)

    first = threading.Thread(target=call, args=(1,))
    first.start()
    assert batcher._cond.filling.wait(5)
    batcher.cancel()  # Ctrl-C, or an exceeded error budget, while the batch fills
    first.join(5)
    assert len(errors) == 1 and results == []
    batcher._worker.join(0.5)  # past the fill deadline: where the worker used to exit
    second = threading.Thread(target=call, args=(2,), daemon=True)
    second.start()
    second.join(5)  # a hang-guard, not a timing: a dead worker leaves this call waiting forever
    assert not second.is_alive() and results == [20]
    batcher.close()


@pytest.mark.parametrize("bf16,fp32,chosen", [
    (600.0, 180.0, torch.bfloat16),  # native bf16 (AVX512-BF16, AMX): several times fp32
    (2.0, 180.0, torch.float32),  # emulated bf16 (AVX2): ~100x slower
    (250.0, 180.0, torch.float32),  # faster, but inside the margin: a noisy timing must not flip it
    (280.0, 180.0, torch.bfloat16),
])
def test_dtype_decision_from_timings_keeps_a_margin(bf16, fp32, chosen):
    assert choose_dtype(bf16, fp32) is chosen
    assert choose_dtype(bf16, fp32, margin=1.0) is (torch.bfloat16 if bf16 > fp32 else torch.float32)


def test_the_probe_times_the_models_shapes(tiny_model_dir, embedded_model_dir):
    rows, hidden, intermediate = probe_shape(embedded_model_dir)
    assert (hidden, intermediate) == (576, 1536) and rows >= 16
    assert probe_shape(tiny_model_dir)[1:] == (64, 128)
    assert probe_shape(None)[1:] == probe_shape("Some/hub-id")[1:]  # no config to read: a generic shape


def test_dtype_auto_gives_the_same_answer_each_time_and_says_what_it_measured(embedded_model_dir):
    # Fresh processes, as each command is: the one-time costs of a dtype's first calls are what flipped it.
    code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "from tandem.lm.local import pick_dtype; import sys; print(pick_dtype('auto', 'cpu', sys.argv[1]))")
    command = [sys.executable, "-c", code, embedded_model_dir]
    runs = [subprocess.run(command, capture_output=True, text=True, timeout=120) for _ in range(3)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    choices = {run.stdout.strip() for run in runs}
    logs = [run.stderr.strip().splitlines()[-1] for run in runs]
    assert len(choices) == 1, logs
    name = choices.pop().removeprefix("torch.")
    said = [line.startswith("dtype auto: bf16 ") and "GFLOP/s" in line and line.endswith(f"-> {name}") for line in logs]
    assert all(said), logs
    print(logs)  # what this machine measures: pytest -s shows it
    assert all(speed > 0 for speed in probe_dtype_speeds(probe_shape(embedded_model_dir)))
    assert pick_dtype("float32", "cpu") is torch.float32 and pick_dtype("auto", "cuda") is torch.bfloat16
