// Native CPU tile kernels of marginops' "native" backend (marginops/backends/native.py).
//
// The GEMMs that produce and consume a logits tile stay in the BLAS PyTorch
// ships (at::mm / addmm); these kernels do the elementwise work between them,
// one pass per row of a tile while it is in L1, and drive a whole row block
// across all classes in one at::parallel_for region (fwd_block, bwd_block):
//
//   forward   raw GEMM tile -> class logits (the per-row scale s_i and the
//             inverse class norms folded in; with k sub-centres a class logit
//             is the largest of its k rows'), target column excluded, per row
//             the max, its first index, sum of exp(logit - max) and the sum of
//             logits; inter-class filtering leaves logits above s_i * threshold
//             out of the max and the sum (not out of the prediction);
//             optionally the exponentials kept in place (the workspace).
//   gradient  kept exponentials (workspace) or the recomputed raw tile ->
//             G = (a_i p_ij - b_i) inv_w_j in place (sub-centres: at the row
//             that gave the class its logit, 0 at the others), target and
//             filtered columns 0, |G| < finfo.tiny flushed: the left operand
//             of the two gradient GEMMs; optionally a tile whose probabilities
//             all lie below a threshold is skipped (gradient filtering).
//   normalization backward of W, per tile, after the last row block.
//
// exp is never fed an argument whose result would be subnormal (arguments are
// clamped at `floor`), and the kernels run with flush-to-zero /
// denormals-are-zero set on x86 (restored on exit): subnormal arithmetic is a
// 10-50x slow path on many CPUs.
//
// float32 and float64 tiles; 16-bit inputs reach these kernels as float32
// tiles (each weight tile is converted for its GEMM).
//
// The operators are registered under torch.ops.marginops_native with schemas
// marking what they write; their fake (meta) implementations live in
// marginops/backends/native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

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

// -- sub-centres ----------------------------------------------------------------------------------------

// Class logits of one row of a raw tile of `c` classes x `k` sub-centres (class-major): the row is scaled in
// place by s * iw (one vectorized pass), then cls[j] is the largest of raw[j k .. j k + k - 1] and sub[j] the
// first r holding it.
template <typename T>
void reduce_sub_centers(T* raw, int64_t c, int64_t k, const T* iw, T s, T* cls, uint8_t* sub) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t n = c * k;
  const V vs(s);
  int64_t j = 0;
  for (; j + L <= n; j += L) (V::loadu(raw + j) * (iw ? V::loadu(iw + j) * vs : vs)).store(raw + j);
  for (; j < n; ++j) raw[j] = raw[j] * (iw ? iw[j] * s : s);
  for (j = 0; j < c; ++j) {
    const T* v = raw + j * k;
    T best = v[0];
    uint8_t at = 0;
    for (int64_t r = 1; r < k; ++r)
      if (v[r] > best) { best = v[r]; at = static_cast<uint8_t>(r); }  // strictly greater: the first maximum stays
    cls[j] = best;
    sub[j] = at;
  }
}

// raw[j k + r] = value[j] * scale(j k + r) at r = sub[j], 0 at the class's other rows; |result| < tiny flushed.
template <typename T>
void spread_sub_centers(T* raw, int64_t c, int64_t k, const T* value, const uint8_t* sub, const T* iw, T tn) {
  for (int64_t j = 0; j < c; ++j) {
    T* out = raw + j * k;
    for (int64_t r = 0; r < k; ++r) out[r] = T(0);
    T g = value[j] * (iw ? iw[j * k + sub[j]] : T(1));
    out[sub[j]] = std::abs(g) < tn ? T(0) : g;
  }
}

// -- the forward row kernel ------------------------------------------------------------------------------

