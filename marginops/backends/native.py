"""Native CPU backend: the tile engine's row blocks run by compiled C++ kernels, one parallel region each.

Planning, row blocks, strategies (workspace: three GEMMs; recompute: four),
the memory budget and statistics merging are the tile engine's
(:mod:`marginops.backends.engine`), with tiles of half a core's L2 cache
(:func:`~marginops.backends.engine.cpu_tiling`). What this module supplies
is the work on one row block: one C++ call per pass (``fwd_block``,
``bwd_block`` in ``csrc/tile_kernels.cpp``) whose single parallel region
runs, per tile, the GEMMs (PyTorch's ``at::mm``/``addmm``: MKL, oneDNN or
OpenBLAS, whatever the installed PyTorch ships) and one pass over the tile
while it is in cache, instead of about ten elementwise PyTorch passes:

* **forward**: each row's scale ``s_i`` and the inverse class norms are
  folded into the raw ``xh @ W_tile^T`` tile (with ``k`` sub-centres a class
  logit is the largest of its ``k`` rows'), the target column is excluded,
  and per row the max, the prediction's max and its first index,
  ``sum exp(logit - max)`` and the sum of the logits (label smoothing's
  statistic) come out of the same pass; inter-class filtering leaves logits
  above ``s_i * threshold`` out of the max and the sum;
* **gradients**: ``G = g s_i (exp(logit - lse) - eps / C) inv_w`` (target and
  filtered columns 0, sub-centres: at the row that gave the class its logit,
  ``|G| < finfo.tiny`` flushed to zero) is written over the tile in place
  and is the left operand of the two gradient GEMMs; label smoothing needs
  no separate rank-1 pass; with the gradient filter, a tile whose
  probabilities all lie below it is skipped (no GEMMs);
* **normalization backward of W**: per tile, right after the last row
  block's ``dW`` GEMM for that tile, while it is still in cache.

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

from . import engine
from .common import acc_dtype
from .engine import BlockGrads, BlockStats, Plan, RowBlockKernel
from .interface import Call, FusedOptions

__all__ = ["ENV", "enabled", "available", "load", "build_error_log", "SOURCE", "weight_grad_dtype",
           "uses_workspace", "forward_stats", "forward_with_grads", "recompute_grads"]

#: Environment variable: ``0`` (or ``false``/``off``/``no``) switches the native backend off.
ENV = "MARGINOPS_NATIVE"


def _source() -> Path:
    """``tile_kernels.cpp``: in the installed package (``marginops/_csrc``, mapped from the repository's
    ``csrc/`` at build time), else in the source tree this package was imported from."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_csrc" / "tile_kernels.cpp", here.parent / "csrc" / "tile_kernels.cpp"):
        if candidate.is_file():
            return candidate
    return here / "_csrc" / "tile_kernels.cpp"  # missing: the build fails and says so


#: The C++ source of the kernels.
SOURCE = _source()
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
    if hasattr(torch.ops, _LIB) and hasattr(getattr(torch.ops, _LIB), "fwd_block"):  # loaded by another copy
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
    for name in ("fwd_block", "bwd_block"):
        torch.library.register_fake(f"{_LIB}::{name}")(lambda *args, **kwargs: None)
    _FAKES_DONE = True


def _ops():
    if not available():
        if not enabled():
            raise RuntimeError(f"backend='native' is switched off by {ENV}={os.environ.get(ENV)!r}")
        raise RuntimeError(f"backend='native': the native CPU kernels could not be built; the compiler's message "
                           f"is in {build_error_log()}")
    return getattr(torch.ops, _LIB)


# -- the row block ---------------------------------------------------------------------------------------

#: Workers of the kernels' parallel regions (PyTorch's thread count at import): each works on its own tile.
WORKERS = engine.CPU.workers
#: Groups of consecutive tiles per parallel region, shrinking in size, handed out dynamically (a thread
#: slowed by another process does not hold up the region) and combined in a fixed order (results do not
#: depend on which thread took which group). The forward keeps one set of row statistics per group (per
#: tile with the workspace), the backward a ``B_block x D`` partial of ``dX`` per group still running or
#: waiting for an earlier one.
GROUPS = 16


def _reciprocal(eps: float, dtype: torch.dtype) -> float:
    """``1 / eps`` rounded as in ``dtype`` (the inverse norm of a clamped row), computed on the host."""
    if dtype == torch.float64:
        return 1.0 / eps
    return float(np.float32(1.0) / np.float32(eps))


