"""Eigenvalues of the wider CPU factors through numpy's LAPACK, which is faster there than torch's.

On the CPU, ``torch.linalg.eigvalsh`` calls the LAPACK torch was built with (MKL in the x86 wheels) and
``numpy.linalg.eigvalsh`` the one numpy was built with (OpenBLAS in its wheels). Both run the same algorithm
(tridiagonal reduction, then the tridiagonal eigenvalues). ``benchmarks/eigenvalues.py`` times the two on the
F-FC+CONV network's factors (width 4, one thread, an AMD EPYC; torch 2.14, numpy 2.4): numpy's takes 0.58-0.60x
the time for the twelve ``1024 x 1024`` float64 factors, 0.75-0.77x for the 37 of 256, and 1.16-1.21x for the 102
of 64, so factors below ``NUMPY_EIGVALSH_MIN_SIZE`` stay with torch's batched call. The eigenvalues agree to
2e-16 of the largest. Other devices and dtypes stay with torch.

numpy's LAPACK runs with torch's thread count (``torch.get_num_threads()``, which ``torch.set_num_threads`` and
``OMP_NUM_THREADS`` set) when its OpenBLAS can be told so: the OpenBLAS of numpy's wheels, found among the
libraries the process loaded (Linux). Elsewhere it keeps its own setting (e.g. ``OPENBLAS_NUM_THREADS``).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

NUMPY_EIGVALSH_MIN_SIZE = 128  # CPU factors at least this wide take numpy's eigvalsh
_THREAD_SYMBOLS = [f"{prefix}openblas_{{}}_num_threads{suffix}" for prefix in ("scipy_", "")
                   for suffix in ("64_", "_64", "")]  # numpy's wheels: scipy_openblas_set_num_threads64_


@functools.cache
def _openblas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """``(get, set)`` of the thread count of the OpenBLAS loaded from numpy's folders, else ``None``."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    site = Path(np.__file__).parent.parent  # numpy/ and the numpy.libs/ of its wheels
    paths = {Path(line.split()[-1]) for line in maps.read_text().splitlines() if "openblas" in line.lower()}
    names = ("libscipy_openblas", "libopenblas")
    for path in sorted(p for p in paths if p.is_relative_to(site) and p.name.startswith(names)):
        library = ctypes.CDLL(str(path))
        for symbol in _THREAD_SYMBOLS:
            getter, setter = (getattr(library, symbol.format(verb), None) for verb in ("get", "set"))
            if getter is not None and setter is not None:
                getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                return getter, setter
    return None


@contextmanager
def _torch_threads() -> Iterator[None]:
    """numpy's OpenBLAS runs with ``torch.get_num_threads()`` threads inside the block (where it can be set)."""
    control = _openblas_threads()
    before, wanted = (None if control is None else control[0]()), torch.get_num_threads()
    switch = before is not None and before != wanted
    if switch:
        control[1](wanted)
    try:
        yield
    finally:
        if switch:
            control[1](before)


def eigvalsh(stack: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues ``(..., n)`` of the symmetric ``stack (..., n, n)`` (its lower triangle is read):
    numpy's LAPACK for float32/float64 CPU stacks of ``n >= NUMPY_EIGVALSH_MIN_SIZE``, else
    ``torch.linalg.eigvalsh``, with torch's thread count either way (where numpy's can be set). A LAPACK failure
    raises ``torch.linalg.LinAlgError`` either way."""
    numpy_sized = stack.shape[-1] >= NUMPY_EIGVALSH_MIN_SIZE and stack.dtype in (torch.float32, torch.float64)
    if not (numpy_sized and stack.device.type == "cpu" and not stack.requires_grad):
        return torch.linalg.eigvalsh(stack)
    try:
        with _torch_threads():
            return torch.from_numpy(np.linalg.eigvalsh(stack.numpy()))
    except np.linalg.LinAlgError as error:
        raise torch.linalg.LinAlgError(f"numpy eigvalsh: {error}") from error