// Per-row outputs of one tile; pointers with strides (columns of per-group matrices, or per-thread vectors).
template <typename T>
struct FwdOut {
  T* shift; int64_t shift_st;    // max of the kept non-target logits (-inf when none)
  T* sum; int64_t sum_st;        // sum of exp(logit - finite max) over the kept non-target columns
  T* target;                     // the target's logit, written where the target lies in the tile
  T* best;                       // the group's running prediction maximum (all non-target columns, filtered
                                 // ones included); nullptr: no prediction
  int64_t* arg; int64_t arg_st;  // first class (c0 + j) of that maximum
  T* lsum; int64_t lsum_st;      // += sum of the non-target logits; nullptr: not wanted
};

// One row of `c` class logits: `row` holds raw products, scaled here by s * iw[j] (iw nullptr: by s).
// FILTER: logits above `fthr` stay out of the max and the sum-exp (kept exponentials 0) but count for the
// prediction.
template <typename T, bool FILTER>
void fwd_row(T* row, int64_t c, const T* iw, T s, int64_t t, int64_t c0, bool store, T fl, T fthr,
             const FwdOut<T>& o, int64_t i) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T ninf = -std::numeric_limits<T>::infinity();
  const Segments seg(c, t);
  const bool in_tile = t >= 0 && t < c;
  if (in_tile) o.target[i] = row[t] * (iw ? s * iw[t] : s);
  const V vs(s), vfl(fl), vf(fthr), vninf(ninf);
  // pass 1: fold the scale and inverse norms; maxima (kept, and all for the prediction), sum of logits
  V vmax(ninf), vall(ninf), vsum(T(0));
  T smax = ninf, sall = ninf, ssum = 0;
  seg.each([&](int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + L <= j1; j += L) {
      V v = V::loadu(row + j) * (iw ? V::loadu(iw + j) * vs : vs);
      v.store(row + j);
      vall = at::vec::maximum(vall, v);
      if (FILTER) vmax = at::vec::maximum(vmax, V::blendv(v, vninf, v > vf));
      vsum = vsum + v;
    }
    for (; j < j1; ++j) {
      const T v = row[j] * (iw ? s * iw[j] : s);
      row[j] = v;
      sall = v > sall ? v : sall;
      if (FILTER && !(v > fthr)) smax = v > smax ? v : smax;
      ssum += v;
    }
  });
  const T pm = std::max(hmax(vall), sall);
  const T m = FILTER ? std::max(hmax(vmax), smax) : pm;
  if (o.lsum) o.lsum[i * o.lsum_st] += hsum(vsum) + ssum;
  if (o.best && pm > o.best[i]) {  // first column holding the prediction maximum
    int64_t found = -1;
    seg.each([&](int64_t j0, int64_t j1) {
      if (found >= 0) return;
      int64_t j = j0;
      const V vm(pm);
      for (; j + L <= j1 && found < 0; j += L) {
        const int eq = ~V::loadu(row + j).eq(vm).zero_mask() & ((1 << L) - 1);
        if (eq) found = j + __builtin_ctz(static_cast<unsigned>(eq));
      }
      for (; j < j1 && found < 0; ++j)
        if (row[j] == pm) found = j;
    });
    if (found >= 0) {
      o.best[i] = pm;
      o.arg[i * o.arg_st] = c0 + found;
    }
  }
  // pass 2: sum of exp(logit - shift) over the kept non-target columns, kept in place with `store`
  const T shift = std::isfinite(m) ? m : T(0);
  const V vsh(shift), vzero(T(0));
  V vexp(T(0));
  T sexp = 0;
  seg.each([&](int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + L <= j1; j += L) {
      const V v = V::loadu(row + j);
      V e = at::vec::maximum(v - vsh, vfl).exp();
      if (FILTER) e = V::blendv(e, vzero, v > vf);
      if (store) e.store(row + j);
      vexp = vexp + e;
    }
    for (; j < j1; ++j) {
      const T v = row[j];
      const T e = (FILTER && v > fthr) ? T(0) : std::exp(std::max(v - shift, fl));
      if (store) row[j] = e;
      sexp += e;
    }
  });
  if (store && in_tile) row[t] = 0;
  o.shift[i * o.shift_st] = m;
  o.sum[i * o.sum_st] = hsum(vexp) + sexp;
}

