// Native CPU tile kernels of marginops' "native" backend (marginops/backends/native.py).
//
// The GEMMs that produce and consume a logits tile stay in the BLAS PyTorch
// ships (torch.mm / addmm); these kernels do the elementwise work between
// them, each in one pass over the tile (one at::parallel_for region, rows
// split across threads, each row processed while it is in L1):
//
//   fwd_tile     raw GEMM tile -> logits (scale and inverse class norms
//                folded in), target column excluded, per-row max, first-index
//                argmax, sum of exp(logit - max), sum of logits; optionally
//                the exp'd tile kept in place (the workspace strategy).
//   grad_tile    exp'd tile (workspace) or raw GEMM tile (recompute) ->
//                G = (a_i p_ij - b_i) inv_w_j in place, target column 0,
//                |G| < finfo.tiny flushed to 0: the left operand of the two
//                gradient GEMMs.
//   normalize_w_backward
//                dD_j - W_j inv_w_j^2 (W_j . dD_j) in place per class row.
//
// exp is never fed an argument whose result would be subnormal (arguments
// are clamped at `floor`), and the kernels run with flush-to-zero /
// denormals-are-zero set on x86 (restored on exit): subnormal arithmetic is
// a 10-50x slow path on many CPUs.
//
// float32 and float64 tiles; 16-bit inputs reach these kernels as float32
// tiles (the Python side converts each weight tile for the GEMM).
//
// The operators are registered under torch.ops.marginops_native with
// schemas marking what they write; their fake (meta) implementations live in
// marginops/backends/native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>
#include <cstdint>
#include <limits>
#include <mutex>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define MARGINOPS_X86 1
#endif

