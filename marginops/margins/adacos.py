"""AdaCos: the parameter-free scale of the cosine logits, fixed or adapted per step.

Zhang et al., "AdaCos: Adaptively Scaling Cosine Logits for Effectively
Learning Deep Face Representations", CVPR 2019.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = ["AdaCos"]


class AdaCos(nn.Module):
    r"""The AdaCos scale ``s``, as a scale policy: pass it where a scale goes.

    **Fixed** (``dynamic=False``): ``s = sqrt(2) * log(C - 1)`` (the paper's eq. 15).

    **Dynamic** (``dynamic=True``, the default): starting from the fixed value,
    after every training step

    .. math::
        B_{avg} = \frac{1}{N} \sum_{i} \sum_{j \ne y_i} e^{s \cos\theta_{ij}},\qquad
        s \leftarrow \frac{\log B_{avg}}{\cos\big(\min(\pi/4,\ \theta_{med})\big)}

    (the paper's eq. 16), with ``N`` the rows of the batch that are not ignored,
    ``s`` the scale the step used and ``theta_med`` the median target angle
    ``acos(t_i)`` over those rows (``torch.nanmedian``: the lower of the two middle
    values for an even count). No pass over the classes is added: ``log B_avg``
    is the log-mean-exp of the per-row non-target log-sum-exps that the fused
    pass computes anyway, at the scale of the step.

    **One-step lag.** The paper computes ``B_avg`` of batch ``t`` at the previous
    scale and uses the new scale on batch ``t`` itself, which needs a second pass
    over the classes. Here the statistics of step ``t`` set the scale of step
    ``t + 1``. Steps whose result is not finite or not positive (e.g. every row
    ignored, or ``B_avg <= 1``) keep the scale.

    The scale updates only in training mode (``module.train()``; a
    :class:`~marginops.MarginHead` that owns it passes its mode on) and with
    ``dynamic=True``. Each call in training mode appends the scale it used to
    :attr:`history` (a plain list, one float per call: clear it at will);
    :attr:`scale` (a float64 buffer, saved in ``state_dict``)
    holds the one the next call will use. The fused operators take the scale
    as a static option, so each training call reads it on the host: one device
    synchronisation per step on GPUs (the update itself runs on the device).

    Args:
        num_classes (int): ``C >= 3`` (``log(C - 1)`` must be positive).
        dynamic (bool): adapt the scale per step. Default: True.

    Examples::

        >>> import torch, marginops as mo
        >>> head = mo.MarginHead(128, 10_000, scale=mo.AdaCos(10_000))      # no margin, as in the paper
        >>> loss = head(torch.randn(32, 128), torch.randint(0, 10_000, (32,)))
        >>> head.scale.history                                             # the scale each step used
        [13.025...]
    """

    scale: Tensor

    def __init__(self, num_classes: int, *, dynamic: bool = True):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
        if num_classes < 3:
            raise ValueError(f"num_classes must be >= 3 for AdaCos (its scale sqrt(2) log(C - 1) must be "
                             f"positive), got {num_classes!r}")
        if not isinstance(dynamic, bool):
            raise TypeError(f"dynamic must be a bool, got {dynamic!r}")
        self.num_classes = int(num_classes)
        self.dynamic = dynamic
        self.register_buffer("scale", torch.tensor(self.fixed_scale(self.num_classes), dtype=torch.float64))
        self.history: list[float] = []

    @staticmethod
    def fixed_scale(num_classes: int) -> float:
        """``sqrt(2) * log(C - 1)``."""
        return math.sqrt(2.0) * math.log(num_classes - 1)

    @property
    def updating(self) -> bool:
        return self.dynamic and self.training

    def scale_for_step(self, num_classes: int) -> float:
        """The scale of this call (recorded in :attr:`history` in training mode)."""
        if num_classes != self.num_classes:
            raise ValueError(f"AdaCos was built for num_classes = {self.num_classes}, but the weight has "
                             f"{num_classes} classes")
        s = float(self.scale)
        if self.training:
            self.history.append(s)
        return s

    @torch.no_grad()
    def observe(self, nontarget_lse: Tensor, target_cos: Tensor, valid: Tensor) -> None:
        """Set the next scale from one step's per-row statistics (no-op unless :attr:`updating`).

        Args:
            nontarget_lse: ``(B,)`` ``log sum_{j != y_i} exp(s cos_ij)`` at the scale the step ran with.
            target_cos: ``(B,)`` target cosines ``t_i``.
            valid: ``(B,)`` bool, rows that are not ignored.
        """
        if not self.updating:
            return
        n = valid.sum()
        lse = torch.where(valid, nontarget_lse.double(), torch.full_like(nontarget_lse, -math.inf, dtype=torch.float64))
        log_b_avg = torch.logsumexp(lse, 0) - torch.log(n.double())
        theta = torch.acos(target_cos.double().clamp(-1.0, 1.0))
        theta_med = torch.nanmedian(torch.where(valid, theta, torch.full_like(theta, math.nan)))
        new = log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))
        ok = torch.isfinite(new) & (new > 0)
        self.scale.copy_(torch.where(ok, new, self.scale.to(new.device)).to(self.scale.device))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dynamic={self.dynamic}, scale={float(self.scale):.4g}"
