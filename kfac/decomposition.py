"""Eigendecomposed Kronecker curvature: log-determinants and effective parameter counts.

For a block with factor eigenvalues ``beta (K_out, o)`` and ``alpha (K, i)`` (``alpha`` already divided by
``n_data``; ``K_out`` is 1 or ``K``) the block's GGN eigenvalues are ``lambda[k, j, i] = beta[k, j] alpha[k, i]``
(``beta`` broadcast over ``k`` when shared); one-factor (bias) blocks have ``lambda = beta``. Negative
eigenvalues (round-off) are clamped to 0. With a per-block prior precision ``delta_l``:

- ``logdet(delta)[l] = sum log(lambda + delta_l)`` (log-determinant of GGN block + ``delta_l I``),
- ``effective_params(delta)[l] = sum lambda / (lambda + delta_l)`` (MacKay).

Cost (:meth:`KronDecomposition.from_curvature`): only eigenvalues are computed (``torch.linalg.eigvalsh``,
about half the time of ``eigh`` on the CPU); the factors of equal size are stacked and decomposed in one batched
call per size; a weight's output factor equal to its bias block's matrix (a layer with one position, e.g. a
Linear head) is decomposed once; the device is asked for its results twice per decomposition (one check that
every eigenvalue is finite, one for the shared factors), not per block. Eigenvectors, which only some callers
need (e.g. quadratic forms in a block), are computed on first access of :attr:`BlockEigen.out_vecs` /
:attr:`BlockEigen.in_vecs`, for that block alone.

Across decompositions (``memo``, :class:`EigenvalueMemo`): a factor of at least ``MEMO_MIN_SIZE`` rows that is bit
for bit the one an earlier decomposition given the same memo saw for that block side takes its eigenvalues from
the memo instead of LAPACK, e.g. the first layer's input factors, which depend on the data alone, in every round
of a training run (three of F-FC+CONV's twelve ``1024 x 1024`` factors; FC+CONV's ``3072 x 3072`` one).

Where: on the factors' device unless ``device`` is given. On the CPU a stack of small matrices is one LAPACK
loop, and factors of at least 128 rows go to numpy's LAPACK, the faster one measured (:mod:`kfac.cpu_linalg`);
CUDA's batched solver covers matrices up to 32 and loops above, so for CUDA factors
``device="cpu"`` may be faster for networks of many mid-sized factors: ``benchmarks/train_speed.py`` times both
on a GPU.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kfac import cpu_linalg

if TYPE_CHECKING:
    from kfac.curvature import KronCurvature

logger = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, torch.Tensor | None]
_EIG_ELEMENTS = 1 << 24  # factors of one size are decomposed together up to this many entries (128 MiB in float64)
MEMO_MIN_SIZE = 128  # factors at least this wide are fingerprinted for EigenvalueMemo (hashing: <10% of eigvalsh)


class CurvatureError(RuntimeError):
    """The curvature cannot be computed: the model output of a batch is not finite, or a factor could not be
    eigendecomposed (the message names the block)."""


def _symmetric(matrices: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Stacks ``(k_m, n, n)`` -> one ``(sum k_m, n, n)`` float64 stack of ``(M + M^T) / 2`` (float32 LAPACK fails
    on the many zero eigenvalues that dead ReLUs cause), on ``device`` (default: the first stack's own).

    One copy: the stacks are joined and widened in one ``cat``; CPU stacks are then symmetrised in place by numpy
    (which buffers the transposed operand in cache-sized pieces; torch refuses the overlap, and an out-of-place
    sum with a transposed operand takes twice as long); the values are those of ``(M + M^T) * 0.5`` either way.
    """
    device = matrices[0].device if device is None else device
    shape = (sum(m.shape[0] for m in matrices), *matrices[0].shape[1:])
    stack = torch.cat([m.to(device) for m in matrices], out=torch.empty(shape, dtype=torch.float64, device=device))
    if stack.device.type != "cpu":
        return (stack + stack.transpose(-1, -2)).mul_(0.5)
    values = stack.numpy()
    values += values.swapaxes(-1, -2)
    values *= 0.5
    return stack