namespace {

using at::vec::Vectorized;

// Flush-to-zero and denormals-are-zero for the current thread, restored on destruction.
struct FlushDenormals {
#ifdef MARGINOPS_X86
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Rows per task of a parallel region: enough work per task to amortize the scheduling.
int64_t row_grain(int64_t cols) {
  const int64_t target = 16384;  // elements per task
  return std::max<int64_t>(1, target / std::max<int64_t>(cols, 1));
}

template <typename T>
T hmax(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T m = buf[0];
  for (int k = 1; k < Vectorized<T>::size(); ++k) m = buf[k] > m ? buf[k] : m;
  return m;
}

template <typename T>
T hsum(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int k = 0; k < Vectorized<T>::size(); ++k) s += buf[k];
  return s;
}

// Column segments of a row that exclude column `t` (t < 0 or t >= c: no exclusion).
struct Segments {
  int64_t a0, a1, b0, b1;
  Segments(int64_t c, int64_t t) {
    if (t >= 0 && t < c) { a0 = 0; a1 = t; b0 = t + 1; b1 = c; }
    else { a0 = 0; a1 = c; b0 = c; b1 = c; }
  }
  template <typename F>
  void each(F&& f) const { if (a1 > a0) f(a0, a1); if (b1 > b0) f(b0, b1); }
};

// -- the row kernels (one row of one tile at a time) ----------------------------------------------------

// Per-row outputs of the forward pass; pointers with strides (columns of per-tile matrices, or vectors).
template <typename T>
struct FwdOut {
  T* shift; int64_t shift_st;  // max of the non-target logits (-inf when none)
  T* sum; int64_t sum_st;      // sum of exp(logit - finite max) over the non-target columns
  T* target;                   // the target's logit, written where the target lies in the tile
  T* best;                     // running maximum to beat (nullptr: report this tile's argmax regardless)
  int64_t* arg; int64_t arg_st;  // first column (c0 + j) of the maximum; nullptr: not wanted
  T* lsum; int64_t lsum_st;    // += sum of the non-target logits; nullptr: not wanted
};

template <typename T>
void fwd_rows(T* base, int64_t ld, int64_t r_begin, int64_t r_end, int64_t c, const T* iw, T s, const int64_t* yl,
              int64_t c0, bool store, T fl, const FwdOut<T>& o) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T ninf = -std::numeric_limits<T>::infinity();
  FlushDenormals ftz;
  const V vs(s), vfl(fl);
  for (int64_t i = r_begin; i < r_end; ++i) {
    T* row = base + i * ld;
    const int64_t t = yl[i] - c0;
    const Segments seg(c, t);
    const bool in_tile = t >= 0 && t < c;
    if (in_tile) o.target[i] = row[t] * (iw ? s * iw[t] : s);
    // pass 1: fold the scale and inverse norms, max and sum of the non-target logits
    V vmax(ninf), vsum(T(0));
    T smax = ninf, ssum = 0;
    seg.each([&](int64_t j0, int64_t j1) {
      int64_t j = j0;
      for (; j + L <= j1; j += L) {
        V v = V::loadu(row + j) * (iw ? V::loadu(iw + j) * vs : vs);
        v.store(row + j);
        vmax = at::vec::maximum(vmax, v);
        vsum = vsum + v;
      }
      for (; j < j1; ++j) {
        const T v = row[j] * (iw ? s * iw[j] : s);
        row[j] = v;
        smax = v > smax ? v : smax;
        ssum += v;
      }
    });
    const T m = std::max(hmax(vmax), smax);
    if (o.lsum) o.lsum[i * o.lsum_st] += hsum(vsum) + ssum;
    if (o.arg && (o.best == nullptr || m > o.best[i])) {  // first column holding the maximum
      int64_t found = -1;
      seg.each([&](int64_t j0, int64_t j1) {
        if (found >= 0) return;
        int64_t j = j0;
        const V vm(m);
        for (; j + L <= j1 && found < 0; j += L) {
          const int eq = ~V::loadu(row + j).eq(vm).zero_mask() & ((1 << L) - 1);
          if (eq) found = j + __builtin_ctz(static_cast<unsigned>(eq));
        }
        for (; j < j1 && found < 0; ++j)
          if (row[j] == m) found = j;
      });
      if (found >= 0) {
        if (o.best) o.best[i] = m;
        o.arg[i * o.arg_st] = c0 + found;
      } else if (o.best == nullptr) {
        o.arg[i * o.arg_st] = c0;  // no non-target column: its max is -inf and never chosen
      }
    }
    // pass 2: sum of exp(logit - shift) over the non-target columns, kept in place with `store`
    const T shift = std::isfinite(m) ? m : T(0);
    const V vsh(shift);
    V vexp(T(0));
    T sexp = 0;
    seg.each([&](int64_t j0, int64_t j1) {
      int64_t j = j0;
      for (; j + L <= j1; j += L) {
        const V e = at::vec::maximum(V::loadu(row + j) - vsh, vfl).exp();
        if (store) e.store(row + j);
        vexp = vexp + e;
      }
      for (; j < j1; ++j) {
        const T e = std::exp(std::max(row[j] - shift, fl));
        if (store) row[j] = e;
        sexp += e;
      }
    });
    if (store && in_tile) row[t] = 0;
    o.shift[i * o.shift_st] = m;
    o.sum[i * o.sum_st] = hsum(vexp) + sexp;
  }
}

// G_ij = (a_i p_ij - b_i) inv_w_j in place, target column 0, |G| < tiny flushed; p is the tile itself
// (exp'd workspace) or exp(max(logit - shift_i, floor)) of the raw GEMM tile (from_logits).
template <typename T>
void grad_rows(T* base, int64_t ld, int64_t r_begin, int64_t r_end, int64_t c, const T* iw, const int64_t* yl,
               int64_t c0, bool from_logits, T s, const T* shp, const T* ap, int64_t a_st, const T* bp, T fl, T tn) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  FlushDenormals ftz;
  const V vs(s), vfl(fl), vtn(tn), vzero(T(0));
  for (int64_t i = r_begin; i < r_end; ++i) {
    T* row = base + i * ld;
    const T ai = ap[i * a_st], bi = bp[i];
    const V va(ai), vb(bi);
    const T sh = from_logits ? shp[i] : T(0);
    const V vsh(sh);
    int64_t j = 0;
    for (; j + L <= c; j += L) {
      V p = V::loadu(row + j);
      const V iwv = iw ? V::loadu(iw + j) : V(T(1));
      if (from_logits) p = at::vec::maximum(p * (iwv * vs) - vsh, vfl).exp();
      V g = (va * p - vb) * iwv;
      g = V::blendv(g, vzero, g.abs() < vtn);
      g.store(row + j);
    }
    for (; j < c; ++j) {
      T p = row[j];
      const T iwj = iw ? iw[j] : T(1);
      if (from_logits) p = std::exp(std::max(p * (iwj * s) - sh, fl));
      const T g = (ai * p - bi) * iwj;
      row[j] = std::abs(g) < tn ? T(0) : g;
    }
    const int64_t t = yl[i] - c0;
    if (t >= 0 && t < c) row[t] = 0;
  }
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_tile(const at::Tensor& tile, const char* op) {
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1, op, ": tile must be 2-D with unit column stride");
  TORCH_CHECK(tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble, op,
              ": tile must be float32 or float64, got ", tile.scalar_type());
}

