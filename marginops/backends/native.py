"""Native CPU backend: the torch backend's tiling with one fused C++ pass per logits tile.

The GEMMs are PyTorch's (``at::mm``/``addmm``: MKL, oneDNN or OpenBLAS,
whatever the installed PyTorch ships). Everything between them runs in the
kernels of ``marginops/csrc/tile_kernels.cpp``, one pass over each tile while
it is in cache instead of about ten elementwise PyTorch passes, and one
parallel region per row block and pass (each thread runs the GEMMs and
passes of its own tiles) instead of several per tile:

* **forward**: the scale and the inverse class norms are folded into the raw
  ``xh @ W_tile^T`` tile, the target column is excluded, and per row the
  max, its first index, ``sum exp(logit - max)`` and the sum of the logits
  (label smoothing's statistic) come out of the same pass;
* **gradients**: ``G = g s (exp(logit - lse) - eps / C) inv_w`` (target column
  0, ``|G| < finfo.tiny`` flushed to zero) is written over the tile in place
  and is the left operand of the two gradient GEMMs; label smoothing needs
  no separate rank-1 pass;
* **normalization backward of W**: per chunk, right after the last row
  block's ``dW`` GEMM for that chunk, while the chunk is still in cache.

Strategies, memory budget and numerics are the torch backend's
(:mod:`marginops.backends.torch_chunked`): the same planner decides
workspace (three GEMMs) or recompute (four), with tile sizes derived from
this machine's L2 cache (:func:`tile_bytes`) instead of constants.
Results are the same run to run (no atomics): each parallel region hands
out fixed groups of consecutive tiles (:data:`GROUPS`), and what the groups
produce (the forward's per-row statistics, the backward's ``dX`` partials)
is combined in group order.

**Building.** The kernels are compiled on first use with
:func:`torch.utils.cpp_extension.load` for the machine they run on
(``-O3 -march=native``, PyTorch's own vector ISA) and cached under
``$MARGINOPS_CACHE`` (default ``~/.cache/marginops``); the one-time build
prints its duration. If the build fails (no C++ compiler), one warning names
a file holding the compiler's message, ``backend="auto"`` keeps using the
torch backend, and ``backend="native"`` raises a RuntimeError naming the same
file. ``MARGINOPS_NATIVE=0`` switches the native backend off (``"auto"``
then picks ``"torch"`` on CPU).

**Options.** Calls whose :class:`~marginops.backends.interface.FusedOptions`
carry an option these kernels do not implement (:func:`supports`) run on the
torch backend, whole: a loss is never computed with an option ignored.

The module-level functions at the end implement
:class:`marginops.backends.interface.Backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import torch_chunked as tc
from .common import Prepared, acc_dtype
from .interface import Call, FusedOptions, RowStats

__all__ = ["ENV", "enabled", "available", "load", "build_error_log", "supports", "tile_bytes", "plan",
           "weight_grad_dtype", "uses_workspace", "forward_stats", "forward_with_grads", "recompute_grads"]

#: Environment variable: ``0`` (or ``false``/``off``/``no``) switches the native backend off.
ENV = "MARGINOPS_NATIVE"
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "tile_kernels.cpp"
_LIB = "marginops_native"

_state: dict = {"tried": False, "ok": False, "log": None}


def enabled() -> bool:
    """False when ``MARGINOPS_NATIVE`` is ``0``, ``false``, ``off`` or ``no`` (read on every call)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_signature() -> str:
    """What the compiled code depends on: PyTorch, Python, the vector ISA and this CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name", "CPU part")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        flags = platform.processor()
    text = "|".join((torch.__version__, sys.version.split()[0], platform.machine(), _capability(), flags))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "DEFAULT"


def _build_dir() -> Path:
    root = os.environ.get("MARGINOPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "marginops")
    return Path(root) / f"native-{_cpu_signature()}"


def _flags() -> list[str]:
    flags = ["-O3"]
    machine = platform.machine().lower()
    flags.append("-mcpu=native" if machine in ("aarch64", "arm64") else "-march=native")
    flags.append("-fopenmp")  # at::parallel_for's OpenMP regions (the libgomp PyTorch loaded is reused)
    cap = _capability()
    if cap in ("AVX2", "AVX512"):  # at::vec's specializations for this ISA (PyTorch's own kernels use the same)
        flags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return flags


def build_error_log() -> Optional[str]:
    """Path of the file holding the compiler's message of a failed build (None unless a build failed)."""
    return _state["log"]


