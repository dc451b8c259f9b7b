"""Gram kernels and the KFAC-expand / KFAC-reduce statistics of a weight shared over positions.

Notation: ``x`` is a module's input recorded in the forward pass, ``a_{n,t}`` its patch (the input row) at
output position ``t`` of sample ``n``, and ``g_{d,n,t}`` the output gradient of loss-Hessian square-root
direction ``d`` there. Output-side statistics are accumulated chunk by chunk over the directions while the
backward runs (sums, and "any"s for the used positions); input factors are formed at the end. All factors are
*raw sums over the batch* (see :mod:`kfac.curvature` for how ``1 / n_data`` is applied).

KFAC-expand (Grosse & Martens 2016; Eschenhagen et al. 2023) treats every output position like an extra
sample,

    A = sum_n mean_{t in T_n} a_{n,t} a_{n,t}^T,        B = sum_{d,n,t} g_{d,n,t} g_{d,n,t}^T,

so that ``(1/N) B (x) A`` approximates ``sum_{n,t} (a a^T) (x) (g g^T)``. Position normalisation
(``position_norm``): ``"used"`` (default) takes ``T_n`` = the positions of sample ``n`` whose output gradient
is non-zero in some direction/channel (so sites discarded downstream, e.g. by polyphase subsampling, are not
counted; a sample with no such position averages over all positions); ``"all"`` takes every output position
(identical to curvlinops' ``expand``). With a single (used) position and one sample the rule is exact.

``kfac_approx="reduce"`` (KFAC-reduce, Eschenhagen et al. 2023) instead reduces the positions before the outer
products, over every position axis the rule would expand over (all ``P`` positions; ``position_norm`` does not
apply):

    A = sum_n abar_n abar_n^T,  abar_n = mean_t a_{n,t},        B = sum_{d,n} gsum_{d,n} gsum_{d,n}^T,  gsum = sum_t g,

identical to curvlinops' ``reduce``. ``B`` is then the exact bias block (formed once for both). It is exact
where every position's output gradient is the same linear map of the loss, e.g. a deep linear network of
circular stride-1 convolutions followed by global pooling, with the MSE loss.

Biases are always exact: ``B_bias = sum_{d,n} (sum_t g_{d,n,t}) (sum_t g_{d,n,t})^T``, summing the output
gradient over every position that shares the bias before the outer product.

Symmetric products wider than ``_SYM_BLOCK`` (wide output and bias factors) are accumulated block-wise, lower
block triangle only, and mirrored (:func:`mirror_lower`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kfac.curvature import KronBlock
from kfac.options import RuleOptions
from kfac.patches import ConvWindows, Patches

_CHUNK_ELEMENTS = 1 << 23  # bound on temporaries of the batched Gram products
_CAT_ELEMENTS = 1 << 23  # row sets up to this size (32 MiB in float32) are concatenated into one Gram product
_SYM_BLOCK = 256  # symmetric products wider than this are computed block-wise, lower block triangle only
_MAX_BLOCKS = 16  # at most this many blocks per side (136 block products, 53% of the full product's work)


def _gram(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(M, d) -> (d, d)``: ``rows^T rows``, added onto ``out`` in place if given."""
    return rows.T @ rows if out is None else out.addmm_(rows.T, rows)