void check_vec(const at::Tensor& v, int64_t n, at::ScalarType dt, const char* op, const char* name) {
  TORCH_CHECK(v.is_contiguous() && v.numel() == n && v.scalar_type() == dt, op, ": ", name, " must be a contiguous (",
              n, ",) tensor of ", dt, ", got ", v.sizes(), " ", v.scalar_type());
}

// -- fwd_tile / grad_tile: one tile, rows split over one parallel region -------------------------------

void fwd_tile(at::Tensor tile, const c10::optional<at::Tensor>& inv_w, double scale, const at::Tensor& y,
              int64_t c0, bool store, double floor_, at::Tensor shift_out, at::Tensor sum_out, at::Tensor target,
              at::Tensor best, at::Tensor best_idx, at::Tensor logit_sum) {
  check_tile(tile, "fwd_tile");
  const int64_t R = tile.size(0), c = tile.size(1);
  const auto dt = tile.scalar_type();
  if (inv_w.has_value() && inv_w->defined()) check_vec(*inv_w, c, dt, "fwd_tile", "inv_w");
  check_vec(y, R, at::kLong, "fwd_tile", "y");
  TORCH_CHECK(shift_out.numel() == R && sum_out.numel() == R && shift_out.scalar_type() == dt &&
              sum_out.scalar_type() == dt, "fwd_tile: shift_out and sum_out must be (R,) of the tile's dtype");
  check_vec(target, R, dt, "fwd_tile", "target");
  if (best.numel() > 0) {
    check_vec(best, R, dt, "fwd_tile", "best");
    check_vec(best_idx, R, at::kLong, "fwd_tile", "best_idx");
  }
  if (logit_sum.numel() > 0) check_vec(logit_sum, R, dt, "fwd_tile", "logit_sum");
  AT_DISPATCH_FLOATING_TYPES(dt, "fwd_tile", [&] {
    FwdOut<scalar_t> o{shift_out.data_ptr<scalar_t>(), shift_out.stride(0), sum_out.data_ptr<scalar_t>(),
                       sum_out.stride(0), target.data_ptr<scalar_t>(),
                       best.numel() ? best.data_ptr<scalar_t>() : nullptr,
                       best.numel() ? best_idx.data_ptr<int64_t>() : nullptr, 1,
                       logit_sum.numel() ? logit_sum.data_ptr<scalar_t>() : nullptr, 1};
    scalar_t* base = tile.data_ptr<scalar_t>();
    const scalar_t* iw = opt_ptr<scalar_t>(inv_w);
    const int64_t* yl = y.data_ptr<int64_t>();
    at::parallel_for(0, R, row_grain(c), [&](int64_t r0, int64_t r1) {
      fwd_rows<scalar_t>(base, tile.stride(0), r0, r1, c, iw, static_cast<scalar_t>(scale), yl, c0, store,
                         static_cast<scalar_t>(floor_), o);
    });
  });
}

