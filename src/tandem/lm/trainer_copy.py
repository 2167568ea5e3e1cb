"""The Hugging Face copy of a model that `--engine vllm` and `--engine openai` train on.

vLLM and a server hold the served model in their own memory; a weight step trains with peft on a copy
made here once, in the dtype tandem chose for the device it trains on (`pick_dtype`: bf16 on a GPU; on
a CPU the probe, so a CPU without native bf16 trains in fp32, not in a bf16 checkpoint's emulated
bf16), as tandem's own engine does.

On a GPU the copy leaves it after every weight step (and every `r` round): its weights go to host
memory and the allocator's cache is emptied, so a sleeping vLLM wakes into the memory it had and a
server sharing the GPU keeps its room; the next step moves the copy back. Before the copy first goes
to a GPU its size is checked against the GPU's free memory: where a model server already holds most
of it, `auto` trains on the CPU instead and a named GPU is refused, each in one line.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Callable, Iterator, Sequence

import torch

from ..errors import UsageError
from .base import Message, Trainee
from .local import pick_dtype

log = logging.getLogger(__name__)

# Training holds the weights plus activations, the logits of a micro-batch and the adapter's optimizer
# state: a rough allowance, meant to catch a GPU a server already fills, not to size a batch.
ACTIVATIONS = 0.25  # of the weights
WORKSPACE = 2**30  # bytes: CUDA context, logits, kernels' scratch


def gigabytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def needed_bytes(weights: int) -> int:
    """GPU memory a LoRA step needs for a model whose weights take `weights` bytes (rough, see ACTIVATIONS)."""
    return int(weights * (1 + ACTIVATIONS)) + WORKSPACE


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class TrainerCopy:
    """The trainable copy of the weights at `path` (a folder or a hub id), made at the first weight step.

    `dtype`: 'auto' or a name (`--dtype`); `device`: 'auto' (a GPU where there is one and the copy fits
    in its free memory, else the CPU), 'cpu', 'cuda', 'cuda:1', ... `what` names the model and `room` how
    to make room on the GPU, in the one line said where the copy does not fit."""

    def __init__(self, path: str, dtype: str = "auto", device: str = "auto", what: str = "the model",
                 room: str = "free the GPU of other processes"):
        self.path = path
        self.requested_dtype = dtype
        self.requested_device = device
        self.what, self.room = what, room
        self.model = None  # on the CPU between steps where it trains on a GPU
        self.device: str | None = None  # where it trains: decided at the first step
        self.dtype: torch.dtype | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device.startswith("cuda")

    @contextlib.contextmanager
    def lend(self, tokenizer, render: Callable[[Sequence[Message]], str]) -> Iterator[Trainee]:
        """The copy on its device for one weight step; afterwards it leaves a GPU (see `release`). A
        plain model comes back wrapped as a PeftModel: that is what is kept."""
        if self.model is None:
            self.load()
        elif self.on_gpu:  # back from host memory, where the last step left it
            self.model.to(self.device)
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        trainee = Trainee(self.model, tokenizer, render)
        try:
            yield trainee
        finally:
            self.model = trainee.model
            self.release()

    def release(self) -> None:
        """Move the copy off its GPU (to host memory) and give the allocator's cached blocks back to the driver,
        so another process (vLLM waking, a server) can take them; nothing to do on the CPU."""
        if self.model is None or not self.on_gpu:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        self.model.to("cpu")
        gc.collect()  # a reference cycle can still hold a GPU tensor (an optimizer's state, a graph)
        torch.cuda.empty_cache()
        log.info("the trainer copy left %s after the step (peak %s allocated while it trained; this process now "
                 "holds %s)", self.device, gigabytes(peak), gigabytes(torch.cuda.memory_reserved(self.device)))

    def load(self) -> None:
        """Make the copy (once): the device and dtype are decided here (see the class)."""
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        device = self.requested_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = device.startswith("cuda")
        dtype = pick_dtype(self.requested_dtype, device, self.path)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        if gpu:
            device = self._fits(device, weight_bytes(model))
            if device == "cpu":
                dtype = pick_dtype(self.requested_dtype, "cpu", self.path)
                model = model.to(dtype)
        self.device, self.dtype = device, dtype
        log.info("the trainer copy of %s: %s on %s", self.path, str(dtype).removeprefix("torch."), device)
        self.model = model.to(device)

    def _fits(self, device: str, weights: int) -> str:
        """`device`, where the copy fits in its free memory; else the CPU for 'auto', a refusal for a named GPU."""
        free, total = torch.cuda.mem_get_info(torch.device(device))
        need = needed_bytes(weights)
        if free >= need:
            return device
        said = (f"training a LoRA on {self.what} needs about {gigabytes(need)} of GPU memory for its copy of the "
                f"weights, and {device} has {gigabytes(free)} of {gigabytes(total)} free")
        if self.requested_device == "auto":
            log.warning("%s: it trains on the CPU instead, slower (to train on the GPU: %s)", said, self.room)
            return "cpu"
        raise UsageError(f"{said}: train on the CPU (device cpu), or {self.room}")
