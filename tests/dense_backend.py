"""A dense backend for tests: the backend contract computed with the whole ``B x C_local`` logits matrix.

It implements :class:`marginops.backends.interface.Backend` the obvious way,
per-row scales (``Call.row_scale``), class ranges and both strategies
included, so that the operators of :mod:`marginops.ops` (the per-row scale's
gradient, the workspace hand-over, the sharded combination) can be tested
end to end before the fused backends implement per-row scales. Sub-centres,
inter-class filtering and gradient filtering are refused. Registered as
``backend="dense"`` by :func:`register`; tests only, tiny problems only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import marginops as mo
from marginops.backends.common import acc_dtype, clamped, normalize_backward
from marginops.backends.interface import Call, FusedOptions, RowStats

NAME = "dense"


def register() -> None:
    mo.register_backend(NAME, __name__)


def _refuse(opts: FusedOptions) -> None:
    for name, on in (("sub-centres", opts.sub_centers > 1),
                     ("inter-class filtering", opts.filter_threshold is not None),
                     ("gradient filtering", opts.gradient_filter is not None)):
        if on:
            raise NotImplementedError(f"the dense test backend does not do {name}")


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    return acc_dtype(x_dtype, W_dtype)


def uses_workspace(B: int, C: int, D: int, x_dtype, W_dtype, opts: FusedOptions) -> bool:
    if opts.strategy == "workspace":
        opts.require_full_range(C)
    return (B > 0 and opts.strategy != "recompute" and opts.reduce and (opts.need_x or opts.need_W)
            and opts.is_full_range(C))


def _logits(call: Call):
    """``(xh, wh, scale (B, 1), logits, target)``: the range's logits and where each row's target sits."""
    opts = call.opts
    _refuse(opts)
    acc = acc_dtype(call.x.dtype, call.W.dtype)
    xh, wh = call.x.to(acc), call.W.to(acc)
    if call.inv_x is not None:
        xh, wh = xh * call.inv_x.unsqueeze(1), wh * call.inv_w.unsqueeze(1)
    scale = torch.full((len(xh), 1), opts.scale, dtype=acc)
    if call.row_scale is not None:
        scale = scale * call.row_scale.to(acc).unsqueeze(1)
    logits = scale * (xh @ wh.T)
    local = call.y - opts.class_start
    columns = torch.arange(wh.shape[0]).unsqueeze(0)
    return xh, wh, scale, logits, columns == local.unsqueeze(1)


def forward_stats(call: Call) -> RowStats:
    opts = call.opts
    xh, wh, scale, logits, target = _logits(call)
    others = logits.masked_fill(target, float("-inf"))
    empty = torch.zeros(0, dtype=logits.dtype)
    best, arg = empty, torch.zeros(0, dtype=torch.long)
    if opts.want_prediction:
        if wh.shape[0]:
            best, arg = logits.max(1)  # the first maximum
        else:
            best = torch.full((len(xh),), float("-inf"), dtype=logits.dtype)
            arg = torch.zeros(len(xh), dtype=torch.long)
        arg = arg + opts.class_start
    total = others.masked_fill(target, 0.0).sum(1) if opts.label_smoothing > 0 else empty
    return RowStats(torch.logsumexp(others, 1), best, arg, total)


def _grads(call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    opts = call.opts
    xh, wh, scale, logits, target = _logits(call)
    p = torch.exp(logits - lse.unsqueeze(1)) - opts.label_smoothing / opts.total_classes(wh.shape[0])
    G = (g.unsqueeze(1) * scale * p).masked_fill(target, 0.0)
    dxh = G @ wh if opts.need_x else None
    dW = None
    if opts.need_W:
        dW = G.T @ xh
        if call.inv_w is not None:
            dW = normalize_backward(wh, call.inv_w, clamped(call.inv_w, opts.eps), dW)
    return dxh, dW


def forward_with_grads(call: Call, z: Tensor, g: Tensor):
    stats = forward_stats(call)
    return (stats, *_grads(call, torch.logaddexp(stats.lse, z), g))


def recompute_grads(call: Call, lse: Tensor, g: Tensor):
    return _grads(call, lse, g)