void grad_tile(at::Tensor tile, const c10::optional<at::Tensor>& inv_w, const at::Tensor& y, int64_t c0,
               bool from_logits, double scale, const at::Tensor& shift, const at::Tensor& a, const at::Tensor& b,
               double floor_, double tiny) {
  check_tile(tile, "grad_tile");
  const int64_t R = tile.size(0), c = tile.size(1);
  const auto dt = tile.scalar_type();
  if (inv_w.has_value() && inv_w->defined()) check_vec(*inv_w, c, dt, "grad_tile", "inv_w");
  check_vec(y, R, at::kLong, "grad_tile", "y");
  check_vec(a, R, dt, "grad_tile", "a");
  check_vec(b, R, dt, "grad_tile", "b");
  if (from_logits) check_vec(shift, R, dt, "grad_tile", "shift");
  AT_DISPATCH_FLOATING_TYPES(dt, "grad_tile", [&] {
    scalar_t* base = tile.data_ptr<scalar_t>();
    const scalar_t* iw = opt_ptr<scalar_t>(inv_w);
    const scalar_t* shp = from_logits ? shift.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, row_grain(c), [&](int64_t r0, int64_t r1) {
      grad_rows<scalar_t>(base, tile.stride(0), r0, r1, c, iw, y.data_ptr<int64_t>(), c0, from_logits,
                          static_cast<scalar_t>(scale), shp, a.data_ptr<scalar_t>(), 1, b.data_ptr<scalar_t>(),
                          static_cast<scalar_t>(floor_), static_cast<scalar_t>(tiny));
    });
  });
}

// -- normalize_w_backward ------------------------------------------------------------------------------

// dD_j -= W_j inv_j^2 (W_j . dD_j) for rows [j0, j1) (no projection where the norm was clamped: inv_j >= lim).
template <typename T>
void normalize_rows(T* dp, int64_t ldd, const T* wp, int64_t ldw, const T* iw, T lim, int64_t j0, int64_t j1,
                    int64_t D) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  FlushDenormals ftz;
  for (int64_t r = j0; r < j1; ++r) {
    const T inv = iw[r];
    if (inv >= lim) continue;
    T* d = dp + r * ldd;
    const T* w = wp + r * ldw;
    V vdot(T(0));
    T sdot = 0;
    int64_t k = 0;
    for (; k + L <= D; k += L) vdot = at::vec::fmadd(V::loadu(w + k), V::loadu(d + k), vdot);
    for (; k < D; ++k) sdot += w[k] * d[k];
    const T coef = -(hsum(vdot) + sdot) * inv * inv;
    const V vc(coef);
    k = 0;
    for (; k + L <= D; k += L) at::vec::fmadd(V::loadu(w + k), vc, V::loadu(d + k)).store(d + k);
    for (; k < D; ++k) d[k] += w[k] * coef;
  }
}

void normalize_w_backward(at::Tensor dD, const at::Tensor& W, const at::Tensor& inv_w, double limit) {
  TORCH_CHECK(dD.dim() == 2 && W.dim() == 2 && dD.sizes() == W.sizes(), "normalize_w_backward: dD and W shapes");
  TORCH_CHECK(dD.stride(1) == 1 && W.stride(1) == 1, "normalize_w_backward: rows must have unit stride");
  TORCH_CHECK(dD.scalar_type() == W.scalar_type(), "normalize_w_backward: dD and W must share a dtype");
  check_vec(inv_w, dD.size(0), dD.scalar_type(), "normalize_w_backward", "inv_w");
  const int64_t D = dD.size(1);
  AT_DISPATCH_FLOATING_TYPES(dD.scalar_type(), "normalize_w_backward", [&] {
    at::parallel_for(0, dD.size(0), row_grain(2 * D), [&](int64_t j0, int64_t j1) {
      normalize_rows<scalar_t>(dD.data_ptr<scalar_t>(), dD.stride(0), W.data_ptr<scalar_t>(), W.stride(0),
                               inv_w.data_ptr<scalar_t>(), static_cast<scalar_t>(limit), j0, j1, D);
    });
  });
}