def _block_edges(d: int) -> list[int]:
    """Boundaries of about ``_SYM_BLOCK``-wide blocks of ``range(d)``, wider ones when that would make more than
    ``_MAX_BLOCKS`` (a 10,240-wide factor: 16 blocks of 640, not 40 of 256, so 136 block products per sum)."""
    n_blocks = min(-(-d // _SYM_BLOCK), _MAX_BLOCKS)
    return [round(i * d / n_blocks) for i in range(n_blocks + 1)]


def _lower_gram(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Add the lower block triangle of ``rows^T rows`` for ``rows (M, d)`` or a batch ``(G, M, d)`` (any strides)
    onto ``out (d, d)`` / ``(G, d, d)`` (zeros if ``None``) in place; blocks strictly above the diagonal are left
    untouched (see :func:`mirror_lower`).

    The result is symmetric, so for ``k`` blocks only ``k (k + 1) / 2`` of the ``k^2`` block products are needed
    (62.5% of the operations for ``k = 4``); every block product reads column slices of ``rows`` in place, and a
    batch takes one batched product per block pair (no loop over ``G``).
    """
    d = rows.shape[-1]
    out = rows.new_zeros(*rows.shape[:-2], d, d) if out is None else out
    edges = _block_edges(d)
    for i in range(len(edges) - 1):
        rows_i = rows[..., edges[i] : edges[i + 1]].transpose(-1, -2)
        for j in range(i + 1):
            block = out[..., edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            cols = rows[..., edges[j] : edges[j + 1]]
            block.addmm_(rows_i, cols) if rows.dim() == 2 else block.baddbmm_(rows_i, cols)
    return out


def mirror_lower(out: torch.Tensor) -> torch.Tensor:
    """Complete ``(..., d, d)`` matrices of which :func:`_lower_gram` filled the lower block triangle, in place."""
    edges = _block_edges(out.shape[-1])
    for i in range(len(edges) - 1):
        for j in range(i):
            lower = out[..., edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            out[..., edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = lower.transpose(-1, -2)
    return out


def _batched_gram(grads: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_n grads[n] grads[n]^T`` for ``(N, d, P)`` -> ``(d, d)``, added onto ``out`` in place if given.

    Few long rows (``d <= P``): chunked ``bmm`` + sum (no copy of the input). Many short rows: one product of
    the ``(N*P, d)`` transpose (a ``(N, d, d)`` temporary would be larger than the input).
    """
    n, d, n_pos = grads.shape
    if d > n_pos:
        return _gram(grads.transpose(1, 2).reshape(-1, d), out)
    step = max(1, _CHUNK_ELEMENTS // max(1, d * d))
    total = grads.new_zeros(d, d) if out is None else out
    for start in range(0, n, step):
        part = grads[start : start + step]
        total += torch.bmm(part, part.transpose(1, 2)).sum(0)
    return total


def _group_major(rows: torch.Tensor) -> torch.Tensor:
    """``(M, G, d) -> (G, M, d)``: a view for wide ``d`` (block products read it in place), a copy for narrow
    ``d`` (one product, and ``bmm`` copies strided batch entries one by one otherwise)."""
    grouped = rows.transpose(0, 1)
    return grouped if rows.shape[-1] > _SYM_BLOCK else grouped.contiguous()


def _joined(held: list[torch.Tensor]) -> torch.Tensor:
    """Row sets ``(M_i, d)`` or ``(M_i, G, d)`` -> ``(M, d)`` or the group-major ``(G, M, d)`` (:func:`_group_major`)
    with at most one copy: narrow group-major rows are joined straight into that layout."""
    if held[0].dim() == 3 and len(held) > 1 and held[0].shape[-1] <= _SYM_BLOCK:
        return torch.cat([rows.transpose(0, 1) for rows in held], dim=1)
    rows = held[0] if len(held) == 1 else torch.cat(held)
    return rows if rows.dim() == 2 else _group_major(rows)


def per_group_gram(grads: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``(D, B, G, O) -> (G, O, O)``: ``sum_{d,n} g g^T`` per group, added onto ``out`` in place if given.

    Wide (``O > _SYM_BLOCK``): lower block triangle only (:func:`_lower_gram`, batched over the groups; complete
    it with :func:`mirror_lower`); narrow: one batched product of a group-major copy (complete).
    """
    n_dirs, batch, groups, d_out = grads.shape
    return _lower_gram(_group_major(grads.reshape(n_dirs * batch, groups, d_out)), out)


def _nonzero_somewhere(grads: torch.Tensor) -> torch.Tensor:
    """``(D, B, O, P) -> (B, P)`` bool: some direction or output channel is non-zero at ``(n, t)``."""
    # two reductions over the channel axis (vectorised along the positions) and no full-size temporary
    return ((grads.amax(2) != 0) | (grads.amin(2) != 0)).any(0)


class UsedPositions:
    """``(B, P)`` bool, accumulated chunk by chunk: positions where some direction or output channel of the
    output gradients ``(D, B, O, P)`` is non-zero.

    The first direction is scanned; the positions that are zero there (usually none, unless sites are discarded
    downstream) are then looked up in the later directions: gathered when they are few, scanned when they are
    many.
    """

    def __init__(self) -> None:
        self._used: torch.Tensor | None = None
        self._scan = False
        self._sample = self._site = self._found = None

    def add(self, grads: torch.Tensor) -> None:
        """Take the gradients ``(D_i, B, O, P)`` of some more directions."""
        if self._used is None:
            self._used = _nonzero_somewhere(grads[:1])
            unknown = (~self._used).nonzero()  # (U, 2): sample and position
            self._scan = 8 * unknown.shape[0] > self._used.numel()
            self._sample, self._site = unknown[:, 0], unknown[:, 1]
            self._found = torch.zeros(unknown.shape[0], dtype=torch.bool, device=grads.device)
            grads = grads[1:]
        if grads.shape[0] == 0 or self._sample.numel() == 0:
            return
        if self._scan:
            self._used |= _nonzero_somewhere(grads)
        else:
            self._found |= grads[:, self._sample, :, self._site].ne(0).any(2).any(1)  # (U, D_i, O) -> (U,)

    def result(self) -> torch.Tensor:
        """The used positions ``(B, P)`` of all directions added so far."""
        used = self._used.clone()
        if not self._scan and self._sample.numel():
            used[self._sample, self._site] = self._found
        return used


@dataclass(frozen=True, eq=False)
class SampleWeights:
    """Position weights that are constant over the counted positions of each sample:
    ``w[n, t] = scale[n]`` where ``used[n, t]``, else 0; ``scale (B,)``, ``used (B, P)`` bool."""

    scale: torch.Tensor
    used: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The weights as a ``(B, P)`` tensor."""
        return self.used.to(self.scale.dtype) * self.scale[:, None]


def sample_weights(used: torch.Tensor, dtype: torch.dtype) -> SampleWeights | None:
    """Position weights ``1/|T_n|`` on the used positions ``used (B, P)`` of each sample (a sample without used
    positions counts all of them), or ``None`` when every position is used (uniform ``1/P``)."""
    n_pos = used.shape[1]
    count = used.sum(1)
    if bool((count == n_pos).all()):
        return None
    empty = count == 0
    used = used | empty[:, None]
    count = torch.where(empty, torch.full_like(count, n_pos), count)
    return SampleWeights(1.0 / count.to(dtype), used)


def input_factor(patches: Patches, weights: torch.Tensor | SampleWeights | None) -> torch.Tensor:
    """``A = sum_{n,t} w[n,t] a_{n,t} a_{n,t}^T`` from patches ``(B, Din, P)`` and weights ``(B, P)``.

    ``weights=None`` means ``w = 1/P`` everywhere. :class:`SampleWeights` (constant per sample on the counted
    positions, as :meth:`ExpandStats.weights` gives) take :func:`_sample_factor`. General weights: one matrix
    product over the ``(Din, B*P)`` columns, which is a free view when the patches are stored ``(Din, B, P)``
    (as :meth:`ConvWindows.dense` stores them) or ``(B, P, Din)`` (linear layers); when at most half the
    positions have non-zero weight (e.g. after polyphase subsampling) only the others enter the product
    (gathered straight from the windows for convolutions).
    """
    if isinstance(weights, SampleWeights):
        return _sample_factor(patches, weights)
    if weights is None and isinstance(patches, ConvWindows):
        return patches.sample_gram()
    flat = None if weights is None else weights.reshape(-1)
    keep = None if flat is None else flat.nonzero()[:, 0]
    if keep is not None and 2 * keep.numel() <= flat.numel():
        return _gram_at(patches, keep, flat[keep])
    dense = patches.dense() if isinstance(patches, ConvWindows) else patches
    batch, d_in, n_pos = dense.shape
    cols = dense.permute(1, 0, 2).reshape(d_in, batch * n_pos)
    if flat is None:
        return (cols @ cols.T) / n_pos
    return (cols * flat) @ cols.T


def _gram_at(patches: Patches, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_u weights[u] a_u a_u^T`` over the patches at flat positions ``index (U,)`` (sample-major)."""
    if isinstance(patches, ConvWindows):
        return patches.gram_at(index, weights)
    batch, d_in, n_pos = patches.shape
    kept = patches.permute(1, 0, 2).reshape(d_in, batch * n_pos).index_select(1, index)
    return (kept * weights) @ kept.T


def _sample_factor(patches: Patches, weights: SampleWeights) -> torch.Tensor:
    """``A`` for weights ``scale[n]`` on the used positions: the used positions gathered when they are at most
    half, else every position (:meth:`ConvWindows.sample_gram`: no full-size weighting, circular convolutions
    by FFT) minus the few unused ones, gathered."""
    used = weights.used.reshape(-1)
    n_pos = weights.used.shape[1]
    unused = (~used).nonzero()[:, 0]
    if 2 * unused.numel() >= used.numel():
        keep = used.nonzero()[:, 0]
        return _gram_at(patches, keep, weights.scale[keep // n_pos])
    if isinstance(patches, ConvWindows):
        full = patches.sample_gram(weights.scale)
    else:
        batch, d_in, _ = patches.shape
        cols = patches.permute(1, 0, 2).reshape(d_in, batch * n_pos)
        full = (cols * weights.scale.repeat_interleave(n_pos)) @ cols.T
    if unused.numel():
        full = full - _gram_at(patches, unused, weights.scale[unused // n_pos])
    return full


class RowsGram:
    """``sum_i rows_i^T rows_i`` over row sets ``(M_i, d)`` added one by one, or per group over ``(M_i, G, d)``
    (then ``(G, d, d)``): small sets are held and joined into one product (products of a few hundred rows are
    dominated by call overhead, and longer ones run faster), at most ``_CAT_ELEMENTS`` elements at a time;
    lower block triangle only, mirrored in :meth:`result`."""

    def __init__(self) -> None:
        self._held: list[torch.Tensor] = []
        self._size = 0
        self._total: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Take one more row set ``(M_i, d)`` or ``(M_i, G, d)``."""
        self._held.append(rows)
        self._size += rows.numel()
        if self._size > _CAT_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if self._held:
            self._total = _lower_gram(_joined(self._held), self._total)
            self._held, self._size = [], 0

    def result(self) -> torch.Tensor:
        """The ``(d, d)`` (or ``(G, d, d)``) sum of all row sets added."""
        self._flush()
        return mirror_lower(self._total)


class ExpandStats:
    """What KFAC-expand needs from the output gradients ``(D, B, O, P)``, accumulated chunk by chunk: the output
    factor ``B = sum_{d,n,t} g g^T`` and the used positions (``position_norm="used"``) for the weight, the rows
    ``sum_t g`` of the exact bias block ``sum_{d,n} (sum_t g)(sum_t g)^T``. With one position (``P = 1``) and a
    bias, the weight's output factor is the bias block (the same rows), formed once."""

    def __init__(self, weight: bool, bias: bool, position_norm: str) -> None:
        self.weight, self.bias = weight, bias
        self._used = UsedPositions() if weight and position_norm == "used" else None
        self._out: torch.Tensor | RowsGram | None = None
        self._bias_rows = RowsGram() if bias else None
        self._n_pos = 0
        self._dtype: torch.dtype | None = None

    def add(self, grads: torch.Tensor) -> None:
        """Take the gradients ``(D_i, B, O, P)`` of some more directions."""
        _, _, d_out, n_pos = grads.shape
        self._n_pos, self._dtype = n_pos, grads.dtype
        if self.weight and n_pos > 1:
            if self._used is not None:
                self._used.add(grads)
            self._out = _batched_gram(grads.reshape(-1, d_out, n_pos), self._out)
        elif self.weight and not self.bias:  # one position: the rows themselves (with a bias: its rows, below)
            self._out = RowsGram() if self._out is None else self._out
            self._out.add(grads.reshape(-1, d_out))
        if self.bias:
            self._bias_rows.add(grads.sum(3).reshape(-1, d_out))

    def weights(self) -> SampleWeights | None:
        """Position weights of the input factor (``None``: uniform ``1/P``)."""
        if self._used is None or self._n_pos == 1:
            return None
        return sample_weights(self._used.result(), self._dtype)

    def blocks(self, prefix: str, module: nn.Module, patches: Callable[[], Patches]) -> dict[str, KronBlock]:
        """Weight (KFAC-expand, input factor from ``patches() (B, Din, P)``) and exact bias blocks."""
        blocks: dict[str, KronBlock] = {}
        bias = self._bias_rows.result() if self.bias else None
        if self.weight:
            a = input_factor(patches(), self.weights())
            if self._n_pos == 1 and self.bias:
                b = bias.clone()  # one position: the bias's rows, formed once, stored apart
            else:
                b = self._out.result() if isinstance(self._out, RowsGram) else self._out
            blocks[f"{prefix}weight"] = KronBlock(f"{prefix}weight", module.weight.shape, "kron", b[None], a[None])
        if self.bias:
            blocks[f"{prefix}bias"] = KronBlock(f"{prefix}bias", module.bias.shape, "single", bias[None])
        return blocks


class ReduceStats:
    """KFAC-reduce: the output gradients ``(D, B, O, P)`` are summed and the patches averaged over the positions
    first, then :class:`ExpandStats` forms the one-position blocks (there the weight's output factor is the exact
    bias block, formed once)."""

    def __init__(self, weight: bool, bias: bool) -> None:
        self._one_position = ExpandStats(weight, bias, "all")

    def add(self, grads: torch.Tensor) -> None:
        """Take the gradients ``(D_i, B, O, P)`` of some more directions."""
        self._one_position.add(grads.sum(3, keepdim=True))

    def blocks(self, prefix: str, module: nn.Module, patches: Callable[[], Patches]) -> dict[str, KronBlock]:
        """Weight (input factor from the mean of ``patches() (B, Din, P)`` over positions) and exact bias blocks."""

        def mean_patches() -> torch.Tensor:  # (B, Din, 1)
            found = patches()
            return found.mean()[:, :, None] if isinstance(found, ConvWindows) else found.mean(2, keepdim=True)

        return self._one_position.blocks(prefix, module, mean_patches)


def position_stats(weight: bool, bias: bool, options: RuleOptions) -> ExpandStats | ReduceStats:
    """The statistics of a weight shared over positions: KFAC-expand or KFAC-reduce (``options.kfac_approx``)."""
    if options.kfac_approx == "reduce":
        return ReduceStats(weight, bias)
    return ExpandStats(weight, bias, options.position_norm)