class _NativeBlocks(RowBlockKernel):
    """One call: the shared per-call quantities and the two C++ row-block passes."""

    workspace_sub_centers = True  # the kept tile holds each class's exponential at its sub-centre

    def __init__(self, call: Call):
        super().__init__(call)
        self.ops = _ops()
        self.floor = engine.exp_floor(self.acc)
        self.tiny = torch.finfo(self.acc).tiny
        self.limit = _reciprocal(self.opts.eps, self.acc)  # clamped()'s threshold, read from no tensor
        thr = self.opts.filter_threshold
        self.filter, self.threshold = thr is not None, float(thr) if thr is not None else 0.0
        self.logit_scale = self.logit_scale.contiguous()
        self._xg: Optional[Tensor] = None

    def tiling(self) -> engine.Tiling:
        return engine.cpu_tiling(engine.CPU, per_worker=True)

    @property
    def xg(self) -> Tensor:
        """:attr:`xh` with subnormal entries flushed: the right operand of the ``dW`` GEMM (B x D work,
        no host read)."""
        if self._xg is None:
            self._xg = self.xh.masked_fill(self.xh.abs() < self.tiny, 0.0)
        return self._xg

    def new_weight_grad(self) -> Tensor:
        """``dD``, uninitialized: the first row block writes it (``mm``, not ``addmm``), so it is zeroed
        here only when there is no row block."""
        make = torch.zeros if self.B == 0 else torch.empty
        return make(self.n_rows, self.D, device=self.W.device, dtype=self.acc)

    def forward_block(self, r0: int, r1: int, pl: Plan, workspace: Optional[Tensor]) -> BlockStats:
        R, dev, acc = r1 - r0, self.W.device, self.acc
        T = math.ceil(self.C / pl.chunk)
        G = T if workspace is not None else min(T, max(1, GROUPS))  # per tile with the workspace
        want, smoothing = self.opts.want_prediction, self.opts.label_smoothing > 0
        m_t = torch.empty(R, G, device=dev, dtype=acc)
        s_t = torch.empty(R, G, device=dev, dtype=acc)
        best_t = torch.empty(R, G, device=dev, dtype=acc) if want else self.empty()
        arg_t = torch.empty(R, G, device=dev, dtype=torch.int64) if want else self.empty(torch.int64)
        ls_t = torch.zeros(R, G, device=dev, dtype=acc) if smoothing else self.empty()
        target = torch.zeros(R, device=dev, dtype=acc)
        if T > 0:
            self.ops.fwd_block(self.xh[r0:r1], self.W, self.inv_w, self.y_local[r0:r1], self.logit_scale[r0:r1],
                               self.k, self.floor, self.filter, self.threshold, pl.chunk, workspace,
                               R * pl.chunk * self.k, WORKERS, GROUPS, m_t, s_t, target, best_t, arg_t, ls_t)
        return BlockStats(m_t, s_t, best_t if want else None, arg_t if want else None,
                          ls_t if smoothing else None, target)

    def gradient_block(self, r0: int, r1: int, pl: Plan, grads: BlockGrads, workspace: Optional[Tensor],
                       dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        a = grads.tile_coef.contiguous() if workspace is not None else grads.coef.contiguous()
        b = grads.smoothing.contiguous() if grads.smoothing is not None else self.empty()
        keep = grads.keep if grads.keep is not None else self.empty(torch.bool)
        cutoff = self.opts.gradient_filter or 0.0
        self.ops.bwd_block(self.xh[r0:r1], self.xg[r0:r1], self.W, self.inv_w, self.y_local[r0:r1],
                           self.logit_scale[r0:r1], self.k, self.floor, self.tiny, self.filter, self.threshold,
                           pl.chunk, workspace, (r1 - r0) * pl.chunk * self.k, grads.lse.contiguous(), a, b, keep,
                           float(cutoff), grads.first, grads.last, self.limit, WORKERS, GROUPS,
                           dxh[r0:r1] if dxh is not None else self.empty(), dD if dD is not None else self.empty())


_ENGINE = engine.Engine(_NativeBlocks)


# -- the backend interface (marginops.backends.interface.Backend) -------------------------------------


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """``dW`` is accumulated and returned in the accumulation dtype (float32, or float64)."""
    return acc_dtype(x_dtype, W_dtype)


#: The engine's functions of the interface: the strategy rule, the forward, the forward with the gradients
#: (the workspace strategy) and the recompute strategy's gradients (:class:`~marginops.backends.engine.Engine`).
uses_workspace = _ENGINE.uses_workspace
forward_stats = _ENGINE.forward_stats
forward_with_grads = _ENGINE.forward_with_grads
recompute_grads = _ENGINE.recompute_grads