// -- fwd_block / bwd_block: a row block across all classes in one parallel region ------------------------
//
// The classes are cut into tiles of `chunk`; each worker takes tiles and runs, per tile, the logits GEMM
// (at::mm: single-threaded inside the region), the row kernels and, backward, both gradient GEMMs. One
// region per row block and pass instead of several per tile: with another process on the cores, every
// region waits for its slowest thread, so work is handed out dynamically, in fixed groups of consecutive
// tiles (group_bounds). A group's tiles run in order on one thread, and what groups produce is combined in
// group order, so results are the same bits run to run whichever thread takes which group:
//   forward: one (max, sum-exp, argmax, logit sum) per row and group, merged tile by tile within the group
//     (R x groups numbers, not R x tiles: at C = 10M that would be tens of MiB); with the workspace each
//     group is one tile, since the backward needs each kept tile's own max;
//   backward: group 0 accumulates dX into the output, each later group into a partial that is added as
//     soon as every group before it is in, then reused: a few partials live at a time, not one per group.

// Tile boundaries of `G` groups of consecutive tiles out of `T`, shrinking linearly (weights G, G-1, ..., 1:
// the last ones handed out are small, so no thread is left with a long tail), every group non-empty.
std::vector<int64_t> group_bounds(int64_t T, int64_t G) {
  std::vector<int64_t> bound(G + 1, 0);
  for (int64_t g = 1; g <= G; ++g) {  // cumulative weights G + (G-1) + ... over G (G+1) / 2
    const int64_t cum = g * G - g * (g - 1) / 2;
    bound[g] = std::min(T - (G - g), std::max(bound[g - 1] + 1, (T * cum) / (G * (G + 1) / 2)));
  }
  bound[G] = T;
  return bound;
}

int64_t group_count(int64_t T, int64_t groups) { return std::max<int64_t>(1, std::min(T, groups)); }

int64_t workers_for(int64_t tiles, int64_t max_workers) {
  return std::max<int64_t>(1, std::min<int64_t>({tiles, max_workers, static_cast<int64_t>(at::get_num_threads())}));
}

at::Tensor weight_tile(const at::Tensor& W, int64_t c0, int64_t c, at::ScalarType acc) {
  at::Tensor wt = W.detach().narrow(0, c0, c);
  return wt.scalar_type() == acc ? wt : wt.to(acc);
}

at::Tensor tile_view(const c10::optional<at::Tensor>& workspace, int64_t offset, at::Tensor& scratch, int64_t R,
                     int64_t c, int64_t chunk, const at::TensorOptions& opts) {
  if (workspace.has_value() && workspace->defined()) return workspace->narrow(0, offset, R * c).view({R, c});
  if (!scratch.defined()) scratch = at::empty({R * chunk}, opts);
  return scratch.narrow(0, 0, R * c).view({R, c});
}

