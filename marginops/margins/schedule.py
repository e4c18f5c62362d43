"""Margin warm-up: ramp one parameter of a margin from ``start`` to ``end`` over training steps.

A large margin from the first step often keeps a margin loss from converging;
the usual cure (wespeaker's ``MarginScheduler``) is to begin with a small
margin and raise it over a window of steps. :class:`MarginScheduler` does this
by rewriting ``margin.params[param]``, which every margin reads afresh on each
call ``psi(t)``, so the margin object can stay where it is (passed to
:func:`marginops.margin_cross_entropy` or held by a :class:`marginops.MarginHead`).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

from .zoo import Margin, _check_param, _IntegerAngular

__all__ = ["MarginScheduler", "MODES", "EXP_RATE"]

MODES = ("linear", "exponential")

#: ``k`` of the exponential ramp: ``1 - exp(-k)`` is 0.999, wespeaker's ``1 - final_val / initial_val``.
EXP_RATE = math.log(1000.0)

_SETTINGS = ("param", "start", "end", "warmup_begin", "warmup_end", "mode")


class MarginScheduler:
    r"""Drives ``margin.params[param]`` from ``start`` to ``end`` as training steps advance.

    With ``b = warmup_begin``, ``e = warmup_end`` and ``n`` the number of
    :meth:`step` calls so far, the value at step ``n`` is

    .. math::
        v(n) = \begin{cases}
            \text{end} & n \ge e \\
            \text{start} & n \le b \\
            \text{start} + (\text{end} - \text{start})\, r\!\left(\frac{n - b}{e - b}\right) & b < n < e
        \end{cases}

    with ``r(p) = p`` for ``mode="linear"`` and, for ``mode="exponential"``
    (wespeaker's exponential increase, normalized so it reaches ``end``
    exactly), ``r(p) = (1 - exp(-k p)) / (1 - exp(-k))`` with
    ``k = EXP_RATE = ln 1000``: fast at first, flat near the end
    (``r(1/2) ~ 0.969``). Values stay between ``start`` and ``end`` and move
    monotonically from one to the other (``end < start`` ramps down). Steps
    ``0 .. b`` hold ``start``, so ``warmup_begin`` is the initial hold; when
    ``b == e`` the value jumps from ``start`` to ``end`` at step ``e``.

    The value for step 0 is written into the margin at construction, and each
    :meth:`step` writes the next one, replacing any per-row tensor the
    parameter held by a Python float. A "step" is whatever unit you call
    :meth:`step` in (iterations or epochs).

    ``start`` and ``end`` must be values the margin's constructor accepts for
    ``param`` (checked by building ``type(margin)(param=value)``; every
    parameter's valid set is an interval, so the whole ramp is then valid).
    Margins whose constructor takes no ``param`` keyword only get the
    finiteness check. Integer-parameter margins (:class:`SphereFace`,
    :class:`SimplerASoftmax`) are refused: their ``m`` must stay an integer.

    Args:
        margin (Margin): the margin to drive; modified in place.
        param (str): key of ``margin.params`` to drive. Default: ``"m"``.
        start (float): value up to and including step ``warmup_begin``. Default: 0.0.
        end (float): value from step ``warmup_end`` on.
        warmup_begin (int): last step at ``start``, >= 0. Default: 0.
        warmup_end (int): first step at ``end``, >= ``warmup_begin``.
        mode (str): ``"linear"`` or ``"exponential"``, see above. Default: ``"linear"``.

    Raises:
        TypeError: ``margin`` is not a :class:`Margin`; ``start``/``end`` are not
            real numbers; ``warmup_begin``/``warmup_end`` are not ints.
        ValueError: ``param`` is not in ``margin.params`` (the message lists
            those available); the margin has an integer parameter;
            ``start``/``end`` are not finite or not accepted by the margin;
            ``warmup_begin < 0``; ``warmup_end < warmup_begin``; unknown ``mode``.

    Examples::

        >>> import marginops as mo
        >>> from marginops.schedule import MarginScheduler
        >>> arc = mo.ArcFace(0.5)
        >>> sched = MarginScheduler(arc, start=0.0, end=0.5, warmup_begin=1000, warmup_end=5000)
        >>> arc.params["m"]
        0.0
        >>> for step in range(10):  # training loop
        ...     # loss = mo.margin_cross_entropy(x, W, y, arc, 64.0); ...
        ...     _ = sched.step()
    """

    def __init__(self, margin: Margin, *, param: str = "m", start: float = 0.0, end: float,
                 warmup_begin: int = 0, warmup_end: int, mode: str = "linear") -> None:
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be a marginops.margins.Margin, got {type(margin).__name__}")
        self.margin = margin
        self._configure(dict(param=param, start=start, end=end, warmup_begin=warmup_begin,
                             warmup_end=warmup_end, mode=mode))
        self.current_step = 0
        self._apply()

    def _configure(self, s: dict[str, Any]) -> None:
        """Validate the settings ``s`` against ``self.margin``, then store them (all or nothing)."""
        margin, cls = self.margin, type(self.margin).__name__
        param = s["param"]
        if not isinstance(param, str) or param not in margin.params:
            raise ValueError(f"param must name one of {cls}'s parameters {sorted(margin.params)}, got {param!r}")
        if isinstance(margin, _IntegerAngular):
            raise ValueError(f"{cls}'s {param} must be an integer and cannot be ramped continuously; "
                             f"schedule a margin with a real-valued parameter (e.g. CosFace, ArcFace, CombinedMargin)")
        for name in ("start", "end"):
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
            s[name] = _check_param(name, float(v))
            try:
                sig = inspect.signature(type(margin)).bind(**{param: s[name]})
            except TypeError:  # constructor without a `param` keyword: finiteness is all we can check
                continue
            try:
                type(margin)(*sig.args, **sig.kwargs)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}={v!r} is not a valid {cls}.{param}: {exc}") from None
        for name in ("warmup_begin", "warmup_end"):
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            s[name] = int(v)
        if s["warmup_begin"] < 0:
            raise ValueError(f"warmup_begin must be >= 0, got {s['warmup_begin']}")
        if s["warmup_end"] < s["warmup_begin"]:
            raise ValueError(f"warmup_end must be >= warmup_begin (end before start), "
                             f"got warmup_end={s['warmup_end']} < warmup_begin={s['warmup_begin']}")
        if s["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {s['mode']!r}")
        for name in _SETTINGS:
            setattr(self, name, s[name])

    def get_value(self, step: int) -> float:
        """The scheduled value at ``step`` (see the class docstring); no side effects."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
        b, e = self.warmup_begin, self.warmup_end
        if step >= e:
            return self.end
        if step <= b:
            return self.start
        p = (step - b) / (e - b)
        r = p if self.mode == "linear" else math.expm1(-EXP_RATE * p) / math.expm1(-EXP_RATE)
        v = self.start + (self.end - self.start) * r
        return min(max(v, min(self.start, self.end)), max(self.start, self.end))

    @property
    def value(self) -> float:
        """The value at the current step (the one in ``margin.params[param]``)."""
        return self.get_value(self.current_step)

    def _apply(self) -> None:
        self.margin.params[self.param] = self.value

    def step(self) -> float:
        """Advance one step, write the new value into the margin and return it."""
        self.current_step += 1
        self._apply()
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the settings (not the margin), as plain Python values."""
        return {"step": self.current_step, **{name: getattr(self, name) for name in _SETTINGS}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s step and settings and write that step's value into the margin.

        Raises:
            ValueError: keys missing or unexpected, ``step`` negative, or settings invalid for this margin.
            TypeError: ``step`` or a setting of the wrong type.
        """
        expected = {"step", *_SETTINGS}
        if set(state_dict) != expected:
            raise ValueError(f"state_dict must have keys {sorted(expected)}; missing "
                             f"{sorted(expected - set(state_dict))}, unexpected {sorted(set(state_dict) - expected)}")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"state_dict['step'] must be an int, got {type(step).__name__} {step!r}")
        if step < 0:
            raise ValueError(f"state_dict['step'] must be >= 0, got {step}")
        self._configure({name: state_dict[name] for name in _SETTINGS})
        self.current_step = int(step)
        self._apply()

    def __repr__(self) -> str:
        return (f"MarginScheduler({self.margin!r}, param={self.param!r}, start={self.start:g}, end={self.end:g}, "
                f"warmup_begin={self.warmup_begin}, warmup_end={self.warmup_end}, mode={self.mode!r}, "
                f"step={self.current_step}, value={self.value:g})")
