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
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

// -- fwd_tile ---------------------------------------------------------------------------------------

template <typename T>
void fwd_tile_impl(at::Tensor& tile, const c10::optional<at::Tensor>& inv_w, double scale, const at::Tensor& y,
                   int64_t c0, bool store, double floor_, at::Tensor& shift_out, at::Tensor& sum_out,
                   at::Tensor& target, at::Tensor& best, at::Tensor& best_idx, at::Tensor& logit_sum) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t R = tile.size(0), c = tile.size(1);
  T* base = tile.data_ptr<T>();
  const int64_t ld = tile.stride(0);
  const T* iw = inv_w.has_value() && inv_w->defined() ? inv_w->data_ptr<T>() : nullptr;
  const int64_t* yl = y.data_ptr<int64_t>();
  T* sh = shift_out.data_ptr<T>();
  const int64_t sh_st = shift_out.stride(0);
  T* sm = sum_out.data_ptr<T>();
  const int64_t sm_st = sum_out.stride(0);
  T* tg = target.data_ptr<T>();
  const bool want_pred = best.numel() > 0;
  T* bst = want_pred ? best.data_ptr<T>() : nullptr;
  int64_t* bidx = want_pred ? best_idx.data_ptr<int64_t>() : nullptr;
  const bool want_sum = logit_sum.numel() > 0;
  T* ls = want_sum ? logit_sum.data_ptr<T>() : nullptr;
  const T s = static_cast<T>(scale);
  const T fl = static_cast<T>(floor_);
  const T ninf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, R, row_grain(c), [&](int64_t r_begin, int64_t r_end) {
    FlushDenormals ftz;
    const V vs(s), vfl(fl);
    for (int64_t i = r_begin; i < r_end; ++i) {
      T* row = base + i * ld;
      const int64_t t = yl[i] - c0;
      const Segments seg(c, t);
      const bool in_tile = t >= 0 && t < c;
      if (in_tile) tg[i] = row[t] * (iw ? s * iw[t] : s);
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
      T m = std::max(hmax(vmax), smax);
      if (want_sum) ls[i] += hsum(vsum) + ssum;
      if (want_pred && m > bst[i]) {  // first column holding the maximum (tiles come in increasing c0)
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
        if (found >= 0) { bst[i] = m; bidx[i] = c0 + found; }
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
      sh[i * sh_st] = m;
      sm[i * sm_st] = hsum(vexp) + sexp;
    }
  });
}

void fwd_tile(at::Tensor tile, const c10::optional<at::Tensor>& inv_w, double scale, const at::Tensor& y,
              int64_t c0, bool store, double floor_, at::Tensor shift_out, at::Tensor sum_out, at::Tensor target,
              at::Tensor best, at::Tensor best_idx, at::Tensor logit_sum) {
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1, "fwd_tile: tile must be 2-D with unit column stride");
  TORCH_CHECK(tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble,
              "fwd_tile: tile must be float32 or float64, got ", tile.scalar_type());
  const int64_t R = tile.size(0), c = tile.size(1);
  const auto dt = tile.scalar_type();
  if (inv_w.has_value() && inv_w->defined())
    TORCH_CHECK(inv_w->is_contiguous() && inv_w->numel() == c && inv_w->scalar_type() == dt, "fwd_tile: inv_w");
  TORCH_CHECK(y.is_contiguous() && y.numel() == R && y.scalar_type() == at::kLong, "fwd_tile: y");
  TORCH_CHECK(shift_out.numel() == R && sum_out.numel() == R && target.numel() == R, "fwd_tile: row outputs");
  TORCH_CHECK(shift_out.scalar_type() == dt && sum_out.scalar_type() == dt && target.scalar_type() == dt,
              "fwd_tile: row outputs must have the tile's dtype");
  TORCH_CHECK(target.is_contiguous(), "fwd_tile: target must be contiguous");
  if (best.numel() > 0)
    TORCH_CHECK(best.numel() == R && best_idx.numel() == R && best.is_contiguous() && best_idx.is_contiguous() &&
                best.scalar_type() == dt && best_idx.scalar_type() == at::kLong, "fwd_tile: best / best_idx");
  if (logit_sum.numel() > 0)
    TORCH_CHECK(logit_sum.numel() == R && logit_sum.is_contiguous() && logit_sum.scalar_type() == dt,
                "fwd_tile: logit_sum");
  AT_DISPATCH_FLOATING_TYPES(dt, "fwd_tile", [&] {
    fwd_tile_impl<scalar_t>(tile, inv_w, scale, y, c0, store, floor_, shift_out, sum_out, target, best, best_idx,
                            logit_sum);
  });
}

// -- grad_tile --------------------------------------------------------------------------------------