void fwd_block(const at::Tensor& xh, const at::Tensor& W, const c10::optional<at::Tensor>& inv_w,
               const at::Tensor& y, double scale, double floor_, int64_t chunk,
               const c10::optional<at::Tensor>& workspace, int64_t ws_stride, int64_t max_workers, int64_t groups,
               at::Tensor m_t, at::Tensor s_t, at::Tensor target, at::Tensor arg_t, at::Tensor ls_t) {
  TORCH_CHECK(xh.dim() == 2 && W.dim() == 2 && xh.size(1) == W.size(1), "fwd_block: xh (R, D) and W (C, D)");
  TORCH_CHECK(chunk >= 1, "fwd_block: chunk must be >= 1");
  const auto acc = xh.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fwd_block: xh must be float32 or float64");
  const int64_t R = xh.size(0), C = W.size(0), T = (C + chunk - 1) / chunk;
  const bool store = workspace.has_value() && workspace->defined();
  const int64_t G = store ? T : group_count(T, groups);  // the workspace keeps per-tile maxima
  if (inv_w.has_value() && inv_w->defined()) check_vec(*inv_w, C, acc, "fwd_block", "inv_w");
  check_vec(y, R, at::kLong, "fwd_block", "y");
  check_vec(target, R, acc, "fwd_block", "target");
  for (const at::Tensor* t : {&m_t, &s_t})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == R && t->size(1) == G && t->scalar_type() == acc,
                "fwd_block: m_t and s_t must be contiguous (R, groups) of xh's dtype (groups: tiles with a workspace)");
  const bool want_arg = arg_t.numel() > 0, want_sum = ls_t.numel() > 0;
  if (want_arg)
    TORCH_CHECK(arg_t.is_contiguous() && arg_t.numel() == R * G && arg_t.scalar_type() == at::kLong, "fwd_block: arg_t");
  if (want_sum)
    TORCH_CHECK(ls_t.is_contiguous() && ls_t.numel() == R * G && ls_t.scalar_type() == acc, "fwd_block: ls_t");
  if (store)
    TORCH_CHECK(workspace->is_contiguous() && workspace->scalar_type() == acc && ws_stride >= R * chunk &&
                workspace->numel() >= (T - 1) * ws_stride + R * (C - (T - 1) * chunk), "fwd_block: workspace");
  if (R == 0 || T == 0) return;
  const at::Tensor x = xh.detach().contiguous();
  const int64_t nw = workers_for(G, max_workers);
  const std::vector<int64_t> bound = group_bounds(T, G);
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState tls;  // the caller's dispatch state (below autograd) for the workers' GEMMs
  AT_DISPATCH_FLOATING_TYPES(acc, "fwd_block", [&] {
    using T_ = scalar_t;
    const T_* iw = opt_ptr<T_>(inv_w);
    const T_ ninf = -std::numeric_limits<T_>::infinity(), fl = static_cast<T_>(floor_);
    T_* mg = m_t.data_ptr<T_>();
    T_* sg = s_t.data_ptr<T_>();
    at::parallel_for(0, nw, 1, [&](int64_t w_begin, int64_t w_end) {
      at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t w = w_begin; w < w_end; ++w) {
        at::Tensor scratch;
        std::vector<T_> tm(R), ts(R), best(R);  // this tile's max and sum-exp; the group's max so far
        for (int64_t grp = next.fetch_add(1); grp < G; grp = next.fetch_add(1)) {
          std::fill(best.begin(), best.end(), ninf);
          if (want_arg)
            for (int64_t i = 0; i < R; ++i) arg_t.data_ptr<int64_t>()[i * G + grp] = bound[grp] * chunk;
          for (int64_t k = bound[grp]; k < bound[grp + 1]; ++k) {
            const int64_t c0 = k * chunk, c = std::min(chunk, C - c0);
            const bool first = k == bound[grp];
            at::Tensor tile = tile_view(workspace, k * ws_stride, scratch, R, c, chunk, x.options());
            at::mm_out(tile, x, weight_tile(W, c0, c, acc).t());
            FwdOut<T_> o{first ? mg + grp : tm.data(), first ? G : 1, first ? sg + grp : ts.data(), first ? G : 1,
                         target.data_ptr<T_>(), want_arg ? best.data() : nullptr,
                         want_arg ? arg_t.data_ptr<int64_t>() + grp : nullptr, G,
                         want_sum ? ls_t.data_ptr<T_>() + grp : nullptr, G};
            fwd_rows<T_>(tile.data_ptr<T_>(), c, 0, R, c, iw ? iw + c0 : nullptr, static_cast<T_>(scale),
                         y.data_ptr<int64_t>(), c0, store, fl, o);
            if (first) continue;
            // merge this tile's (max, sum) into the group's: sums rescaled to the larger finite max
            // (each sum is relative to its own max, or to 0 where the max is -inf: then it counts nothing)
            for (int64_t i = 0; i < R; ++i) {
              T_& m = mg[i * G + grp];
              T_& sum = sg[i * G + grp];
              const T_ mk = tm[i], M = std::max(m, mk);
              if (M == ninf) continue;
              const T_ old = m == ninf ? T_(0) : sum * std::exp(std::max(m - M, fl));
              const T_ add = mk == ninf ? T_(0) : ts[i] * std::exp(std::max(mk - M, fl));
              m = M;
              sum = old + add;
            }
          }
        }
      }
    });
  });
}

