"""Eigenvalues of the wider CPU factors through numpy's LAPACK, which is faster there than torch's.

On the CPU, ``torch.linalg.eigvalsh`` calls the LAPACK torch was built with (MKL in the x86 wheels) and
``numpy.linalg.eigvalsh`` the one numpy was built with (OpenBLAS in its wheels). Both run the same algorithm
(tridiagonal reduction, then the tridiagonal eigenvalues). ``benchmarks/eigenvalues.py`` times the two on the
F-FC+CONV network's factors (width 4, one thread, an AMD EPYC; torch 2.14, numpy 2.4): numpy's takes 0.58-0.60x
the time for the twelve ``1024 x 1024`` float64 factors, 0.75-0.77x for the 37 of 256, and 1.16-1.21x for the 102
of 64, so factors below ``NUMPY_EIGVALSH_MIN_SIZE`` stay with torch's batched call. The eigenvalues agree to
2e-16 of the largest. Other devices and dtypes stay with torch.
"""

from __future__ import annotations

import numpy as np
import torch

NUMPY_EIGVALSH_MIN_SIZE = 128  # CPU factors at least this wide take numpy's eigvalsh


def eigvalsh(stack: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues ``(..., n)`` of the symmetric ``stack (..., n, n)`` (its lower triangle is read):
    numpy's LAPACK for float32/float64 CPU stacks of ``n >= NUMPY_EIGVALSH_MIN_SIZE``, else
    ``torch.linalg.eigvalsh``. A LAPACK failure raises ``torch.linalg.LinAlgError`` either way."""
    numpy_sized = stack.shape[-1] >= NUMPY_EIGVALSH_MIN_SIZE and stack.dtype in (torch.float32, torch.float64)
    if not (numpy_sized and stack.device.type == "cpu" and not stack.requires_grad):
        return torch.linalg.eigvalsh(stack)
    try:
        return torch.from_numpy(np.linalg.eigvalsh(stack.numpy()))
    except np.linalg.LinAlgError as error:
        raise torch.linalg.LinAlgError(f"numpy eigvalsh: {error}") from error
