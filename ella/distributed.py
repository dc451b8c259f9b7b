"""Data-parallel plumbing on ``torch.distributed``, for runs launched with ``torchrun``.

A process is *distributed* when torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) announces more than one process; :func:`setup` then joins the process group
(NCCL for CUDA devices, gloo for CPU) once per process and destroys it at exit. Without those variables, or
with ``WORLD_SIZE=1``, every helper here is a no-op and code runs exactly as a plain single process.

Conventions used by :mod:`ella.train`: rank 0 (:func:`is_main`) alone evaluates, logs and writes files;
decisions that depend on files (does a checkpoint exist? is the configuration unchanged?) are taken by rank 0
and broadcast with :func:`on_main`, so every rank takes the same branch (or raises the same error).

Every wait for the other processes has a time limit (``timeout`` of :func:`setup`, the option
``--process-timeout``): a collective that fails (a process killed or ended) or times out (a frozen one) raises
:class:`ProcessGroupError`, which says what this process was waiting for.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import logging
import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfac import KronCurvature

log = logging.getLogger(__name__)

T = TypeVar("T")
_BUCKET_NUMEL = 1 << 24  # elements per all-reduce of concatenated curvature factors (bounds extra memory)
# newer torch renames DDP's ``broadcast_buffers`` (deprecated) to ``forward_sync_buffers``
_BUFFER_SYNC_FLAG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)


def env_world_size() -> int:
    """Number of processes announced by the launcher (``WORLD_SIZE``; 1 without one); usable before setup."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's global rank announced by the launcher (``RANK``; 0 without one); usable before setup."""
    return int(os.environ.get("RANK", "0"))


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` usable on this machine; a malformed name, or a device this machine lacks
    (``cuda`` without a GPU, ``cuda:3`` with one), raises ValueError saying so."""
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)  # initialises the backend: fails for a missing driver or device ordinal
    except (RuntimeError, AssertionError, TypeError) as error:
        text = str(error).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(error).__name__  # its first sentence
        raise ValueError(f"device {str(device)!r} cannot be used here: {reason} (use e.g. --device cpu)") from error
    return parsed


class ProcessGroupError(RuntimeError):
    """A wait for the other processes of a data-parallel run failed or timed out; the message says what for."""


def setup(device: str | torch.device, timeout: float = 600.0) -> torch.device:
    """Join the process group described by torchrun's variables (once) and return this process's device.

    CUDA devices become ``cuda:$LOCAL_RANK`` (one GPU per process) with the NCCL backend; anything else uses
    gloo. Every collective then waits at most ``timeout`` seconds (see :class:`ProcessGroupError`). Without a
    multi-process launcher the device is returned unchanged and nothing is initialised.
    """
    device = parse_device(device)
    if env_world_size() == 1:
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local:
            log.warning("device %s replaced by cuda:%d (LOCAL_RANK) in a distributed run", device, local)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        limit = datetime.timedelta(seconds=timeout)
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device, timeout=limit)
        else:
            dist.init_process_group(backend="gloo", timeout=limit)
        atexit.register(cleanup)
        log.info("rank %d of %d joined the %s process group", rank(), world_size(), dist.get_backend())
    return device


def cleanup() -> None:
    """Leave and destroy the process group (safe to call when there is none). Registered at exit, where other
    processes may already be gone; a run that ends normally calls :func:`finish` instead."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End of a successful run on every rank: wait for all processes, then destroy the process group.

    Without the barrier a rank that finishes early (ranks other than 0 write nothing) tears down its
    connections while rank 0 is still writing, and gloo's shutdown then now and then aborts a process at
    interpreter exit ("terminate called without an active exception").
    """
    barrier()
    cleanup()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier(what: str = "the end of the run") -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if is_distributed():
        _collective(what, dist.barrier)


def _collective(what: str, call: Callable[[], T]) -> T:
    """``call()``, a collective; its failure (a closed connection, a time-out) as :class:`ProcessGroupError`."""
    try:
        return call()
    except RuntimeError as error:  # gloo and NCCL report lost peers and time-outs as RuntimeError (subclasses)
        raise process_group_error(error, what) from error


def process_group_error(error: RuntimeError, what: str) -> ProcessGroupError:
    """``error``, raised by a collective while waiting for the others (``what``), as a :class:`ProcessGroupError`."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ProcessGroupError(f"process {rank()} of {world_size()} stopped waiting for the others ({what}): {text}; "
                             "another process has ended, been killed, or hangs")


def is_collective_failure(error: BaseException) -> bool:
    """True for an error of the process group's backend (gloo, NCCL) in a distributed run: what
    ``DistributedDataParallel``'s gradient exchange raises when another process is gone or too slow."""
    return (is_distributed() and isinstance(error, RuntimeError)
            and (isinstance(error, dist.DistError) or any(word in str(error) for word in ("gloo", "NCCL"))))


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` in a distributed run, else ``model`` itself.

    Use the wrapper only for the training forward pass; KFAC, evaluation and ``state_dict`` use ``model``.
    Buffers are not re-broadcast every step (ella's models have no running statistics; their fixed bases are
    identical on all ranks, and DDP copies rank 0's parameters and buffers once when wrapping).
    """
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    no_buffer_sync = {_BUFFER_SYNC_FLAG: False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def all_reduce_sum(*values: float, what: str = "summing the training loss") -> tuple[float, ...]:
    """Sum plain numbers over all processes (float64); returns them unchanged in a single process. ``what``
    names the sum in a :class:`ProcessGroupError`."""
    if not is_distributed():
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    _collective(what, lambda: dist.all_reduce(totals))
    return tuple(totals.tolist())


def _buckets(tensors: list[torch.Tensor], bucket_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``tensors`` of one dtype and device, each of at most ``bucket_numel`` elements
    (or a single larger tensor)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        if not buckets or (buckets[-1][0].dtype, buckets[-1][0].device) != key or size + tensor.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += tensor.numel()
    return buckets


def _all_reduce_tensors(tensors: list[torch.Tensor], bucket_numel: int = _BUCKET_NUMEL) -> None:
    """Sum every tensor over all processes in place, concatenated into a few buckets."""
    for bucket in _buckets(tensors, bucket_numel):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        _collective("summing the KFAC factors", lambda: dist.all_reduce(flat))
        for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(part.view_as(tensor))


def all_reduce_curvature(curvature: KronCurvature) -> KronCurvature:
    """Sum a :class:`~kfac.KronCurvature` fitted on this process's shard over all processes, in place.

    Every factor (``out_factors``, ``in_factors``: raw sums over the data), the summed ``loss`` and ``n_data``
    are summed, so the result equals the curvature of the union of the shards. Every rank must hold the same
    blocks (same model). Returns ``curvature``; a no-op in a single process.
    """
    if not is_distributed():
        return curvature
    factors = [f for block in curvature.blocks.values() for f in (block.out_factors, block.in_factors) if f is not None]
    if factors:
        _all_reduce_tensors(factors)
    loss, n_data = all_reduce_sum(float(curvature.loss), float(curvature.n_data), what="summing the KFAC loss")
    if isinstance(curvature.loss, torch.Tensor):
        curvature.loss = torch.tensor(loss, dtype=curvature.loss.dtype, device=curvature.loss.device)
    else:
        curvature.loss = loss
    curvature.n_data = int(round(n_data))
    return curvature


def on_main(fn: Callable[[], T], what: str = "rank 0 checking, evaluating or writing files") -> T:
    """Call ``fn`` on rank 0 only and return its result on every rank (collective in a distributed run).

    An exception raised by ``fn`` is raised on every rank, so all of them fail alike instead of hanging.
    The result must be picklable; in a single process this is just ``fn()``. ``what`` names the wait in a
    :class:`ProcessGroupError`.
    """
    if not is_distributed():
        return fn()
    payload: list = [None]
    if is_main():
        try:
            payload[0] = (True, fn())
        except Exception as error:  # re-raised below on every rank
            payload[0] = (False, _picklable(error))
    _collective(what, lambda: dist.broadcast_object_list(payload, src=0))
    ok, value = payload[0]
    if not ok:
        raise value
    return value


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # an exception whose class cannot be sent: send its text
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