template <typename T>
void grad_tile_impl(at::Tensor& tile, const c10::optional<at::Tensor>& inv_w, const at::Tensor& y, int64_t c0,
                    bool from_logits, double scale, const at::Tensor& shift, const at::Tensor& a,
                    const at::Tensor& b, double floor_, double tiny) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t R = tile.size(0), c = tile.size(1);
  T* base = tile.data_ptr<T>();
  const int64_t ld = tile.stride(0);
  const T* iw = inv_w.has_value() && inv_w->defined() ? inv_w->data_ptr<T>() : nullptr;
  const int64_t* yl = y.data_ptr<int64_t>();
  const T* shp = from_logits ? shift.data_ptr<T>() : nullptr;
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const T s = static_cast<T>(scale), fl = static_cast<T>(floor_), tn = static_cast<T>(tiny);

  at::parallel_for(0, R, row_grain(c), [&](int64_t r_begin, int64_t r_end) {
    FlushDenormals ftz;
    const V vs(s), vfl(fl), vtn(tn), vzero(T(0));
    for (int64_t i = r_begin; i < r_end; ++i) {
      T* row = base + i * ld;
      const T ai = ap[i], bi = bp[i];
      const V va(ai), vb(bi);
      const T sh = from_logits ? shp[i] : T(0);
      const V vsh(sh);
      int64_t j = 0;
      for (; j + L <= c; j += L) {
        V p = V::loadu(row + j);
        V iwv = iw ? V::loadu(iw + j) : V(T(1));
        if (from_logits) p = at::vec::maximum(p * (iwv * vs) - vsh, vfl).exp();
        V g = (va * p - vb) * iwv;
        g = V::blendv(g, vzero, g.abs() < vtn);
        g.store(row + j);
      }
      for (; j < c; ++j) {
        T p = row[j];
        const T iwj = iw ? iw[j] : T(1);
        if (from_logits) p = std::exp(std::max(p * (iwj * s) - sh, fl));
        T g = (ai * p - bi) * iwj;
        row[j] = std::abs(g) < tn ? T(0) : g;
      }
      const int64_t t = yl[i] - c0;
      if (t >= 0 && t < c) row[t] = 0;
    }
  });
}

void grad_tile(at::Tensor tile, const c10::optional<at::Tensor>& inv_w, const at::Tensor& y, int64_t c0,
               bool from_logits, double scale, const at::Tensor& shift, const at::Tensor& a, const at::Tensor& b,
               double floor_, double tiny) {
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1, "grad_tile: tile must be 2-D with unit column stride");
  TORCH_CHECK(tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble,
              "grad_tile: tile must be float32 or float64, got ", tile.scalar_type());
  const int64_t R = tile.size(0), c = tile.size(1);
  const auto dt = tile.scalar_type();
  if (inv_w.has_value() && inv_w->defined())
    TORCH_CHECK(inv_w->is_contiguous() && inv_w->numel() == c && inv_w->scalar_type() == dt, "grad_tile: inv_w");
  TORCH_CHECK(y.is_contiguous() && y.numel() == R && y.scalar_type() == at::kLong, "grad_tile: y");
  for (const at::Tensor* v : {&a, &b})
    TORCH_CHECK(v->is_contiguous() && v->numel() == R && v->scalar_type() == dt, "grad_tile: row factors");
  if (from_logits)
    TORCH_CHECK(shift.is_contiguous() && shift.numel() == R && shift.scalar_type() == dt, "grad_tile: shift");
  AT_DISPATCH_FLOATING_TYPES(dt, "grad_tile", [&] {
    grad_tile_impl<scalar_t>(tile, inv_w, y, c0, from_logits, scale, shift, a, b, floor_, tiny);
  });
}

// -- normalize_w_backward ------------------------------------------------------------------------------

template <typename T>
void normalize_w_backward_impl(at::Tensor& dD, const at::Tensor& W, const at::Tensor& inv_w, double limit) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t C = dD.size(0), D = dD.size(1);
  T* dp = dD.data_ptr<T>();
  const T* wp = W.data_ptr<T>();
  const int64_t ldd = dD.stride(0), ldw = W.stride(0);
  const T* iw = inv_w.data_ptr<T>();
  const T lim = static_cast<T>(limit);
  at::parallel_for(0, C, row_grain(2 * D), [&](int64_t j_begin, int64_t j_end) {
    FlushDenormals ftz;
    for (int64_t r = j_begin; r < j_end; ++r) {
      const T inv = iw[r];
      if (inv >= lim) continue;  // clamped norm: the map is linear, no projection
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
  });
}

void normalize_w_backward(at::Tensor dD, const at::Tensor& W, const at::Tensor& inv_w, double limit) {
  TORCH_CHECK(dD.dim() == 2 && W.dim() == 2 && dD.sizes() == W.sizes(), "normalize_w_backward: dD and W shapes");
  TORCH_CHECK(dD.stride(1) == 1 && W.stride(1) == 1, "normalize_w_backward: rows must have unit stride");
  TORCH_CHECK(dD.scalar_type() == W.scalar_type() && inv_w.scalar_type() == dD.scalar_type(),
              "normalize_w_backward: dD, W and inv_w must share a dtype");
  TORCH_CHECK(inv_w.is_contiguous() && inv_w.numel() == dD.size(0), "normalize_w_backward: inv_w");
  AT_DISPATCH_FLOATING_TYPES(dD.scalar_type(), "normalize_w_backward", [&] {
    normalize_w_backward_impl<scalar_t>(dD, W, inv_w, limit);
  });
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
  m.def("vector_bits() -> int", &vector_bits);
}

TORCH_LIBRARY_IMPL(marginops_native, CPU, m) {
  m.impl("fwd_tile", &fwd_tile);
  m.impl("grad_tile", &grad_tile);
  m.impl("normalize_w_backward", &normalize_w_backward);
}
