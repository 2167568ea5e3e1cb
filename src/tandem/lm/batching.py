"""Dynamic batching: many threads call `submit`, one worker runs what has gathered as one batch.

Program code stays plain synchronous Python: the evaluator runs N program executions in
threads, each LM call blocks in `submit`, and the worker turns whatever calls are waiting into
a single batched generation.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)
In = TypeVar("In")
Out = TypeVar("Out")


class Cancelled(Exception):
    """The batch was cancelled (the user pressed Ctrl-C, say) before it finished."""


class DynamicBatcher(Generic[In, Out]):
    def __init__(self, run_batch: Callable[[list[In]], list[Out]], max_batch: int = 32, max_wait: float = 0.02):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._pending: list[tuple[In, Future]] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._cancelling = False  # set by cancel(), cleared when the next batch is taken

    @property
    def cancelling(self) -> bool:
        """True while the running batch should stop: `run_batch` checks it between steps."""
        return self._cancelling

    def submit(self, items: Sequence[In]) -> list[Out]:
        futures = [Future() for _ in items]
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="tandem-batcher", daemon=True)
                self._worker.start()
            self._pending.extend(zip(items, futures))
            self._cond.notify_all()
        return [f.result() for f in futures]

    def _take(self) -> list[tuple[In, Future]]:
        """The next batch; empty only once the batcher is closed and drained."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                # Callers that just got their previous replies resubmit within milliseconds:
                # wait briefly for them so the batch fills up.
                deadline = time.monotonic() + self.max_wait
                while len(self._pending) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._pending or self._closed:
                    break
                # cancel() emptied the batch while it filled: wait for the next call, since an
                # exited worker would leave every later `submit` waiting forever.
            batch, self._pending = self._pending, []
            self._cancelling = False
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:  # closed
                return
            try:
                outs = self.run_batch([item for item, _ in batch])
                if len(outs) != len(batch):  # zip would leave the unmatched callers waiting forever
                    raise RuntimeError(f"a batch of {len(batch)} requests returned {len(outs)} results")
                for (_, fut), out in zip(batch, outs):
                    fut.set_result(out)
            except BaseException as exc:  # the callers, not this thread, decide what an error means
                log.debug("batch of %d failed: %r", len(batch), exc)
                for _, fut in batch:
                    fut.set_exception(exc)

    def cancel(self) -> None:
        """Fail every waiting call and ask the running batch to stop; later calls run as usual."""
        with self._cond:
            pending, self._pending = self._pending, []
            self._cancelling = True
        for _, fut in pending:
            fut.set_exception(Cancelled("cancelled before it ran"))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