def load() -> bool:
    """Build (first use on this machine) or load the native kernels; True when they are usable.

    Tried once per process: a failure is reported by one warning naming the
    file that holds the compiler's message (:func:`build_error_log`).
    """
    if _state["tried"]:
        return _state["ok"]
    _state["tried"] = True
    if hasattr(torch.ops, _LIB) and hasattr(getattr(torch.ops, _LIB), "fwd_tile"):  # loaded by another copy
        _register_fakes()
        _state["ok"] = True
        return True
    build_dir = _build_dir()
    try:
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            before = _built(build_dir)
            start = time.perf_counter()
            cpp_extension.load(name=_LIB, sources=[str(SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir), is_python_module=False, verbose=False)
            if _built(build_dir) != before:  # compiled now (first use, or the source or flags changed)
                print(f"marginops: built the native CPU kernels in {time.perf_counter() - start:.1f} s "
                      f"(cached in {build_dir})", file=sys.stderr)
        _register_fakes()
        _state["ok"] = True
    except Exception as e:  # no compiler, no ninja, a compile error: the torch backend serves
        log = _write_log(build_dir, e)
        _state["log"] = log
        warnings.warn(f"marginops: the native CPU kernels could not be built; backend='auto' uses the pure-PyTorch "
                      f"backend instead. The compiler's message is in {log}", RuntimeWarning, stacklevel=2)
    return _state["ok"]


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One process at a time builds or loads the kernels of ``build_dir`` (several ranks starting together
    on a fresh machine): an ``flock``, which the system releases if its holder dies.

    PyTorch's own build lock is a ``lock`` file that a killed build leaves behind, after which every later
    load waits for it forever. Under this lock no other process of ours is building, so such a file is stale
    and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: PyTorch's lock alone
        yield
        return
    with open(build_dir / "marginops-build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"marginops: waiting for another process building the native CPU kernels in {build_dir}",
                  file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _built(build_dir: Path) -> dict:
    """Modification times of the built libraries (a build changes them)."""
    return {str(p): p.stat().st_mtime_ns for p in build_dir.glob(f"{_LIB}*.so")}


def _write_log(build_dir: Path, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}\n"
    for path in (build_dir / "build-error.log",
                 Path(os.environ.get("TMPDIR", "/tmp")) / f"marginops-native-build-error-{os.getpid()}.log"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "(unwritable: " + text.strip() + ")"


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native backend can run here: enabled (:data:`ENV`) and the kernels built.

    The first call builds or loads the kernels (:func:`load`); ``torch.compile``
    treats the answer as a constant.
    """
    return enabled() and load()


_FAKES_DONE = False


def _register_fakes() -> None:
    """Fake (meta) implementations: each op writes into its arguments and returns nothing."""
    global _FAKES_DONE
    if _FAKES_DONE:
        return
    for name in ("fwd_tile", "grad_tile", "normalize_w_backward", "fwd_block", "bwd_block"):
        torch.library.register_fake(f"{_LIB}::{name}")(lambda *args, **kwargs: None)
    _FAKES_DONE = True


def _ops():
    if not available():
        if not enabled():
            raise RuntimeError(f"backend='native' is switched off by {ENV}={os.environ.get(ENV)!r}")
        raise RuntimeError(f"backend='native': the native CPU kernels could not be built; the compiler's message "
                           f"is in {build_error_log()}")
    return getattr(torch.ops, _LIB)


# -- options ------------------------------------------------------------------------------------------

#: The FusedOptions fields these kernels implement. A field added later (a tile-math option) must hold
#: its default for a call to run here; otherwise the call runs on the torch backend.
NATIVE_FIELDS = frozenset({"scale", "normalize", "label_smoothing", "reduce", "eps", "chunk_size", "memory_budget",
                           "want_prediction", "strategy", "need_x", "need_W", "class_start", "num_classes"})


def supports(opts: FusedOptions) -> bool:
    """Whether the native kernels implement every option of ``opts`` (else the torch backend runs the call)."""
    for f in dataclasses.fields(opts):
        if f.name in NATIVE_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or getattr(opts, f.name) != default:
            return False
    return True


# -- tile sizes ---------------------------------------------------------------------------------------

#: Bounds of the derived classes per tile (GEMM efficiency below, Python overhead per tile above is no issue).
MIN_CHUNK, MAX_CHUNK = 512, 16384
_DEFAULT_L2 = 1 << 20


def _l2_per_core() -> int:
    """L2 bytes per core from sysfs (Linux); 1 MiB where it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2" and \
                    (index / "type").read_text().strip() in ("Unified", "Data"):
                size = (index / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return _DEFAULT_L2


#: Workers of the kernels' parallel regions (PyTorch's thread count at import): each works on its own tile.
WORKERS = max(1, torch.get_num_threads())
#: Groups of consecutive tiles per parallel region, shrinking in size, handed out dynamically (a thread
#: slowed by another process does not hold up the region) and combined in a fixed order (results do not
#: depend on which thread took which group). The forward keeps one set of row statistics per group (per
#: tile with the workspace), the backward a ``B_block x D`` partial of ``dX`` per group still running or
#: waiting for an earlier one.
GROUPS = 16
#: Bytes of one logits tile (see :func:`tile_bytes`), fixed at import.
TILE_BYTES = _l2_per_core() // 2


def tile_bytes() -> int:
    """Bytes of one logits tile: half of one core's L2 (each worker of a row block's parallel region runs
    the GEMMs and passes of its own tiles; the other half holds the GEMM's weight tile and input rows).

    Read once, at import (sysfs), so that a call's plan is a pure function of
    its sizes and options, as ``torch.compile`` needs.
    """
    return TILE_BYTES


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _chunk_for(rows: int, classes: int, elt: int) -> int:
    chunk = _pow2_floor(max(1, tile_bytes() // max(1, rows * elt)))
    return max(1, min(max(classes, 1), max(MIN_CHUNK, min(MAX_CHUNK, chunk))))


def plan(batch: int, num_classes: int, element_size: int, opts: FusedOptions, fused_wanted: bool) -> tc.Plan:
    """:func:`marginops.backends.torch_chunked.plan` with classes per tile sized to :func:`tile_bytes`.

    An explicit ``opts.chunk_size`` is kept. The workspace strategy's rows are
    set by the budget first (evened out over the batch), then the tile width
    that puts ``rows x chunk`` within :func:`tile_bytes`; the recompute
    strategy's tiles have ``min(batch, RECOMPUTE_ROWS)`` rows and one scratch
    tile per worker (:data:`WORKERS`), all within the budget.
    """
    if fused_wanted and opts.strategy != "recompute":
        if opts.chunk_size is None:
            rows = max(1, min(batch, opts.budget // max(1, num_classes * element_size)))
            rows = math.ceil(batch / math.ceil(batch / rows)) if batch else rows
            opts_f = dataclasses.replace(opts, chunk_size=_chunk_for(rows, num_classes, element_size))
        else:
            opts_f = opts
        p = tc.plan(batch, num_classes, element_size, opts_f, True)
        if p.strategy == "fused":
            return p
    rows = max(1, min(batch, tc.RECOMPUTE_ROWS))
    chunk = opts.chunk_size if opts.chunk_size is not None else _chunk_for(rows, num_classes, element_size)
    # every worker has a scratch tile: the budget is shared among them
    per_worker = dataclasses.replace(opts, chunk_size=chunk, memory_budget=max(1, opts.budget // WORKERS))
    p = tc.plan(batch, num_classes, element_size, per_worker, False)
    return dataclasses.replace(p, workspace_bytes=p.workspace_bytes * WORKERS)


def _plan(B: int, C: int, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions, grads: bool) -> tc.Plan:
    elt = torch.finfo(acc_dtype(x_dtype, W_dtype)).bits // 8
    fused_wanted = grads and opts.reduce and (opts.need_x or opts.need_W) and opts.is_full_range(C)
    if opts.strategy == "workspace" and grads:
        opts.require_full_range(C)
    return plan(B, C, elt, opts, fused_wanted)


# -- the passes -----------------------------------------------------------------------------------------

def _reciprocal(eps: float, dtype: torch.dtype) -> float:
    """``1 / eps`` rounded as in ``dtype`` (the inverse norm of a clamped row), computed on the host."""
    if dtype == torch.float64:
        return 1.0 / eps
    return float(np.float32(1.0) / np.float32(eps))


class _Prepared(Prepared):
    def __init__(self, call: Call):
        super().__init__(call)
        self.ops = _ops()
        self.floor = tc._exp_floor(self.acc)
        self.tiny = torch.finfo(self.acc).tiny
        self.limit = _reciprocal(self.opts.eps, self.acc)  # clamped()'s threshold, read from no tensor
        self._xg: Optional[Tensor] = None

    @property
    def xg(self) -> Tensor:
        """:attr:`xh` with subnormal entries flushed: the right operand of the ``dW`` GEMM (B x D work,
        no host read)."""
        if self._xg is None:
            self._xg = self.xh.masked_fill(self.xh.abs() < self.tiny, 0.0)
        return self._xg

    def w_grad(self) -> Optional[Tensor]:
        """``dD`` (C x D), uninitialized: the first row block writes it (``mm``, not ``addmm``), so it is
        zeroed here only when there is no row block."""
        if not self.opts.need_W:
            return None
        make = torch.zeros if self.B == 0 else torch.empty
        return make(self.C, self.D, device=self.W.device, dtype=self.acc)

    def row_blocks(self, pl: tc.Plan):
        for r0 in range(0, self.B, pl.rows):
            yield r0, min(r0 + pl.rows, self.B)

    def backward_block(self, pl: tc.Plan, r0: int, r1: int, workspace: Optional[Tensor], shift: Tensor, a: Tensor,
                       b: Tensor, dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """Both gradient GEMMs of rows ``[r0, r1)`` over all tiles, in one parallel region; after the last
        row block each tile's normalization backward of ``W``."""
        self.ops.bwd_block(self.xh[r0:r1], self.xg[r0:r1], self.W, self.inv_w, self.y_local[r0:r1],
                           self.opts.scale, self.floor, self.tiny, pl.chunk, workspace, pl.rows * pl.chunk, shift,
                           a, b, r0 == 0, r1 == self.B, self.limit, WORKERS, GROUPS,
                           dxh[r0:r1] if dxh is not None else self.empty(), dD if dD is not None else self.empty())


def _forward(prep: _Prepared, pl: tc.Plan, want_pred: bool, store: Optional[Tensor] = None, block_done=None):
    """One pass over all tiles, one parallel region per row block; the range's :class:`RowStats`.

    With ``store`` each block's exp'd tiles stay there (tile k at offset
    ``k * rows * chunk``) and ``block_done(r0, r1, m_tiles, lse_block)`` runs
    before the next block overwrites them.
    """
    B, dev, acc = prep.B, prep.W.device, prep.acc
    opts = prep.opts
    T = math.ceil(prep.C / pl.chunk)
    N = torch.empty(B, device=dev, dtype=acc)
    target = torch.zeros(B, device=dev, dtype=acc)  # s * t where the target is in range, else 0
    best = torch.full((B,), -math.inf, device=dev, dtype=acc) if want_pred else prep.empty()
    arg = torch.zeros(B, device=dev, dtype=torch.int64) if want_pred else prep.empty(torch.int64)
    smoothing = opts.label_smoothing > 0
    lsum = torch.zeros(B, device=dev, dtype=acc) if smoothing else prep.empty()
    xh = prep.xh
    G = T if store is not None else max(1, min(T, GROUPS))  # statistics per tile group (per tile: workspace)
    for r0, r1 in prep.row_blocks(pl):
        R = r1 - r0
        m_t = torch.empty(R, G, device=dev, dtype=acc)
        s_t = torch.empty(R, G, device=dev, dtype=acc)
        arg_t = torch.empty(R, G, device=dev, dtype=torch.int64) if want_pred else prep.empty(torch.int64)
        ls_t = torch.zeros(R, G, device=dev, dtype=acc) if smoothing else prep.empty()
        prep.ops.fwd_block(xh[r0:r1], prep.W, prep.inv_w, prep.y_local[r0:r1], opts.scale, prep.floor, pl.chunk,
                           store, pl.rows * pl.chunk, WORKERS, GROUPS, m_t, s_t, target[r0:r1], arg_t, ls_t)
        if T == 0:
            N[r0:r1] = -math.inf
        else:
            N[r0:r1] = tc._combine(m_t, s_t)
            if want_pred:
                mx, k = m_t.max(1)  # the first group holding the maximum holds its first column
                best[r0:r1] = mx
                arg[r0:r1] = arg_t.gather(1, k.unsqueeze(1)).squeeze(1)
            if smoothing:
                lsum[r0:r1] = ls_t.sum(1)
        if block_done is not None:
            block_done(r0, r1, m_t, N[r0:r1])
    if want_pred:
        take = prep.in_range & ((target > best) | ((target == best) & (prep.y_local < arg)))
        best = torch.where(take, target, best)
        arg = torch.where(take, prep.y_local, arg) + opts.class_start
    return RowStats(N, best, arg, lsum)


def _forward_fused(prep: _Prepared, pl: tc.Plan, z: Tensor, g: Tensor):
    """Forward with gradients for upstream row weights ``g``: three GEMMs."""
    B, dev, acc, opts = prep.B, prep.W.device, prep.acc, prep.opts
    store = torch.empty(pl.workspace_bytes // (torch.finfo(acc).bits // 8), device=dev, dtype=acc)
    dxh = torch.zeros(B, prep.D, device=dev, dtype=acc) if opts.need_x else None
    dD = prep.w_grad()
    zf, gs = z.to(acc), g.to(acc) * opts.scale
    smooth = gs * (opts.label_smoothing / prep.C_total)

    def gradients(r0, r1, m_t, N_block):
        lse = torch.logaddexp(N_block, zf[r0:r1])
        a = gs[r0:r1].unsqueeze(1) * torch.exp(m_t - lse.unsqueeze(1))  # (R, tiles): exp(m_k - lse) folded in
        prep.backward_block(pl, r0, r1, store, lse, a, smooth[r0:r1], dxh, dD)

    stats = _forward(prep, pl, opts.want_prediction, store, gradients)
    return stats, dxh, dD


# -- the backend interface (marginops.backends.interface.Backend) -------------------------------------


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """``dW`` is accumulated and returned in the accumulation dtype (float32, or float64)."""
    return acc_dtype(x_dtype, W_dtype)


def uses_workspace(B: int, C: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> bool:
    """The workspace strategy (three GEMMs) when :func:`plan` picks it for a call that wants gradients."""
    if not supports(opts):
        return tc.uses_workspace(B, C, D, x_dtype, W_dtype, opts)
    return B > 0 and _plan(B, C, x_dtype, W_dtype, opts, grads=True).strategy == "fused"


def forward_stats(call: Call) -> RowStats:
    """One GEMM and one fused pass per tile; no gradients."""
    if not supports(call.opts):
        return tc.forward_stats(call)
    prep = _Prepared(call)
    return _forward(prep, _plan(prep.B, prep.C, call.x.dtype, call.W.dtype, call.opts, grads=False),
                    call.opts.want_prediction)


def forward_with_grads(call: Call, z: Tensor, g: Tensor) -> tuple[RowStats, Optional[Tensor], Optional[Tensor]]:
    """The workspace strategy: each row block's logits kept, gradients formed in the pass."""
    if not supports(call.opts):
        return tc.forward_with_grads(call, z, g)
    prep = _Prepared(call)
    pl = _plan(prep.B, prep.C, call.x.dtype, call.W.dtype, call.opts, grads=True)
    if pl.strategy != "fused":
        raise ValueError(f"forward_with_grads called for a call planned as {pl.strategy!r}")
    return _forward_fused(prep, pl, z, g)


def recompute_grads(call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Recompute every tile (four GEMMs in all) for per-row upstream weights ``g``."""
    if not supports(call.opts):
        return tc.recompute_grads(call, lse, g)
    prep = _Prepared(call)
    opts = call.opts
    x = call.x
    pl = _plan(prep.B, prep.C, x.dtype, call.W.dtype, opts, grads=False)
    dxh = torch.zeros(prep.B, prep.D, device=x.device, dtype=prep.acc) if opts.need_x else None
    if dxh is None and not opts.need_W:
        return None, None
    dD = prep.w_grad()
    lse = lse.to(prep.acc).contiguous()
    gs = (g.to(prep.acc) * opts.scale).contiguous()
    smooth = gs * (opts.label_smoothing / prep.C_total)
    for r0, r1 in prep.row_blocks(pl):
        prep.backward_block(pl, r0, r1, None, lse[r0:r1], gs[r0:r1], smooth[r0:r1], dxh, dD)
    return dxh, dD