def _jittered(sym: torch.Tensor, jitter: float) -> torch.Tensor:
    """``sym + jitter * max(1, mean |diag|) I`` per matrix."""
    scale = sym.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)
    eye = torch.eye(sym.shape[-1], dtype=sym.dtype, device=sym.device)
    return sym + jitter * scale[..., None, None] * eye


def _decompose_one(sym: torch.Tensor, what: str, jitter: float, vectors: bool) -> tuple[torch.Tensor, ...]:
    """Eigenvalues (and vectors) of the symmetric ``(..., n, n)`` float64 ``sym``; on failure or non-finite
    output retry once with a tiny jitter, then raise :class:`CurvatureError` naming ``what``."""
    solve = torch.linalg.eigh if vectors else lambda m: (cpu_linalg.eigvalsh(m),)
    if not torch.isfinite(sym).all():
        raise CurvatureError(f"{what}: factor has non-finite entries")
    try:
        found = solve(sym)
        if all(torch.isfinite(t).all() for t in found):
            return found
        first: Exception = RuntimeError("non-finite eigenvalues")
    except (torch.linalg.LinAlgError, RuntimeError) as error:
        first = error
    logger.warning("eigendecomposition failed for %s (%s); retrying with jitter", what, first)
    try:
        found = solve(_jittered(sym, jitter))
    except (torch.linalg.LinAlgError, RuntimeError) as second:
        raise CurvatureError(f"{what}: eigendecomposition failed twice ({second})") from second
    if not all(torch.isfinite(t).all() for t in found):
        raise CurvatureError(f"{what}: eigendecomposition returned non-finite values twice")
    return found


class BlockEigen:
    """Eigenvalues of one block's factors: ``out_vals (K_out, o)``, ``in_vals (K, i)`` (``None`` for one-factor
    blocks), ascending, float64. The eigenvectors ``out_vecs (K_out, o, o)`` and ``in_vecs (K, i, i)`` are
    computed from the block's factors (``factors()``: output factor and input factor / ``n_data``) on first
    access and kept."""

    def __init__(self, out_vals: torch.Tensor, in_vals: torch.Tensor | None, num_params: int,
                 factors: Callable[[], Factors], name: str = "", jitter: float = 1e-10) -> None:
        self.out_vals, self.in_vals, self.num_params = out_vals, in_vals, num_params
        self._factors, self._name, self._jitter = factors, name, jitter
        self._vecs: Factors | None = None

    def _vectors(self) -> Factors:
        if self._vecs is None:
            b, a = self._factors()
            label = f"block {self._name}"
            out_vecs = _decompose_one(_symmetric([b]), f"{label} (output-side factor)", self._jitter, True)[1]
            in_vecs = None if a is None else \
                _decompose_one(_symmetric([a]), f"{label} (input-side factor)", self._jitter, True)[1]
            device = self.out_vals.device
            self._vecs = (out_vecs.to(device), None if in_vecs is None else in_vecs.to(device))
        return self._vecs

    @property
    def out_vecs(self) -> torch.Tensor:
        """``(K_out, o, o)`` float64 eigenvectors of the output factor(s), columns in ``out_vals`` order."""
        return self._vectors()[0]

    @property
    def in_vecs(self) -> torch.Tensor | None:
        """``(K, i, i)`` float64 eigenvectors of the input factor(s) / ``n_data`` (``None``: one-factor block)."""
        return self._vectors()[1]

    def eigenvalues(self) -> torch.Tensor:
        """``(num_params,)`` the block's GGN eigenvalues ``beta[k, j] alpha[k, i]`` (clamped at 0), flat."""
        beta = self.out_vals.clamp_min(0.0)
        if self.in_vals is None:
            return beta.reshape(-1)
        alpha = self.in_vals.clamp_min(0.0)
        return (beta.expand(alpha.shape[0], beta.shape[1])[:, :, None] * alpha[:, None, :]).reshape(-1)


