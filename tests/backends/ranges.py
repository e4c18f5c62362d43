"""One check for every backend: a weight split into class ranges gives what the whole weight gives.

Used by each backend's tests (``check_ranges_match_whole(module, ...)``), at the
level of the backend interface (:mod:`marginops.backends.interface`): per-range
statistics combined with :func:`combine_stats` against the whole range's, and
per-range gradients given the combined log-sum-exp against the whole range's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from marginops.backends import Call, FusedOptions, combine_stats
from marginops.backends.common import acc_dtype, inverse_norms

from ..conftest import assert_close_to_oracle

#: Three uneven ranges of 37 classes, one of a single class.
BOUNDS_37 = ((0, 5), (5, 6), (6, 37))
#: Labels that sit on every range boundary, with duplicates and an ignored row pointed at class 0.
LABELS_13 = (4, 5, 5, 6, 36, 0, 0, 12, 30, 6, 4, 20, 1)


def split_call(x, W, y, bounds, opts: FusedOptions, row_scale=None):
    """The whole :class:`Call` and one per range of ``bounds``."""
    acc = acc_dtype(x.dtype, W.dtype)
    inv_x = inverse_norms(x, acc) if opts.normalize else None
    inv_w = inverse_norms(W, acc) if opts.normalize else None
    whole = Call(x, W, y, inv_x, inv_w, opts, row_scale)
    k = opts.sub_centers  # rows of W per class
    parts = [Call(x, W[a * k:b * k], y, inv_x, inv_w[a * k:b * k] if inv_w is not None else None,
                  replace(opts, class_start=a, num_classes=W.shape[0] // k), row_scale) for a, b in bounds]
    return whole, parts


def class_logits64(x, W, opts: FusedOptions, row_scale=None) -> torch.Tensor:
    """The float64 margin-free logits ``s_i cos_ij`` (class maxima over sub-centres) the prediction is an
    argmax of."""
    x64, W64 = x.double(), W.double()
    if opts.normalize:
        x64 = x64 / x64.norm(dim=1, keepdim=True).clamp_min(opts.eps)
        W64 = W64 / W64.norm(dim=1, keepdim=True).clamp_min(opts.eps)
    cos = (x64 @ W64.t()).view(x.shape[0], W.shape[0] // opts.sub_centers, opts.sub_centers).amax(2)
    scale = opts.scale * (row_scale.double() if row_scale is not None else torch.ones(x.shape[0], dtype=torch.float64))
    return cos * scale.unsqueeze(1)


def assert_is_argmax(argmax, logits64, slack):
    """Each row's ``argmax`` holds its largest logit up to ``slack`` (ties within rounding may go either way)."""
    if argmax.numel() == 0:
        return
    picked = logits64.gather(1, argmax.unsqueeze(1)).squeeze(1)
    top = logits64.amax(1)
    assert bool((picked >= top - slack * top.abs().clamp_min(1.0)).all()), (argmax, logits64.argmax(1))


def check_ranges_match_whole(module, x, W, y, bounds=BOUNDS_37, *, scale=30.0, label_smoothing=0.1,
                             normalize=True, tol=None, row_scale=None, **options):
    """Statistics (log-sum-exp, max, argmax, logit sum) and both gradients of the split call
    match the whole call's (``tol``: the oracle tolerance for ``x``'s dtype; ``row_scale``: per-row scales
    of the calls; ``options``: more :class:`FusedOptions` fields, e.g. ``chunk_size``, ``filter_threshold``,
    ``sub_centers``: then ``W`` has ``sub_centers`` rows per class and ``bounds`` count classes)."""
    opts = FusedOptions(scale=scale, normalize=normalize, label_smoothing=label_smoothing, reduce=False,
                        want_prediction=True, strategy="recompute", **options)
    whole, parts = split_call(x, W, y, bounds, opts, row_scale)
    ref = module.forward_stats(whole)
    got = combine_stats([module.forward_stats(p) for p in parts])
    assert_close_to_oracle(got.lse, ref.lse.double(), tol=tol, name="combined lse")
    assert_close_to_oracle(got.max, ref.max.double(), tol=tol, name="combined max")
    # both argmaxes hold the largest logit (the ranges' GEMMs may round near-ties differently)
    slack = 1e-12 if x.dtype == torch.float64 else 1e-5
    for argmax in (got.argmax, ref.argmax):
        assert_is_argmax(argmax, class_logits64(x, W, opts, row_scale), slack)
    if label_smoothing > 0:
        assert_close_to_oracle(got.logit_sum, ref.logit_sum.double(), tol=tol,
                               atol=1e-5 * scale * W.shape[0], name="combined logit sum")
    assert ref.lse.shape == (x.shape[0],)
    # backward: every range with the combined log-sum-exp (a margined target logit folded in)
    z = ref.lse.new_empty(ref.lse.shape).uniform_(-scale, scale)
    lse = torch.logaddexp(got.lse, z)
    g = torch.rand_like(lse) + 0.5
    dxh, dW = module.recompute_grads(whole, lse, g)
    pieces = [module.recompute_grads(p, lse, g) for p in parts]
    dxh_split = sum(p[0].to(dxh.dtype) for p in pieces)
    dW_split = torch.cat([p[1] for p in pieces])
    assert dW_split.dtype == dW.dtype
    assert_close_to_oracle(dxh_split, dxh.double(), tol=tol, name="dxh, summed over ranges")
    assert_close_to_oracle(dW_split, dW.double(), tol=tol, name="dW, ranges concatenated")
    return got
