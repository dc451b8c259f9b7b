"""Forward hooks that record layer inputs/outputs, and the batched backward to the layer outputs.

One forward pass records, for every supported module, its (detached) input and its output tensor. One
backward pass then produces the gradients of ``sum_n S[d, n]^T f(x_n)`` w.r.t. every recorded output for all
``D`` loss-Hessian square-root directions at once (``is_grads_batched``): ``(D, *output.shape)`` per module.
Only gradients w.r.t. the recorded outputs are requested, so autograd prunes weight gradients and everything
before the first recorded output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

BACKWARD_MODES = ("batched", "loop")


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
            record.input = inputs[0].detach() if inputs else None
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


def output_gradients(
    logits: torch.Tensor, records: list[Record], seeds: torch.Tensor, mode: str = "batched"
) -> list[torch.Tensor]:
    """Gradients of ``<seeds[d], logits>`` w.r.t. every record's output: ``(D, *output.shape)`` each.

    ``seeds`` is ``(D, B, K)``. ``mode="batched"`` runs one vmapped backward (``is_grads_batched``);
    ``mode="loop"`` runs ``D`` ordinary backward passes (reference/benchmark only).
    """
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
    for record in records:
        if record.output is None:
            raise RuntimeError(f"module {record.name} was not called in the forward pass")
        if record.output._version != record.version:
            raise NotImplementedError(
                f"the output of module {record.name} was modified in place (e.g. ReLU(inplace=True)); "
                "the KFAC engine needs the unmodified layer output"
            )
    outputs = [record.output for record in records]
    n_dirs = seeds.shape[0]
    if n_dirs == 0:
        return [out.new_zeros((0, *out.shape)) for out in outputs]
    seeds = seeds.to(logits.dtype)
    if mode == "batched":
        grads = torch.autograd.grad(logits, outputs, grad_outputs=seeds, is_grads_batched=True, allow_unused=True)
    else:
        per_dir = [
            torch.autograd.grad(logits, outputs, grad_outputs=seeds[d], retain_graph=d < n_dirs - 1, allow_unused=True)
            for d in range(n_dirs)
        ]
        grads = [None if g[0] is None else torch.stack(g) for g in zip(*per_dir)]
    return [
        out.new_zeros((n_dirs, *out.shape)) if g is None else g.detach() for g, out in zip(grads, outputs)
    ]