def _shared_out_factors(curvature: KronCurvature) -> dict[str, str]:
    """``{weight block: bias block}`` for the weights whose output factor equals their bias block's matrix (one
    position: ``KronBlock`` s store the same sums apart); checked on the values, with one device read in all."""
    pairs = []
    for name, block in curvature.blocks.items():
        prefix = name[: -len("weight")]
        bias = curvature.blocks.get(f"{prefix}bias")
        if (name.endswith("weight") and block.layout == "kron" and bias is not None
                and bias.out_factors.shape == block.out_factors.shape):
            pairs.append((name, bias.name))
    if not pairs:
        return {}
    equal = torch.stack([(curvature.blocks[w].out_factors == curvature.blocks[b].out_factors).all()
                         for w, b in pairs])
    return {w: b for (w, b), same in zip(pairs, equal.tolist()) if same}


class EigenvalueMemo:
    """Eigenvalues of the factors earlier decompositions computed, one entry per block side (the latest), each
    under a SHA-256 fingerprint of the factor's bytes, shape and dtype, the jitter and the device decomposing it.

    A decomposition given the memo (:meth:`KronDecomposition.from_curvature`) takes the eigenvalues of a factor
    of at least ``MEMO_MIN_SIZE`` rows from it when the fingerprints match, so they are those LAPACK gave for the
    same matrix; it decomposes the others and records them. ``hits`` counts the factors taken from the memo.
    Hashing costs about 0.75 ms per MiB on the CPU (3 ms for a ``1024 x 1024`` float32 factor, whose
    eigenvalues take about 115 ms); CUDA factors are copied to the host to be hashed.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, torch.Tensor]] = {}
        self.hits = 0

    @staticmethod
    def fingerprint(matrix: torch.Tensor, jitter: float, device: torch.device) -> bytes:
        """SHA-256 of ``matrix`` (its values, shape and dtype), ``jitter`` and the decomposing device type."""
        values = matrix.detach().contiguous().cpu()
        digest = hashlib.sha256(f"{tuple(values.shape)} {values.dtype} {jitter!r} {device.type}".encode())
        digest.update(memoryview(values.reshape(-1).view(torch.uint8).numpy()))
        return digest.digest()

    def get(self, key: str, fingerprint: bytes) -> torch.Tensor | None:
        """The eigenvalues recorded for ``key`` under ``fingerprint``, else ``None``."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != fingerprint:
            return None
        self.hits += 1
        return entry[1]

    def put(self, key: str, fingerprint: bytes, eigenvalues: torch.Tensor) -> None:
        """Record ``eigenvalues`` for ``key`` (replacing an earlier entry)."""
        self._entries[key] = (fingerprint, eigenvalues)

    def state_dict(self) -> dict[str, tuple[bytes, torch.Tensor]]:
        """The entries, ``{key: (fingerprint, eigenvalues on the CPU)}``, for a checkpoint (``hits`` is not kept)."""
        return {key: (fingerprint, vals.cpu()) for key, (fingerprint, vals) in self._entries.items()}

    def load_state_dict(self, state: dict[str, tuple[bytes, torch.Tensor]]) -> None:
        """Replace the entries with those of :meth:`state_dict` (the eigenvalues move to the factors' device when
        they are taken)."""
        self._entries = {key: (bytes(fingerprint), vals) for key, (fingerprint, vals) in state.items()}