void bwd_block(const at::Tensor& xh, const at::Tensor& xg, const at::Tensor& W, const c10::optional<at::Tensor>& inv_w,
               const at::Tensor& y, double scale, double floor_, double tiny, int64_t chunk,
               const c10::optional<at::Tensor>& workspace, int64_t ws_stride, const at::Tensor& shift,
               const at::Tensor& a, const at::Tensor& b, bool first_block, bool last_block, double limit,
               int64_t max_workers, int64_t groups, at::Tensor dxh, at::Tensor dD) {
  TORCH_CHECK(xh.dim() == 2 && W.dim() == 2 && xh.size(1) == W.size(1) && xg.sizes() == xh.sizes(),
              "bwd_block: xh, xg (R, D) and W (C, D)");
  TORCH_CHECK(chunk >= 1, "bwd_block: chunk must be >= 1");
  const auto acc = xh.scalar_type();
  TORCH_CHECK((acc == at::kFloat || acc == at::kDouble) && xg.scalar_type() == acc, "bwd_block: xh, xg dtype");
  const int64_t R = xh.size(0), C = W.size(0), D = W.size(1), T = (C + chunk - 1) / chunk;
  const bool from_logits = !(workspace.has_value() && workspace->defined());
  const bool has_inv = inv_w.has_value() && inv_w->defined();
  if (has_inv) check_vec(*inv_w, C, acc, "bwd_block", "inv_w");
  check_vec(y, R, at::kLong, "bwd_block", "y");
  check_vec(b, R, acc, "bwd_block", "b");
  // a: (R,) per row (recompute), or (R, tiles) per row and tile (workspace: exp(m_k - lse) folded in)
  const bool a_per_tile = a.dim() == 2;
  TORCH_CHECK(a.is_contiguous() && a.scalar_type() == acc && a.size(0) == R && (!a_per_tile || a.size(1) == T),
              "bwd_block: a must be (R,) or (R, tiles)");
  if (from_logits) check_vec(shift, R, acc, "bwd_block", "shift");
  else
    TORCH_CHECK(workspace->is_contiguous() && workspace->scalar_type() == acc && ws_stride >= R * chunk,
                "bwd_block: workspace");
  const bool need_x = dxh.numel() > 0, need_W = dD.numel() > 0;
  if (need_x) TORCH_CHECK(dxh.is_contiguous() && dxh.size(0) == R && dxh.size(1) == D && dxh.scalar_type() == acc,
                          "bwd_block: dxh");
  if (need_W) TORCH_CHECK(dD.dim() == 2 && dD.size(0) == C && dD.size(1) == D && dD.stride(1) == 1 &&
                          dD.scalar_type() == acc, "bwd_block: dD");
  if (R == 0 || T == 0 || !(need_x || need_W)) return;
  const at::Tensor x = xh.detach().contiguous(), xgc = xg.detach().contiguous();
  const int64_t G = group_count(T, groups);
  const int64_t nw = workers_for(G, max_workers);
  const std::vector<int64_t> bound = group_bounds(T, G);
  // dX: group 0 accumulates into dxh itself (zero on entry); group g > 0 into a partial, added to dxh once
  // groups 0..g-1 are in (`added`: groups added so far), then returned to `pool` for a later group.
  std::mutex mu;
  std::vector<at::Tensor> finished(G), pool;
  std::vector<char> done(G, 0);
  int64_t added = 0;
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState tls;
  AT_DISPATCH_FLOATING_TYPES(acc, "bwd_block", [&] {
    using T_ = scalar_t;
    const T_* iw = opt_ptr<T_>(inv_w);
    at::parallel_for(0, nw, 1, [&](int64_t w_begin, int64_t w_end) {
      at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t w = w_begin; w < w_end; ++w) {
       at::Tensor scratch;
       for (int64_t grp = next.fetch_add(1); grp < G; grp = next.fetch_add(1)) {
        at::Tensor part;
        if (need_x && grp > 0) {
          std::lock_guard<std::mutex> lock(mu);
          if (!pool.empty()) { part = pool.back(); pool.pop_back(); }
        }
        if (need_x && grp > 0 && !part.defined()) part = at::empty({R, D}, x.options());
        for (int64_t k = bound[grp]; k < bound[grp + 1]; ++k) {
          const int64_t c0 = k * chunk, c = std::min(chunk, C - c0);
          at::Tensor tile = tile_view(workspace, k * ws_stride, scratch, R, c, chunk, x.options());
          const at::Tensor wt = weight_tile(W, c0, c, acc);
          if (from_logits) at::mm_out(tile, x, wt.t());
          grad_rows<T_>(tile.data_ptr<T_>(), c, 0, R, c, iw ? iw + c0 : nullptr, y.data_ptr<int64_t>(), c0,
                        from_logits, static_cast<T_>(scale), from_logits ? shift.data_ptr<T_>() : nullptr,
                        a.data_ptr<T_>() + (a_per_tile ? k : 0), a_per_tile ? T : 1, b.data_ptr<T_>(),
                        static_cast<T_>(floor_), static_cast<T_>(tiny));
          if (need_x) {
            if (grp == 0) dxh.addmm_(tile, wt);
            else if (k == bound[grp]) at::mm_out(part, tile, wt);
            else part.addmm_(tile, wt);
          }
          if (need_W) {
            at::Tensor out = dD.narrow(0, c0, c);
            if (first_block) at::mm_out(out, tile.t(), xgc);
            else out.addmm_(tile.t(), xgc);
            if (last_block && has_inv) {
              const at::Tensor wc = wt.stride(1) == 1 ? wt : wt.contiguous();
              normalize_rows<T_>(out.data_ptr<T_>(), out.stride(0), wc.data_ptr<T_>(), wc.stride(0), iw + c0,
                                 static_cast<T_>(limit), 0, c, D);
            }
          }
        }
        if (need_x) {
          std::lock_guard<std::mutex> lock(mu);
          done[grp] = 1;
          finished[grp] = part;
          for (; added < G && done[added]; ++added) {
            if (added == 0) continue;  // group 0 wrote into dxh
            dxh.add_(finished[added]);
            pool.push_back(finished[added]);
            finished[added].reset();
          }
        }
       }
      }
    });
  });
  TORCH_CHECK(!need_x || added == G, "bwd_block: not every group's dX was added");
}