// -- the gradient row kernels ----------------------------------------------------------------------------

// G_j = (a p_j - b) iw_j in place over `n` columns of kept exponentials p (workspace), the target's columns
// [t0, t1) 0, |G| < tiny flushed.
template <typename T>
void grad_row_kept(T* row, int64_t n, const T* iw, int64_t t0, int64_t t1, T a, T b, T tn) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V va(a), vb(b), vtn(tn), vzero(T(0));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V iwv = iw ? V::loadu(iw + j) : V(T(1));
    V g = (va * V::loadu(row + j) - vb) * iwv;
    V::blendv(g, vzero, g.abs() < vtn).store(row + j);
  }
  for (; j < n; ++j) {
    const T g = (a * row[j] - b) * (iw ? iw[j] : T(1));
    row[j] = std::abs(g) < tn ? T(0) : g;
  }
  for (j = std::max<int64_t>(t0, 0); j < std::min(t1, n); ++j) row[j] = 0;
}

// The recompute strategy's gradient of one raw row without sub-centres, in one pass: p_j = exp(max(v_j s iw_j -
// shift, floor)) (0 where filtered), G_j = (a p_j - b) iw_j in place, target column 0, |G| < tiny flushed.
// Returns the largest p of the non-target columns.
template <typename T, bool FILTER>
T grad_row_fused(T* row, int64_t c, const T* iw, T s, int64_t t, T shift, T a, T b, T fl, T tn, T fthr) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vs(s), vsh(shift), vfl(fl), vf(fthr), va(a), vb(b), vtn(tn), vzero(T(0));
  V vmax(T(0));
  T smax = 0;
  const Segments seg(c, t);
  seg.each([&](int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + L <= j1; j += L) {
      const V iwv = iw ? V::loadu(iw + j) : V(T(1));
      const V v = V::loadu(row + j) * (iw ? iwv * vs : vs);
      V p = at::vec::maximum(v - vsh, vfl).exp();
      if (FILTER) p = V::blendv(p, vzero, v > vf);
      vmax = at::vec::maximum(vmax, p);
      const V g = (va * p - vb) * iwv;
      V::blendv(g, vzero, g.abs() < vtn).store(row + j);
    }
    for (; j < j1; ++j) {
      const T iwj = iw ? iw[j] : T(1);
      const T v = row[j] * (iw ? s * iwj : s);
      const T p = (FILTER && v > fthr) ? T(0) : std::exp(std::max(v - shift, fl));
      smax = p > smax ? p : smax;
      const T g = (a * p - b) * iwj;
      row[j] = std::abs(g) < tn ? T(0) : g;
    }
  });
  if (t >= 0 && t < c) row[t] = 0;
  return std::max(hmax(vmax), smax);
}

// The recompute strategy's gradient of one raw row of `c` classes (k rows each): G in place, as described at
// the top. `cls`/`sub` are scratch of c entries (sub-centres only). Returns the row's largest probability.
template <typename T, bool FILTER>
T grad_row_logits(T* row, int64_t c, int64_t k, const T* iw, T s, int64_t t, T shift, T a, T b, T fl, T tn,
                  T fthr, T* cls, uint8_t* sub) {
  if (k == 1) return grad_row_fused<T, FILTER>(row, c, iw, s, t, shift, a, b, fl, tn, fthr);
  // class logits, then a p_j - b per class (flushed again once spread onto its row's inverse norm)
  reduce_sub_centers<T>(row, c, k, iw, s, cls, sub);
  const T pmax = grad_row_fused<T, FILTER>(cls, c, nullptr, T(1), t, shift, a, b, fl, T(0), fthr);
  spread_sub_centers<T>(row, c, k, cls, sub, iw, tn);
  return pmax;
}

// -- normalization backward of W -------------------------------------------------------------------------

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