def _eigenvalues(matrices: list[torch.Tensor], labels: list[str], jitter: float, device: torch.device | None,
                 memo: EigenvalueMemo | None = None) -> list[torch.Tensor]:
    """Eigenvalues ``(k_m, n_m)`` of every stack of factors ``matrices[m] (k_m, n_m, n_m)`` (float64, on the
    matrices' own device), one batched ``eigvalsh`` per size ``n`` (per ``_EIG_ELEMENTS`` entries); with a
    ``memo``, those of unchanged factors of ``MEMO_MIN_SIZE`` rows or more come from it (keyed by ``labels[m]``).
    Checked once: a factor with non-finite entries or eigenvalues, or in a batched call that failed, is
    decomposed alone with a jittered retry (:func:`_decompose_one`, whose error names ``labels[m]``)."""
    found: list[torch.Tensor | None] = [None] * len(matrices)
    fingerprints: dict[int, bytes] = {}
    if memo is not None:
        for m, matrix in enumerate(matrices):
            if matrix.shape[-1] >= MEMO_MIN_SIZE:
                fingerprints[m] = memo.fingerprint(matrix, jitter, matrix.device if device is None else device)
                found[m] = memo.get(labels[m], fingerprints[m])
    by_size: dict[tuple[int, int], list[int]] = {}  # (size, chunk): at most _EIG_ELEMENTS entries per call
    filled: dict[int, int] = {}
    for m, matrix in enumerate(matrices):
        if found[m] is not None:
            continue
        n = matrix.shape[-1]
        filled[n] = filled.get(n, 0) + matrix.numel()
        by_size.setdefault((n, (filled[n] - 1) // _EIG_ELEMENTS), []).append(m)
    checks: list[tuple[int, torch.Tensor]] = []  # (factor, finite input and output)
    failed: list[int] = []
    for members in by_size.values():
        stack = _symmetric([matrices[m] for m in members], device)
        # LAPACK may return finite values for a NaN input. A sum is finite unless an entry is not (or it overflows:
        # then the factor is checked alone, entry by entry), and costs a third of an entry-wise check.
        finite_in = torch.isfinite(stack.sum((-2, -1)))
        try:
            vals = cpu_linalg.eigvalsh(stack)
        except (torch.linalg.LinAlgError, RuntimeError):
            failed.extend(members)
            continue
        finite = finite_in & torch.isfinite(vals).all(-1)
        counts = [matrices[m].shape[0] for m in members]
        for m, part, ok in zip(members, vals.split(counts), finite.split(counts)):
            found[m] = part
            checks.append((m, ok.all()))
    if checks:
        finite = torch.stack([ok for _, ok in checks]).tolist()  # the one device read
        failed.extend(m for (m, _), ok in zip(checks, finite) if not ok)
    for m in sorted(failed):
        found[m] = _decompose_one(_symmetric([matrices[m]], device), labels[m], jitter, False)[0]
    found = [vals.to(matrices[m].device) for m, vals in enumerate(found)]
    for m, fingerprint in fingerprints.items():
        memo.put(labels[m], fingerprint, found[m])
    return found


class KronDecomposition:
    """Eigenvalues of every factor of a :class:`~kfac.curvature.KronCurvature` (computed once; see the module
    docstring for what is computed how)."""

    def __init__(self, names: list[str], eigen: list[BlockEigen], n_data: int, loss) -> None:
        self.block_names = list(names)
        self.eigen = list(eigen)
        self.n_data = n_data
        self.loss = loss
        self._eigenvalues: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None

    @classmethod
    def from_curvature(cls, curvature: KronCurvature, jitter: float = 1e-10,
                       device: torch.device | str | None = None,
                       memo: EigenvalueMemo | None = None) -> KronDecomposition:
        """Decompose every factor of ``curvature`` (on ``device``, default: the factors' own; the eigenvalues
        come back to the factors' device), taking those of factors unchanged since an earlier decomposition from
        ``memo`` and recording the others there (:class:`EigenvalueMemo`). A factor with non-finite entries, or
        one whose decomposition fails twice (the second time with ``jitter`` times its mean absolute diagonal
        added), raises :class:`CurvatureError` naming the block."""
        device = None if device is None else torch.device(device)
        shared = _shared_out_factors(curvature)
        matrices: list[torch.Tensor] = []
        labels: list[str] = []
        where: dict[tuple[str, str], int] = {}
        for name in curvature.block_names:
            b, a = curvature.scaled_factors(name)
            for side, factor in (("output", b), ("input", a)):
                if factor is None or (side == "output" and name in shared):
                    continue
                where[name, side] = len(matrices)
                matrices.append(factor)
                labels.append(f"block {name} ({side}-side factor)")
        vals = _eigenvalues(matrices, labels, jitter, device, memo)
        eigen = []
        for name in curvature.block_names:
            out_vals = vals[where[shared.get(name, name), "output"]]
            in_vals = vals[where[name, "input"]] if (name, "input") in where else None
            factors = lambda name=name: curvature.scaled_factors(name)  # noqa: E731
            eigen.append(BlockEigen(out_vals, in_vals, curvature.blocks[name].num_params(), factors, name, jitter))
        return cls(curvature.block_names, eigen, curvature.n_data, curvature.loss)

    def num_params(self) -> list[int]:
        """Parameter count of every block (in ``block_names`` order)."""
        return [e.num_params for e in self.eigen]

    def _check_delta(self, delta: torch.Tensor) -> torch.Tensor:
        delta = torch.as_tensor(delta)
        if delta.dim() == 0:
            delta = delta.expand(len(self.eigen))
        if delta.shape != (len(self.eigen),):
            raise ValueError(f"delta must have one entry per block ({len(self.eigen)}), got {tuple(delta.shape)}")
        return delta

    def eigenvalues(self) -> torch.Tensor:
        """``(sum_l num_params_l,)`` every block's GGN eigenvalues (clamped at 0), block after block in
        ``block_names`` order (formed once, then cached); :meth:`segment_lengths` says where each block ends."""
        if self._eigenvalues is None:
            self._eigenvalues = torch.cat([e.eigenvalues() for e in self.eigen])
        return self._eigenvalues

    def block_eigenvalues(self, index: int) -> torch.Tensor:
        """``(num_params,)`` the GGN eigenvalues of block ``index``: a view of :meth:`eigenvalues`."""
        start = sum(self.num_params()[:index])
        return self.eigenvalues()[start : start + self.eigen[index].num_params]

    def segment_lengths(self) -> torch.Tensor:
        """``(n_blocks,)`` int64 on the eigenvalues' device: the number of eigenvalues of each block (made once;
        every length is positive and they sum to the number of eigenvalues, so :func:`segment_sum` may skip
        its checks)."""
        if self._lengths is None:
            self._lengths = torch.tensor(self.num_params(), device=self.eigen[0].out_vals.device)
        return self._lengths

    def _reduce(self, delta: torch.Tensor, fn) -> torch.Tensor:
        delta = self._check_delta(delta)
        lam = self.eigenvalues()
        lengths = self.segment_lengths()
        shifted = delta.to(lam).repeat_interleave(lengths, output_size=lam.numel())
        return segment_sum(fn(lam, shifted), lengths)

    def logdet(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-block ``log det(GGN_l + delta_l I)``, ``(n_blocks,)``, differentiable in ``delta``."""
        return self._reduce(delta, lambda lam, d: torch.log(lam + d))

    def effective_params(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-block MacKay effective parameter count ``sum lambda / (lambda + delta_l)``, ``(n_blocks,)``."""
        return self._reduce(delta, lambda lam, d: lam / (lam + d))


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(S,)`` sums of the consecutive segments of ``values (P,)`` with positive ``lengths (S,)`` summing to
    ``P`` (the caller's guarantee: ``torch.segment_reduce`` is told to skip its own checks, two device reads);
    differentiable in ``values``."""
    return torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True)