int64_t vector_bits() { return static_cast<int64_t>(Vectorized<float>::size()) * 32; }

}  // namespace

TORCH_LIBRARY(marginops_native, m) {
  m.def("fwd_tile(Tensor(a!) tile, Tensor? inv_w, float scale, Tensor y, int c0, bool store, float floor, "
        "Tensor(b!) shift_out, Tensor(c!) sum_out, Tensor(d!) target, Tensor(e!) best, Tensor(f!) best_idx, "
        "Tensor(g!) logit_sum) -> ()");
  m.def("grad_tile(Tensor(a!) tile, Tensor? inv_w, Tensor y, int c0, bool from_logits, float scale, Tensor shift, "
        "Tensor a, Tensor b, float floor, float tiny) -> ()");
  m.def("normalize_w_backward(Tensor(a!) dD, Tensor W, Tensor inv_w, float limit) -> ()");
  m.def("fwd_block(Tensor xh, Tensor W, Tensor? inv_w, Tensor y, float scale, float floor, int chunk, "
        "Tensor(a!)? workspace, int ws_stride, int max_workers, int groups, Tensor(b!) m_t, Tensor(c!) s_t, Tensor(d!) target, "
        "Tensor(e!) arg_t, Tensor(f!) ls_t) -> ()");
  m.def("bwd_block(Tensor xh, Tensor xg, Tensor W, Tensor? inv_w, Tensor y, float scale, float floor, float tiny, "
        "int chunk, Tensor(a!)? workspace, int ws_stride, Tensor shift, Tensor a, Tensor b, bool first_block, "
        "bool last_block, float limit, int max_workers, int groups, Tensor(b!) dxh, Tensor(c!) dD) -> ()");
  m.def("vector_bits() -> int", &vector_bits);
}

TORCH_LIBRARY_IMPL(marginops_native, CPU, m) {
  m.impl("fwd_tile", &fwd_tile);
  m.impl("grad_tile", &grad_tile);
  m.impl("normalize_w_backward", &normalize_w_backward);
  m.impl("fwd_block", &fwd_block);
  m.impl("bwd_block", &bwd_block);
}