// -- argument checks -------------------------------------------------------------------------------------

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_vec(const at::Tensor& v, int64_t n, at::ScalarType dt, const char* op, const char* name) {
  TORCH_CHECK(v.is_contiguous() && v.numel() == n && v.scalar_type() == dt, op, ": ", name, " must be a contiguous (",
              n, ",) tensor of ", dt, ", got ", v.sizes(), " ", v.scalar_type());
}

// -- fwd_block / bwd_block: a row block across all classes in one parallel region ------------------------
//
// The classes are cut into tiles of `chunk`; each worker takes tiles and runs, per tile, the logits GEMM
// (at::mm: single-threaded inside the region), the row kernels and, backward, both gradient GEMMs. One
// region per row block and pass instead of several per tile: with another process on the cores, every
// region waits for its slowest thread, so work is handed out dynamically, in fixed groups of consecutive
// tiles (group_bounds). A group's tiles run in order on one thread, and what groups produce is combined in
// group order, so results are the same bits run to run whichever thread takes which group:
//   forward: one (max, sum-exp, prediction max, its first class, logit sum) per row and group, merged tile
//     by tile within the group (R x groups numbers, not R x tiles: at C = 10M that would be tens of MiB);
//     with the workspace each group is one tile, since the backward needs each kept tile's own max;
//   backward: group 0 accumulates dX into the output, each later group into a partial that is added as
//     soon as every group before it is in, then reused: a few partials live at a time, not one per group.
//
// With k sub-centres a tile of `c` classes is the GEMM of k c rows of W (class-major); the workspace keeps
// each class's exponential at the row that gave its logit and 0 at the class's other rows, so the
// gradient pass over a kept tile is the same as without sub-centres.

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

at::Tensor weight_tile(const at::Tensor& W, int64_t r0, int64_t n, at::ScalarType acc) {
  at::Tensor wt = W.detach().narrow(0, r0, n);
  return wt.scalar_type() == acc ? wt : wt.to(acc);
}

at::Tensor tile_view(const c10::optional<at::Tensor>& workspace, int64_t offset, at::Tensor& scratch, int64_t R,
                     int64_t n, int64_t width, const at::TensorOptions& opts) {
  if (workspace.has_value() && workspace->defined()) return workspace->narrow(0, offset, R * n).view({R, n});
  if (!scratch.defined()) scratch = at::empty({R * width}, opts);
  return scratch.narrow(0, 0, R * n).view({R, n});
}

// Common shape checks of both drivers; returns the number of tiles.
int64_t check_block(const char* op, const at::Tensor& xh, const at::Tensor& W, const c10::optional<at::Tensor>& inv_w,
                    const at::Tensor& y, const at::Tensor& row_scale, int64_t k, int64_t chunk) {
  TORCH_CHECK(xh.dim() == 2 && W.dim() == 2 && xh.size(1) == W.size(1), op, ": xh (R, D) and W (C k, D)");
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1");
  TORCH_CHECK(k >= 1 && k <= 255 && W.size(0) % k == 0, op, ": sub_centers must be in [1, 255] and divide W's rows");
  const auto acc = xh.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op, ": xh must be float32 or float64");
  const int64_t R = xh.size(0), C = W.size(0) / k;
  if (inv_w.has_value() && inv_w->defined()) check_vec(*inv_w, W.size(0), acc, op, "inv_w");
  check_vec(y, R, at::kLong, op, "y");
  check_vec(row_scale, R, acc, op, "row_scale");
  return (C + chunk - 1) / chunk;
}

