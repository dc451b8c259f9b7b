"""KFAC over one batch (``kfac_batch``) and over a loader (``fit_kfac``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kfac.capture import Recorder, check_called, output_gradients
from kfac.curvature import KronBlock, KronCurvature
from kfac.decomposition import CurvatureError
from kfac.options import RuleOptions
from kfac.rules import curvature_modules
from kfac.sqrt_hessian import check_batch, hessian_sqrt, summed_loss


def _cast(block: KronBlock, dtype: torch.dtype | None) -> KronBlock:
    if dtype is None:
        return block
    in_factors = None if block.in_factors is None else block.in_factors.to(dtype)
    return KronBlock(block.name, block.param_shape, block.layout, block.out_factors.to(dtype), in_factors)


def _check_trainable(model: nn.Module) -> None:
    """Raise a ValueError unless ``model`` has a parameter that requires a gradient."""
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters, so it has no KFAC curvature")
    if not any(p.requires_grad for p in params):
        raise ValueError(
            f"all {len(params)} parameter tensors of the model are frozen (requires_grad=False), so there is no "
            "curvature to compute; unfreeze the ones you want with requires_grad_(True)"
        )


def _check_factor_dtype(dtype: torch.dtype | None) -> None:
    """Raise unless ``dtype`` is ``None`` or a floating-point ``torch.dtype``."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"factor_dtype must be a torch.dtype such as torch.float64 (or None), got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"factor_dtype must be a floating-point dtype such as torch.float64, got {dtype}")


def kfac_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str = "classification",
    curvature: str = "ggn",
    *,
    mc_samples: int = 1,
    position_norm: str = "used",
    kfac_approx: str = "expand",
    rank_reduced: bool = True,
    generator: torch.Generator | None = None,
    backward: str = "auto",
    factor_dtype: torch.dtype | None = None,
    **rule_options: str,
) -> KronCurvature:
    """KFAC curvature of one batch ``x (B, ...)``, ``y (B,)`` or ``(B, K)``; ``model(x)`` must be ``(B, K)``.

    One forward pass with recording hooks, a backward of the loss-Hessian square roots to all recorded layer
    outputs (``backward="loop"``: one pass per direction; ``"batched"``: one vmapped pass; ``"auto"``, the
    default: batched on CUDA, where it is 1.7-3x faster, the loop elsewhere, where it is faster; see
    :mod:`kfac.capture`, :mod:`kfac.sqrt_hessian`) whose gradients the per-module rules (:mod:`kfac.rules`)
    reduce as they come, then the rules' blocks. Blocks are returned for every trainable parameter in
    ``model.named_parameters()`` order; an unsupported module owning trainable parameters raises
    ``NotImplementedError``. ``position_norm`` and ``kfac_approx`` (``"expand"`` or ``"reduce"`` over the
    positions a weight is shared across) are the rules' own options (:mod:`kfac.statistics`); ``rule_options``
    are those registered with the rules of other module types (:func:`kfac.options.register_option`).
    ``factor_dtype`` (a floating-point ``torch.dtype`` or ``None``) casts the batch's factors (e.g.
    ``torch.float64`` to accumulate float32 models safely).

    Raises ValueError for a batch without samples or a model without trainable parameters, and
    NotImplementedError for a module owning trainable parameters that the forward pass does not call.
    """
    options = RuleOptions(position_norm=position_norm, kfac_approx=kfac_approx, **rule_options)
    _check_factor_dtype(factor_dtype)
    _check_trainable(model)
    if x.shape[:1] == (0,):
        raise ValueError(f"the batch has no samples (inputs of shape {tuple(x.shape)}); leave empty batches out")
    modules = curvature_modules(model)
    with torch.enable_grad(), Recorder({name: module for name, (module, _) in modules.items()}) as recorder:
        logits = model(x)
    records = list(recorder.records.values())
    check_called(records)  # before the rules read the recorded inputs
    check_batch(logits.detach(), y, likelihood)
    if not bool(torch.isfinite(logits).all()):
        raise CurvatureError("the model output holds NaN or inf values (check the inputs and the parameters), so "
                             "the curvature of this batch would not be finite")
    with torch.no_grad():
        loss = summed_loss(logits.detach(), y, likelihood)
        builders = [
            modules[record.name][1](f"{record.name}." if record.name else "", record.module, record.input, options)
            for record in records
        ]
    seeds = hessian_sqrt(logits, y, likelihood, curvature, mc_samples, rank_reduced, generator)
    if backward == "auto":
        backward = "batched" if logits.is_cuda else "loop"
    with torch.enable_grad():
        output_gradients(logits, records, seeds, lambda i, grads: builders[i].add(grads), backward)
    found: dict[str, KronBlock] = {}
    with torch.no_grad():
        for builder in builders:
            found.update(builder.blocks())
    order = [name for name, p in model.named_parameters() if p.requires_grad]
    blocks = {name: _cast(found[name], factor_dtype) for name in order}
    return KronCurvature(blocks, x.shape[0], loss)


def _batches(loader: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("the loader must yield (inputs, targets) pairs")
        yield batch[0], batch[1]


def fit_kfac(
    model: nn.Module,
    loader: Iterable,
    likelihood: str = "classification",
    curvature: str = "ggn",
    **options,
) -> KronCurvature:
    """KFAC curvature of ``model`` summed over all ``(x, y)`` batches of ``loader`` (factors add).

    ``options`` are the keyword options of :func:`kfac_batch`. Inputs are moved to the device of the model's
    first parameter; the model's train/eval mode is left unchanged. The result records ``n_data`` (number of
    samples seen) and the summed loss at the current parameters.
    """
    _check_trainable(model)
    device = next(model.parameters()).device
    total: KronCurvature | None = None
    for index, (x, y) in enumerate(_batches(loader)):
        if x.shape[:1] == (0,):
            raise ValueError(f"fit_kfac: batch {index} of the loader has no samples (inputs of shape "
                             f"{tuple(x.shape)}); leave empty batches out")
        part = kfac_batch(model, x.to(device), y.to(device), likelihood, curvature, **options)
        total = part if total is None else total.add_(part)  # in place: no new factor tensors per batch
    if total is None:
        raise ValueError("fit_kfac: the loader yielded no batches")
    return total
