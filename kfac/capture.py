"""Forward hooks that record layer inputs/outputs, and the backward of all directions to the layer outputs.

One forward pass records, for every supported module, its (detached) input and its output tensor. The
backward then produces the gradients of ``sum_n S[d, n]^T f(x_n)`` w.r.t. every recorded output for all ``D``
loss-Hessian square-root directions, either one backward per direction (``"loop"``, the default: every op runs
at full speed and no ``(D, ...)`` tensor is ever materialised) or one vmapped backward (``"batched"``,
``is_grads_batched``). Only gradients w.r.t. the recorded outputs are requested, so autograd prunes weight
gradients and everything before the first recorded output. The gradients are handed to a consumer as they
are computed, in chunks of logical shape ``(D_i, *output.shape)`` along the direction axis (every KFAC
quantity is a sum or an "any" over directions), so large per-direction gradients are reduced while they are
fresh in cache and freed before the next direction instead of being kept for all ``D`` directions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

BACKWARD_MODES = ("batched", "loop")
_MERGE_ELEMENTS = 1 << 20  # per-direction gradients of at most this many elements in all are joined into one chunk


@dataclass
class Record:
    """What one module saw in the forward pass."""

    name: str
    module: nn.Module
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    version: int = -1


class Recorder:
    """Context manager installing forward hooks on ``modules`` (name -> module)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.records = {name: Record(name, module) for name, module in modules.items()}
        self._handles: list = []

    def _hook(self, record: Record) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if record.output is not None:
                raise NotImplementedError(
                    f"module {record.name} ({type(module).__name__}) was called more than once in one forward "
                    "pass; weight sharing across calls is not supported by the KFAC engine"
                )
            if not isinstance(output, torch.Tensor):
                raise NotImplementedError(f"module {record.name} must return a single tensor")
            if not inputs:
                raise NotImplementedError(
                    f"module {record.name} ({type(module).__name__}) was called without a positional input; the "
                    "KFAC rules need the module's input as its first positional argument"
                )
            record.input = inputs[0].detach()
            record.output = output
            record.version = output._version

        return hook

    def __enter__(self) -> Recorder:
        for record in self.records.values():
            self._handles.append(record.module.register_forward_hook(self._hook(record)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check_called(records: list[Record]) -> None:
    """Raise NotImplementedError naming the first module of ``records`` that the forward pass did not call (a
    module owning trainable parameters that the output does not depend on, e.g. an unused auxiliary head)."""
    for record in records:
        if record.output is None:
            raise NotImplementedError(
                f"module {record.name or '<root>'} ({type(record.module).__name__}) owns trainable parameters but was "
                "not called in the forward pass; freeze its parameters (module.requires_grad_(False)) or remove it "
                "from the model"
            )


def _check_records(records: list[Record]) -> None:
    check_called(records)
    for record in records:
        if record.output._version != record.version:
            raise NotImplementedError(
                f"the output of module {record.name} was modified in place (e.g. ReLU(inplace=True)); "
                "the KFAC engine needs the unmodified layer output"
            )


Consumer = Callable[[int, torch.Tensor], None]


def output_gradients(
    logits: torch.Tensor, records: list[Record], seeds: torch.Tensor, consume: Consumer, mode: str = "loop"
) -> None:
    """Gradients of ``<seeds[d], logits>`` w.r.t. every record's output, handed to ``consume(i, chunk)`` with
    ``chunk (D_i, *records[i].output.shape)`` (detached; called without gradient tracking).

    ``seeds`` is ``(D, B, K)``. ``mode="loop"`` runs ``D`` ordinary backward passes: an output whose ``D``
    gradients have more than ``_MERGE_ELEMENTS`` elements in all gets one chunk per direction as soon as that
    direction is computed; smaller ones are joined and handed over in one chunk after the last pass (fewer
    tiny kernels). ``mode="batched"`` runs one vmapped backward (``is_grads_batched``): one chunk per output.
    Both give the same gradients; the loop is faster on CPU because several batching rules fall back to
    per-direction loops plus a concatenation, and large fresh ``(D, ...)`` allocations are expensive (page
    faults). Outputs the logits do not depend on get zeros.
    """
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
    _check_records(records)
    outputs = [record.output for record in records]
    n_dirs = seeds.shape[0]
    seeds = seeds.to(logits.dtype)
    if mode == "batched" and n_dirs > 0:
        grads = torch.autograd.grad(logits, outputs, grad_outputs=seeds, is_grads_batched=True, allow_unused=True)
        with torch.no_grad():
            for i, (out, grad) in enumerate(zip(outputs, grads)):
                consume(i, out.new_zeros((n_dirs, *out.shape)) if grad is None else grad.detach())
        return
    streamed = [n_dirs * out.numel() > _MERGE_ELEMENTS for out in outputs]
    held: list[list[torch.Tensor]] = [[] for _ in outputs]
    unused = [n_dirs == 0] * len(outputs)
    for d in range(n_dirs):
        grads = torch.autograd.grad(
            logits, outputs, grad_outputs=seeds[d], retain_graph=d < n_dirs - 1, allow_unused=True
        )
        with torch.no_grad():
            for i, grad in enumerate(grads):
                if grad is None:
                    unused[i] = True
                elif streamed[i]:
                    consume(i, grad.detach()[None])
                else:
                    held[i].append(grad.detach()[None])
    with torch.no_grad():
        for i, out in enumerate(outputs):
            if unused[i]:
                consume(i, out.new_zeros((n_dirs, *out.shape)))
            elif held[i]:
                consume(i, held[i][0] if len(held[i]) == 1 else torch.cat(held[i]))