void fwd_block(const at::Tensor& xh, const at::Tensor& W, const c10::optional<at::Tensor>& inv_w,
               const at::Tensor& y, const at::Tensor& row_scale, int64_t sub_centers, double floor_,
               bool filter, double threshold, int64_t chunk, const c10::optional<at::Tensor>& workspace,
               int64_t ws_stride, int64_t max_workers, int64_t groups, at::Tensor m_t, at::Tensor s_t,
               at::Tensor target, at::Tensor best_t, at::Tensor arg_t, at::Tensor ls_t) {
  const int64_t k = sub_centers;
  const int64_t T = check_block("fwd_block", xh, W, inv_w, y, row_scale, k, chunk);
  const auto acc = xh.scalar_type();
  const int64_t R = xh.size(0), C = W.size(0) / k;
  const bool store = workspace.has_value() && workspace->defined();
  const int64_t G = store ? T : group_count(T, groups);  // the workspace keeps per-tile maxima
  check_vec(target, R, acc, "fwd_block", "target");
  for (const at::Tensor* t : {&m_t, &s_t})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == R && t->size(1) == G && t->scalar_type() == acc,
                "fwd_block: m_t and s_t must be contiguous (R, groups) of xh's dtype (groups: tiles with a workspace)");
  const bool want_arg = arg_t.numel() > 0, want_sum = ls_t.numel() > 0;
  if (want_arg) {
    TORCH_CHECK(arg_t.is_contiguous() && arg_t.numel() == R * G && arg_t.scalar_type() == at::kLong, "fwd_block: arg_t");
    TORCH_CHECK(best_t.is_contiguous() && best_t.numel() == R * G && best_t.scalar_type() == acc, "fwd_block: best_t");
  }
  if (want_sum)
    TORCH_CHECK(ls_t.is_contiguous() && ls_t.numel() == R * G && ls_t.scalar_type() == acc, "fwd_block: ls_t");
  if (store)
    TORCH_CHECK(workspace->is_contiguous() && workspace->scalar_type() == acc && ws_stride >= R * chunk * k &&
                workspace->numel() >= (T - 1) * ws_stride + R * (C - (T - 1) * chunk) * k, "fwd_block: workspace");
  if (R == 0 || T == 0) return;
  const at::Tensor x = xh.detach().contiguous();
  const int64_t nw = workers_for(G, max_workers);
  const std::vector<int64_t> bound = group_bounds(T, G);
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState tls;  // the caller's dispatch state (below autograd) for the workers' GEMMs
  AT_DISPATCH_FLOATING_TYPES(acc, "fwd_block", [&] {
    using T_ = scalar_t;
    const T_* iw = opt_ptr<T_>(inv_w);
    const T_* sv = row_scale.data_ptr<T_>();
    const int64_t* yl = y.data_ptr<int64_t>();
    const T_ ninf = -std::numeric_limits<T_>::infinity(), fl = static_cast<T_>(floor_);
    const T_ thr = static_cast<T_>(threshold);
    T_* mg = m_t.data_ptr<T_>();
    T_* sg = s_t.data_ptr<T_>();
    at::parallel_for(0, nw, 1, [&](int64_t w_begin, int64_t w_end) {
      at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t w = w_begin; w < w_end; ++w) {
        at::Tensor scratch;
        std::vector<T_> tm(R), ts(R), best(R);  // this tile's max and sum-exp; the group's prediction max so far
        std::vector<T_> cls(k > 1 ? chunk : 0);  // sub-centres: a row's class logits
        std::vector<uint8_t> sub(k > 1 ? chunk : 0);
        for (int64_t grp = next.fetch_add(1); grp < G; grp = next.fetch_add(1)) {
          std::fill(best.begin(), best.end(), ninf);
          if (want_arg)
            for (int64_t i = 0; i < R; ++i) arg_t.data_ptr<int64_t>()[i * G + grp] = bound[grp] * chunk;
          for (int64_t kk = bound[grp]; kk < bound[grp + 1]; ++kk) {
            const int64_t c0 = kk * chunk, c = std::min(chunk, C - c0), n = c * k;
            const bool first = kk == bound[grp];
            at::Tensor tile = tile_view(workspace, kk * ws_stride, scratch, R, n, chunk * k, x.options());
            at::mm_out(tile, x, weight_tile(W, c0 * k, n, acc).t());
            FwdOut<T_> o{first ? mg + grp : tm.data(), first ? G : 1, first ? sg + grp : ts.data(), first ? G : 1,
                         target.data_ptr<T_>(), want_arg ? best.data() : nullptr,
                         want_arg ? arg_t.data_ptr<int64_t>() + grp : nullptr, G,
                         want_sum ? ls_t.data_ptr<T_>() + grp : nullptr, G};
            T_* base = tile.data_ptr<T_>();
            const T_* iwt = iw ? iw + c0 * k : nullptr;
            FlushDenormals ftz;  // the row passes only (not the GEMMs)
            for (int64_t i = 0; i < R; ++i) {
              T_* raw = base + i * n;
              T_* row = raw;
              const T_* iwr = iwt;
              T_ s = sv[i];
              if (k > 1) {  // class logits into `cls`, already scaled
                reduce_sub_centers<T_>(raw, c, k, iwt, s, cls.data(), sub.data());
                row = cls.data();
                iwr = nullptr;
                s = T_(1);
              }
              if (filter)
                fwd_row<T_, true>(row, c, iwr, s, yl[i] - c0, c0, store, fl, sv[i] * thr, o, i);
              else
                fwd_row<T_, false>(row, c, iwr, s, yl[i] - c0, c0, store, fl, T_(0), o, i);
              if (k > 1 && store) spread_sub_centers<T_>(raw, c, k, cls.data(), sub.data(), nullptr, T_(0));
            }
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
          if (want_arg)
            for (int64_t i = 0; i < R; ++i) best_t.data_ptr<T_>()[i * G + grp] = best[i];
        }
      }
    });
  });
}

void bwd_block(const at::Tensor& xh, const at::Tensor& xg, const at::Tensor& W, const c10::optional<at::Tensor>& inv_w,
               const at::Tensor& y, const at::Tensor& row_scale, int64_t sub_centers, double floor_, double tiny,
               bool filter, double threshold, int64_t chunk, const c10::optional<at::Tensor>& workspace,
               int64_t ws_stride, const at::Tensor& shift, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& keep, double grad_filter, bool first_block, bool last_block, double limit,
               int64_t max_workers, int64_t groups, at::Tensor dxh, at::Tensor dD) {
  const int64_t k = sub_centers;
  const int64_t T = check_block("bwd_block", xh, W, inv_w, y, row_scale, k, chunk);
  const auto acc = xh.scalar_type();
  TORCH_CHECK(xg.sizes() == xh.sizes() && xg.scalar_type() == acc, "bwd_block: xg must be like xh");
  const int64_t R = xh.size(0), C = W.size(0) / k, D = W.size(1);
  const bool from_logits = !(workspace.has_value() && workspace->defined());
  const bool has_inv = inv_w.has_value() && inv_w->defined();
  // b: (R,) label smoothing's g s eps / C per row, or empty (none; always with sub-centres)
  const bool has_b = b.numel() > 0;
  if (has_b) check_vec(b, R, acc, "bwd_block", "b");
  TORCH_CHECK(!(has_b && k > 1), "bwd_block: label smoothing (b) is not combined with sub-centres");
  // a: (R,) per row (recompute), or (R, tiles) per row and tile (workspace: exp(m_k - lse) folded in)
  const bool a_per_tile = a.dim() == 2;
  TORCH_CHECK(a.is_contiguous() && a.scalar_type() == acc && a.size(0) == R && (!a_per_tile || a.size(1) == T),
              "bwd_block: a must be (R,) or (R, tiles)");
  // keep: (tiles,) bool, which kept tiles the gradient filter lets through (workspace), or empty (all)
  const bool has_keep = keep.numel() > 0;
  if (has_keep) check_vec(keep, T, at::kBool, "bwd_block", "keep");
  if (from_logits) check_vec(shift, R, acc, "bwd_block", "shift");
  else
    TORCH_CHECK(workspace->is_contiguous() && workspace->scalar_type() == acc && ws_stride >= R * chunk * k,
                "bwd_block: workspace");
  const bool need_x = dxh.numel() > 0, need_W = dD.numel() > 0;
  if (need_x) TORCH_CHECK(dxh.is_contiguous() && dxh.size(0) == R && dxh.size(1) == D && dxh.scalar_type() == acc,
                          "bwd_block: dxh");
  if (need_W) TORCH_CHECK(dD.dim() == 2 && dD.size(0) == C * k && dD.size(1) == D && dD.stride(1) == 1 &&
                          dD.scalar_type() == acc, "bwd_block: dD");
  if (R == 0 || T == 0 || !(need_x || need_W)) return;
  const at::Tensor x = xh.detach().contiguous(), xgc = xg.detach().contiguous();
  const int64_t G = group_count(T, groups);
  const int64_t nw = workers_for(G, max_workers);
  const std::vector<int64_t> bound = group_bounds(T, G);
  // dX: group 0 accumulates into dxh itself (zero on entry); group g > 0 into a partial, added to dxh once
  // groups 0..g-1 are in (`added`: groups added so far), then returned to `pool` for a later group. A group
  // whose tiles were all skipped leaves no partial.
  std::mutex mu;
  std::vector<at::Tensor> finished(G), pool;
  std::vector<char> done(G, 0);
  int64_t added = 0;
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState tls;
  AT_DISPATCH_FLOATING_TYPES(acc, "bwd_block", [&] {
    using T_ = scalar_t;
    const T_* iw = opt_ptr<T_>(inv_w);
    const T_* sv = row_scale.data_ptr<T_>();
    const int64_t* yl = y.data_ptr<int64_t>();
    const T_* ap = a.data_ptr<T_>();
    const T_* bp = has_b ? b.data_ptr<T_>() : nullptr;
    const T_* shp = from_logits ? shift.data_ptr<T_>() : nullptr;
    const bool* kp = has_keep ? keep.data_ptr<bool>() : nullptr;
    const T_ fl = static_cast<T_>(floor_), tn = static_cast<T_>(tiny), thr = static_cast<T_>(threshold);
    const T_ pfilter = static_cast<T_>(grad_filter);
    at::parallel_for(0, nw, 1, [&](int64_t w_begin, int64_t w_end) {
      at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t w = w_begin; w < w_end; ++w) {
       at::Tensor scratch;
       std::vector<T_> cls(k > 1 ? chunk : 0);
       std::vector<uint8_t> sub(k > 1 ? chunk : 0);
       for (int64_t grp = next.fetch_add(1); grp < G; grp = next.fetch_add(1)) {
        at::Tensor part;
        bool wrote = false;
        if (need_x && grp > 0) {
          std::lock_guard<std::mutex> lock(mu);
          if (!pool.empty()) { part = pool.back(); pool.pop_back(); }
        }
        if (need_x && grp > 0 && !part.defined()) part = at::empty({R, D}, x.options());
        for (int64_t kk = bound[grp]; kk < bound[grp + 1]; ++kk) {
          const int64_t c0 = kk * chunk, c = std::min(chunk, C - c0), n = c * k;
          at::Tensor tile = tile_view(workspace, kk * ws_stride, scratch, R, n, chunk * k, x.options());
          const at::Tensor wt = weight_tile(W, c0 * k, n, acc);
          const T_* iwt = iw ? iw + c0 * k : nullptr;
          T_* base = tile.data_ptr<T_>();
          if (from_logits) at::mm_out(tile, x, wt.t());
          bool skip;
          {
            FlushDenormals ftz;  // the row passes only (not the GEMMs)
            if (from_logits) {
              T_ pmax = 0;
              for (int64_t i = 0; i < R; ++i) {
                const T_ bi = has_b ? bp[i] : T_(0);
                const T_ pm = filter
                    ? grad_row_logits<T_, true>(base + i * n, c, k, iwt, sv[i], yl[i] - c0, shp[i], ap[i], bi, fl, tn,
                                                sv[i] * thr, cls.data(), sub.data())
                    : grad_row_logits<T_, false>(base + i * n, c, k, iwt, sv[i], yl[i] - c0, shp[i], ap[i], bi, fl, tn,
                                                 T_(0), cls.data(), sub.data());
                pmax = std::max(pmax, pm);
              }
              skip = pfilter > 0 && pmax < pfilter;
              if (skip && has_b)  // the probabilities are dropped, label smoothing's term is not
                for (int64_t i = 0; i < R; ++i) {
                  T_* row = base + i * n;
                  std::fill(row, row + n, T_(1));
                  const int64_t t = yl[i] - c0;
                  grad_row_kept<T_>(row, n, iwt, t, t + 1, T_(0), bp[i], tn);
                }
            } else {
              skip = kp != nullptr && !kp[kk];
              if (!skip || has_b)
                for (int64_t i = 0; i < R; ++i) {
                  const int64_t t = yl[i] - c0;
                  grad_row_kept<T_>(base + i * n, n, iwt, t * k, (t + 1) * k,
                                    skip ? T_(0) : ap[i * (a_per_tile ? T : 1) + (a_per_tile ? kk : 0)],
                                    has_b ? bp[i] : T_(0), tn);
                }
            }
          }
          const bool gemm = !skip || has_b;
          if (need_x && gemm) {
            if (grp == 0) dxh.addmm_(tile, wt);
            else if (!wrote) at::mm_out(part, tile, wt);
            else part.addmm_(tile, wt);
            wrote = true;
          }
          if (need_W) {
            at::Tensor out = dD.narrow(0, c0 * k, n);
            if (!gemm) {
              if (first_block) out.zero_();
            } else if (first_block) {
              at::mm_out(out, tile.t(), xgc);
            } else {
              out.addmm_(tile.t(), xgc);
            }
            if (last_block && has_inv) {
              const at::Tensor wc = wt.stride(1) == 1 ? wt : wt.contiguous();
              normalize_rows<T_>(out.data_ptr<T_>(), out.stride(0), wc.data_ptr<T_>(), wc.stride(0), iwt,
                                 static_cast<T_>(limit), 0, n, D);
            }
          }
        }
        if (need_x) {
          std::lock_guard<std::mutex> lock(mu);
          done[grp] = 1;
          if (grp > 0 && !wrote) {
            pool.push_back(part);
            part.reset();
          }
          finished[grp] = part;
          for (; added < G && done[added]; ++added) {
            if (added == 0 || !finished[added].defined()) continue;  // group 0 wrote into dxh
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
  m.def("fwd_block(Tensor xh, Tensor W, Tensor? inv_w, Tensor y, Tensor row_scale, int sub_centers, float floor, "
        "bool filter, float threshold, int chunk, Tensor(a!)? workspace, int ws_stride, int max_workers, int groups, "
        "Tensor(b!) m_t, Tensor(c!) s_t, Tensor(d!) target, Tensor(e!) best_t, Tensor(f!) arg_t, "
        "Tensor(g!) ls_t) -> ()");
  m.def("bwd_block(Tensor xh, Tensor xg, Tensor W, Tensor? inv_w, Tensor y, Tensor row_scale, int sub_centers, "
        "float floor, float tiny, bool filter, float threshold, int chunk, Tensor(a!)? workspace, int ws_stride, "
        "Tensor shift, Tensor a, Tensor b, Tensor keep, float grad_filter, bool first_block, bool last_block, "
        "float limit, int max_workers, int groups, Tensor(b!) dxh, Tensor(c!) dD) -> ()");
  m.def("vector_bits() -> int", &vector_bits);
}

TORCH_LIBRARY_IMPL(marginops_native, CPU, m) {
  m.impl("fwd_block", &fwd_block);
  m.impl("bwd_block", &bwd_block);
}
