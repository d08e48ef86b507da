// Fused CPU kernels of the sparse FFN at batch 1-2 (docs/kernels.md), registered as torch ops
// prosparse::active, prosparse::up_step, prosparse::down_step and prosparse::predicted_ffn.
// Built and loaded by prosparse/kernels/fused.py; prosparse/kernels/cpu.py is their pure-torch
// twin and fallback.
//
// - active: the sorted union over tokens of the neurons with act(g) != 0, in one pass (what
//   reference.active_neurons(activate(g)) computes in four torch ops).
// - up_step, step (2): a gather-dot over the active rows of W1, read in place (no gathered
//   copy), UP_ROWS rows at a time against one pass over x (x's loads shared, UP_ROWS streams in
//   flight), while the next UP_ROWS active rows are prefetched line by line; active rows split
//   across threads by count, each thread a contiguous run of them. Every row keeps its own
//   accumulators, so a row's result does not depend on its group or thread.
// - down_step, step (3): an axpy over the active rows of W2^T, DOWN_ROWS rows at a time, into
//   fp32 accumulators. The active rows are cut into a number of chunks that depends only on
//   their count (PROSPARSE_DOWN_CHUNKS, default 8): each chunk sums its rows in idx order into
//   its own partial, threads take whole chunks (streaming whole rows), and the partials are
//   added in chunk order; few rows (or PROSPARSE_DOWN_CHUNKS=0) split d_model's columns
//   instead. Either way every output element is summed in an order fixed by idx alone
//   (bit-identical results at any thread count).
// - predicted_ffn: per token, the gate and up rows of UP_ROWS / 2 predicted neurons per pass
//   over x (as step (2), the next ones prefetched), the activation, then the down axpy over
//   the neurons whose x1 is non-zero.
//
// Vectors are GCC/Clang vector extensions as wide as the ISA compiled for (16 floats: one zmm
// under -mavx512f, 8: one ymm under -mavx2, 4: one xmm otherwise; a wider generic vector would
// be split and spilled), so one source serves every ISA that fused.py chooses flags for from
// what the CPU reports. Loops step by E = 32 elements (one 64-byte line of bf16, two of fp32).
// bf16 widens to fp32 by a 16-bit shift; accumulation is fp32. Rounding follows the reference
// (reference.py): the dot is rounded to the input dtype before act(g) * u, which is rounded
// again, exactly as torch computes `act(g) * (x @ W1^T)` in bf16. NaN follows IEEE semantics
// (a NaN gate is active).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace prosparse_fused {

#if defined(__AVX512F__)
constexpr int W = 16;  // floats per vector
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
constexpr int E = 32;       // elements per loop step
constexpr int NV = E / W;   // vectors per loop step
constexpr int NREG = W == 16 ? 32 : 16;  // vector registers

// Tuning knobs, fixed at compile time (fused.py passes $PROSPARSE_CPU_CFLAGS through, e.g.
// -DPROSPARSE_UP_ROWS=1; the build hash covers them). Defaults from `prosparse bench ops` on
// the 2-core AVX2 VM (docs/kernels.md).
#ifndef PROSPARSE_UP_ROWS
#define PROSPARSE_UP_ROWS 4  // step (2): active rows of W1 dotted per pass over x
#endif
#ifndef PROSPARSE_DOWN_ROWS
#define PROSPARSE_DOWN_ROWS 4  // step (3): active rows of W2^T per pass over the accumulators
#endif
constexpr int G = PROSPARSE_UP_ROWS;
constexpr int R = PROSPARSE_DOWN_ROWS;
static_assert(G >= 1 && G <= 8, "PROSPARSE_UP_ROWS must be 1..8");
static_assert(R >= 1 && R <= 16, "PROSPARSE_DOWN_ROWS must be 1..16");
// fp32 accumulators per row in step (2): two, or one where G rows of two would not fit the
// registers. A property of the build, not of a group: every row sums in the same order.
constexpr int NA = std::max(1, std::min(2, NREG / 2 / G));
static_assert(NV % NA == 0, "a loop step's vectors must spread evenly over the accumulators");
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
using bf16 = uint16_t;  // bf16 storage: the upper half of an fp32

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// bf16 -> fp32: zero-extend to 32 bits, shift into the upper half. Spelled with intrinsics on
// AVX2 / AVX-512, where GCC 12 splits the generic conversion into 128-bit halves in the hot
// loops (six instructions per ymm instead of two, a load-extend and a shift).
inline vf load(const bf16* p) {
#if defined(__AVX512F__)
  __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))), 16);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
#endif
  vf v;
  static_assert(sizeof u == sizeof v, "one vector of fp32 per W bf16");
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{} + s; }

inline float scalar(float v) { return v; }
inline float scalar(bf16 b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round an fp32 value to T's precision (round to nearest even, as torch does), and store it.
template <typename T> inline float rounded(float v);
template <> inline float rounded<float>(float v) { return v; }
template <> inline float rounded<bf16>(float v) { return static_cast<float>(c10::BFloat16(v)); }
inline void put(float* p, float v) { *p = v; }
inline void put(bf16* p, float v) {
  c10::BFloat16 b(v);
  std::memcpy(p, &b, 2);
}

inline float hsum(vf v) {  // fixed order: deterministic
  float s = 0.f;
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
}

// The cache lines one E-element step of a T row spans, prefetched into L2 for the next row.
template <typename T>
inline void prefetch_step(const T* p) {
  constexpr int lines = (E * sizeof(T) + 63) / 64;
  for (int l = 0; l < lines; ++l) __builtin_prefetch(reinterpret_cast<const char*>(p) + 64 * l, 0, 2);
}

// s[r] = dot(rows[r], x) over n elements in fp32 for M rows in one pass over x, NA
// accumulators per row; the `nn` rows of `next` are prefetched meanwhile, line by line.
template <typename T, int M>
inline void dot_rows(const T* const* rows, const float* __restrict x, int64_t n,
                     const T* const* next, int nn, float* s) {
  vf a[M][NA];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    for (int h = 0; h < NA; ++h) a[r][h] = vf{};
  int64_t k = 0;
  for (; k + E <= n; k += E) {
    for (int q = 0; q < nn; ++q) prefetch_step(next[q] + k);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const vf xv = load(x + k + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) a[r][v % NA] += load(rows[r] + k + v * W) * xv;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    vf t = a[r][0];
    for (int h = 1; h < NA; ++h) t += a[r][h];
    s[r] = hsum(t);
  }
  // The tail, one explicit FMA per element: left to contraction, GCC fuses it for some M and
  // not for others, and a row's result would then depend on its group.
  for (; k < n; ++k)
    for (int r = 0; r < M; ++r) s[r] = __builtin_fmaf(scalar(rows[r][k]), x[k], s[r]);
}

// dot_rows for m <= M rows (a group cut short at the end of a thread's rows).
template <typename T, int M>
inline void dot_upto(int m, const T* const* rows, const float* x, int64_t n,
                     const T* const* next, int nn, float* s) {
  if constexpr (M > 1) {
    if (m < M) return dot_upto<T, M - 1>(m, rows, x, n, next, nn, s);
  }
  dot_rows<T, M>(rows, x, n, next, nn, s);
}

// The activations computed in-kernel, and PRE: `g` already holds act(g) (fused.py passes any
// other activation that way, computed by torch).
enum Act { RELU = 0, FATRELU = 1, SHIFTED_RELU = 2, PRE = 3 };

// act(g) in T's precision; `p` is already rounded to T (fused.py does it). "Zero where below"
// keeps a NaN gate NaN, as torch.relu and the reference's torch.where do.
template <typename T>
inline float activate(float g, int act, float p) {
  if (act == PRE) return g;
  if (act == RELU) return g < 0.f ? 0.f : g;
  if (act == FATRELU) return g < p ? 0.f : g;
  float d = rounded<T>(g - p);
  return d < 0.f ? 0.f : d;
}

// Run f(begin, end) over [0, n) split into at most torch.get_num_threads() contiguous chunks
// of at least `min_chunk` items; the split depends only on n and the thread count.
template <typename F>
void parallel_chunks(int64_t n, int64_t min_chunk, const F& f) {
  int64_t nt = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, n / min_chunk));
  if (nt <= 1 || omp_in_parallel()) {
    f(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t t = omp_get_thread_num(), m = omp_get_num_threads();
    int64_t chunk = (n + m - 1) / m;
    int64_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
    if (b < e) f(b, e);
  }
}

std::vector<float> to_f32(const at::Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), t.data_ptr<float>(), out.size() * sizeof(float));
  } else {
    const bf16* p = reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
    for (size_t i = 0; i < out.size(); ++i) out[i] = scalar(p[i]);
  }
  return out;
}

// ---- the active set ---------------------------------------------------------------------

// out[0, n) = the rows r where act(g[t, r]) != 0 for some token t, ascending; returns n.
template <typename T>
int64_t active_kernel(const T* g, int64_t tokens, int64_t d_ff, int act, float p, int64_t* out) {
  int64_t n = 0;
  for (int64_t r = 0; r < d_ff; ++r) {
    bool on = false;
    for (int64_t t = 0; t < tokens; ++t) on |= activate<T>(scalar(g[t * d_ff + r]), act, p) != 0.f;
    out[n] = r;  // branch-free: kept only when `on`
    n += on;
  }
  return n;
}

// ---- step (2) ---------------------------------------------------------------------------

// Rows idx[b, e) of step (2), G at a time; the G active rows after each group are prefetched.
template <typename T>
void up_rows(const float* xf, int64_t tokens, int64_t d_model, const T* g, int64_t d_ff,
             const T* w1, int64_t ld, const int64_t* idx, int64_t b, int64_t e, int act,
             float p, T* out) {
  const T* rows[G];
  const T* next[G];
  float a[G], s[G];
  for (int64_t i = b; i < e; i += G) {
    const int m = static_cast<int>(std::min<int64_t>(G, e - i));
    int nn = static_cast<int>(std::clamp<int64_t>(e - i - m, 0, G));
    for (int r = 0; r < m; ++r) rows[r] = w1 + idx[i + r] * ld;
    for (int q = 0; q < nn; ++q) next[q] = w1 + idx[i + m + q] * ld;
    for (int64_t t = 0; t < tokens; ++t) {
      bool any = false;
      for (int r = 0; r < m; ++r) {
        a[r] = activate<T>(scalar(g[t * d_ff + idx[i + r]]), act, p);
        any |= a[r] != 0.f;
      }
      if (!any) continue;  // the group is inactive for this token: its x1 stays exact zeros
      dot_upto<T, G>(m, rows, xf + t * d_model, d_model, next, nn, s);
      nn = 0;  // prefetched once per group
      for (int r = 0; r < m; ++r)
        if (a[r] != 0.f)  // inactive for this token (a union row): its x1 stays an exact zero
          put(out + t * d_ff + idx[i + r], rounded<T>(a[r] * rounded<T>(s[r])));
    }
  }
}

template <typename T>
void up_kernel(const float* xf, int64_t tokens, int64_t d_model, const T* g, int64_t d_ff,
               const T* w1, int64_t ld, const int64_t* idx, int64_t n, int act, float p,
               T* out) {
  parallel_chunks(n, 16, [&](int64_t b, int64_t e) {
    up_rows(xf, tokens, d_model, g, d_ff, w1, ld, idx, b, e, act, p, out);
  });
}

// ---- step (3) ---------------------------------------------------------------------------

// acc[c0:c1] += sum_r v[r] * rows[r][c0:c1] for M rows, one after another (each an FMA into
// the same accumulator, so the sum's order is idx order whatever M), prefetching `next`.
template <typename T, int M>
inline void axpy_rows(float* __restrict acc, const T* const* rows, const float* v, int64_t c0,
                      int64_t c1, const T* const* next, int nn) {
  vf vs[M];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) vs[r] = splat(v[r]);
  int64_t c = c0;
  for (; c + E <= c1; c += E) {
    for (int q = 0; q < nn; ++q) prefetch_step(next[q] + c);
#pragma GCC unroll 8
    for (int h = 0; h < E; h += W) {
      vf a = load(acc + c + h);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) a += vs[r] * load(rows[r] + c + h);
      store(acc + c + h, a);
    }
  }
  for (; c < c1; ++c) {  // explicit FMAs, as in dot_rows' tail
    float a = acc[c];
    for (int r = 0; r < M; ++r) a = __builtin_fmaf(v[r], scalar(rows[r][c]), a);
    acc[c] = a;
  }
}

// axpy_rows for m <= M rows (the last group).
template <typename T, int M>
inline void axpy_upto(int m, float* acc, const T* const* rows, const float* v, int64_t c0,
                      int64_t c1, const T* const* next, int nn) {
  if constexpr (M > 1) {
    if (m < M) return axpy_upto<T, M - 1>(m, acc, rows, v, c0, c1, next, nn);
  }
  axpy_rows<T, M>(acc, rows, v, c0, c1, next, nn);
}

// The axpy of rows idx[i0, i1) over columns [c0, c1) of every token into acc (tokens rows of
// ld floats, already initialised), R rows at a time, the next R rows prefetched.
template <typename T>
void axpy_range(const float* v, int64_t tokens, int64_t n, const T* w2t, int64_t ld,
                const int64_t* idx, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* acc,
                int64_t acc_ld) {
  const T* rows[R];
  const T* next[R];
  float vv[R];
  for (int64_t i = i0; i < i1; i += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, i1 - i));
    const int nn = static_cast<int>(std::clamp<int64_t>(i1 - i - nr, 0, R));
    for (int r = 0; r < nr; ++r) rows[r] = w2t + idx[i + r] * ld;
    for (int q = 0; q < nn; ++q) next[q] = w2t + idx[i + nr + q] * ld;
    for (int64_t t = 0; t < tokens; ++t) {
      for (int r = 0; r < nr; ++r) vv[r] = v[t * n + i + r];
      axpy_upto<T, R>(nr, acc + t * acc_ld, rows, vv, c0, c1, next, t == 0 ? nn : 0);
    }
  }
}

// Step (3) splits the active rows into a fixed number of chunks that depends only on n (at
// most PROSPARSE_DOWN_CHUNKS, each of at least DOWN_CHUNK_MIN rows): every chunk sums its rows
// in idx order over all columns into its own fp32 partial, threads taking whole chunks, and
// the partials are added in chunk order. Each thread streams whole rows (a column split gives
// each of 2 threads half-rows, 4 KB runs of a 7B bf16 row; docs/kernels.md has the A/B).
// 0 = the column split (every element summed in plain idx order).
#ifndef PROSPARSE_DOWN_CHUNKS
#define PROSPARSE_DOWN_CHUNKS 8
#endif
static_assert(PROSPARSE_DOWN_CHUNKS >= 0 && PROSPARSE_DOWN_CHUNKS <= 64,
              "PROSPARSE_DOWN_CHUNKS must be 0..64");
constexpr int64_t DOWN_CHUNK_MIN = 64;

// out[t, :] = sum_i v[t * n + i] * w2t[idx[i], :].
template <typename T>
void down_kernel(const float* v, int64_t tokens, const T* w2t, int64_t ld, int64_t d_model,
                 const int64_t* idx, int64_t n, T* out, int64_t out_ld) {
  const int64_t block = E;  // columns per unit of a column split
  const int64_t blocks = (d_model + block - 1) / block;
  const int64_t chunks = std::min<int64_t>(PROSPARSE_DOWN_CHUNKS, n / DOWN_CHUNK_MIN);
  if (chunks <= 1) {  // the column split: few rows, or PROSPARSE_DOWN_CHUNKS=0
    parallel_chunks(blocks, 8, [&](int64_t b, int64_t e) {
      const int64_t c0 = b * block, c1 = std::min(d_model, e * block);
      std::vector<float> acc(tokens * d_model, 0.f);  // only [c0, c1) of each token is used
      axpy_range(v, tokens, n, w2t, ld, idx, 0, n, c0, c1, acc.data(), d_model);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = c0; c < c1; ++c) put(out + t * out_ld + c, acc[t * d_model + c]);
    });
    return;
  }
  const int64_t span = tokens * d_model;  // one chunk's partial
  std::vector<float> part(chunks * span);
  parallel_chunks(chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      float* acc = part.data() + k * span;
      std::fill(acc, acc + span, 0.f);
      axpy_range(v, tokens, n, w2t, ld, idx, n * k / chunks, n * (k + 1) / chunks, 0, d_model,
                 acc, d_model);
    }
  });
  // The partials in chunk order, ((p0 + p1) + p2) + ..., vectorised over columns.
  parallel_chunks(blocks, 8, [&](int64_t b, int64_t e) {
    const int64_t c0 = b * block, c1 = std::min(d_model, e * block);
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t c = c0;
      for (; c + W <= c1; c += W) {
        vf s = load(part.data() + t * d_model + c);
        for (int64_t k = 1; k < chunks; ++k) s += load(part.data() + k * span + t * d_model + c);
        for (int j = 0; j < W; ++j) put(out + t * out_ld + c + j, s[j]);
      }
      for (; c < c1; ++c) {
        float s = part[t * d_model + c];
        for (int64_t k = 1; k < chunks; ++k) s += part[k * span + t * d_model + c];
        put(out + t * out_ld + c, s);
      }
    }
  });
}

// ---- ops ----------------------------------------------------------------------------------

void check_rows(const at::Tensor& w, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, name, " must be 2-D with contiguous rows");
  TORCH_CHECK(w.scalar_type() == dtype, name, " is ", w.scalar_type(), ", expected ", dtype);
}

void check_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "prosparse fused kernels take float32 or bfloat16, got ", dtype);
}

at::Tensor checked_idx(const at::Tensor& idx, int64_t d_ff) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1, "idx must be 1-D int64");
  at::Tensor c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < d_ff, "idx[", i, "] = ", p[i], " is outside [0, ", d_ff, ")");
  return c;
}

template <typename T, typename S>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<S>());
}

// reference.active_neurons(activate(g, act, param)) in one pass: g (tokens, d_ff) -> int64.
at::Tensor active(const at::Tensor& g_, int64_t act, double param) {
  const auto dtype = g_.scalar_type();
  check_dtype(dtype);
  TORCH_CHECK(g_.device().is_cpu() && g_.dim() == 2, "g must be a 2-D CPU tensor (tokens, d_ff)");
  TORCH_CHECK(act >= 0 && act <= 3, "act must be 0 (relu), 1 (fatrelu), 2 (shifted_relu) or "
              "3 (g holds act(g))");
  at::Tensor g = g_.contiguous();
  const int64_t tokens = g.size(0), d_ff = g.size(1);
  at::Tensor idx = at::empty({d_ff}, g.options().dtype(at::kLong));
  const float p = static_cast<float>(param);
  const int64_t n = dtype == at::kFloat
      ? active_kernel<float>(g.data_ptr<float>(), tokens, d_ff, act, p, idx.data_ptr<int64_t>())
      : active_kernel<bf16>(ptr<bf16, at::BFloat16>(g), tokens, d_ff, act, p,
                            idx.data_ptr<int64_t>());
  idx.resize_({n});
  return idx;
}

at::Tensor up_step(const at::Tensor& x_, const at::Tensor& g_, const at::Tensor& w1,
                   const at::Tensor& idx_, int64_t act, double param) {
  const auto dtype = x_.scalar_type();
  check_dtype(dtype);
  check_rows(w1, "w1", dtype);
  at::Tensor x = x_.contiguous(), g = g_.contiguous();
  TORCH_CHECK(x.dim() == 2 && g.dim() == 2 && g.size(0) == x.size(0) &&
              x.size(1) == w1.size(1) && g.size(1) == w1.size(0),
              "x (tokens, d_model), g (tokens, d_ff) and w1 (d_ff, d_model) disagree");
  TORCH_CHECK(g.scalar_type() == dtype, "g must have x's dtype");
  TORCH_CHECK(act >= 0 && act <= 3, "act must be 0 (relu), 1 (fatrelu), 2 (shifted_relu) or "
              "3 (g holds act(g))");
  const int64_t tokens = x.size(0), d_model = x.size(1), d_ff = w1.size(0);
  at::Tensor idx = checked_idx(idx_, d_ff);
  at::Tensor out = at::zeros({tokens, d_ff}, x.options());
  std::vector<float> xf = to_f32(x);
  const float p = static_cast<float>(param);
  if (dtype == at::kFloat) {
    up_kernel<float>(xf.data(), tokens, d_model, g.data_ptr<float>(), d_ff, w1.data_ptr<float>(),
                     w1.stride(0), idx.data_ptr<int64_t>(), idx.numel(), act, p,
                     out.data_ptr<float>());
  } else {
    up_kernel<bf16>(xf.data(), tokens, d_model, ptr<bf16, at::BFloat16>(g), d_ff,
                    ptr<bf16, at::BFloat16>(w1), w1.stride(0), idx.data_ptr<int64_t>(),
                    idx.numel(), act, p, ptr<bf16, at::BFloat16>(out));
  }
  return out;
}

at::Tensor down_step(const at::Tensor& x1_, const at::Tensor& w2t, const at::Tensor& idx_) {
  const auto dtype = x1_.scalar_type();
  check_dtype(dtype);
  check_rows(w2t, "w2t", dtype);
  at::Tensor x1 = x1_.contiguous();
  TORCH_CHECK(x1.dim() == 2 && x1.size(1) == w2t.size(0),
              "x1 (tokens, d_ff) and w2t (d_ff, d_model) disagree");
  const int64_t tokens = x1.size(0), d_ff = x1.size(1), d_model = w2t.size(1);
  at::Tensor idx = checked_idx(idx_, d_ff);
  const int64_t n = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<float> v(tokens * n);  // x1 at the active neurons, fp32
  at::Tensor out = at::empty({tokens, d_model}, x1.options());
  if (dtype == at::kFloat) {
    const float* x = x1.data_ptr<float>();
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < n; ++i) v[t * n + i] = x[t * d_ff + ip[i]];
    down_kernel<float>(v.data(), tokens, w2t.data_ptr<float>(), w2t.stride(0), d_model, ip, n,
                       out.data_ptr<float>(), d_model);
  } else {
    const bf16* x = ptr<bf16, at::BFloat16>(x1);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < n; ++i) v[t * n + i] = scalar(x[t * d_ff + ip[i]]);
    down_kernel<bf16>(v.data(), tokens, ptr<bf16, at::BFloat16>(w2t), w2t.stride(0), d_model,
                      ip, n, ptr<bf16, at::BFloat16>(out), d_model);
  }
  return out;
}

constexpr int PN = G >= 2 ? G / 2 : 1;  // predicted neurons per pass: 2 * PN rows, as step (2)

template <typename T>
void predicted_kernel(const float* xf, int64_t tokens, int64_t d_model, const bool* mask,
                      const T* wg, int64_t ldg, const T* wu, int64_t ldu, const T* w2t,
                      int64_t ld2, const T* bg, const T* bu, int64_t d_ff, int act, float p,
                      T* out) {
  std::vector<int64_t> idx;
  std::vector<float> vals;
  std::vector<int64_t> keep;
  std::vector<float> kept;
  for (int64_t t = 0; t < tokens; ++t) {
    idx.clear();
    for (int64_t r = 0; r < d_ff; ++r)
      if (mask[t * d_ff + r]) idx.push_back(r);  // the predicted neurons of this token
    const int64_t n = static_cast<int64_t>(idx.size());
    vals.assign(n, 0.f);
    const float* x = xf + t * d_model;
    parallel_chunks(n, 16, [&](int64_t b, int64_t e) {
      const T* rows[2 * PN];  // the gate and up rows of PN neurons, dotted in one pass over x
      const T* next[2 * PN];
      float su[2 * PN];
      for (int64_t i = b; i < e; i += PN) {
        const int m = static_cast<int>(std::min<int64_t>(PN, e - i));
        const int nn = static_cast<int>(std::clamp<int64_t>(e - i - m, 0, PN));
        for (int j = 0; j < m; ++j) {
          rows[2 * j] = wg + idx[i + j] * ldg;
          rows[2 * j + 1] = wu + idx[i + j] * ldu;
        }
        for (int q = 0; q < nn; ++q) {
          next[2 * q] = wg + idx[i + m + q] * ldg;
          next[2 * q + 1] = wu + idx[i + m + q] * ldu;
        }
        dot_upto<T, 2 * PN>(2 * m, rows, x, d_model, next, 2 * nn, su);
        for (int j = 0; j < m; ++j) {
          const int64_t r = idx[i + j];
          float gv = rounded<T>(su[2 * j]), uv = rounded<T>(su[2 * j + 1]);
          if (bg) gv = rounded<T>(gv + scalar(bg[r]));
          if (bu) uv = rounded<T>(uv + scalar(bu[r]));
          vals[i + j] = rounded<T>(activate<T>(gv, act, p) * uv);  // x1 of neuron r
        }
      }
    });
    keep.clear();
    kept.clear();
    for (int64_t i = 0; i < n; ++i)
      if (vals[i] != 0.f) {  // a zero x1 adds nothing: its W2^T row is not read (NaN is read)
        keep.push_back(idx[i]);
        kept.push_back(vals[i]);
      }
    down_kernel<T>(kept.data(), 1, w2t, ld2, d_model, keep.data(),
                   static_cast<int64_t>(keep.size()), out + t * d_model, d_model);
  }
}

at::Tensor predicted_ffn(const at::Tensor& x_, const at::Tensor& mask_, const at::Tensor& w_gate,
                         const at::Tensor& w_up, const at::Tensor& w2t, int64_t act, double param,
                         const std::optional<at::Tensor>& b_gate_,
                         const std::optional<at::Tensor>& b_up_) {
  const auto dtype = x_.scalar_type();
  check_dtype(dtype);
  check_rows(w_gate, "w_gate", dtype);
  check_rows(w_up, "w_up", dtype);
  check_rows(w2t, "w2t", dtype);
  at::Tensor x = x_.contiguous(), mask = mask_.contiguous();
  const int64_t tokens = x.size(0), d_model = x.size(1), d_ff = w_gate.size(0);
  TORCH_CHECK(x.dim() == 2 && w_gate.size(1) == d_model && w_up.sizes() == w_gate.sizes() &&
              w2t.size(0) == d_ff, "x, w_gate, w_up and w2t disagree in shape");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == tokens &&
              mask.size(1) == d_ff, "mask must be bool (tokens, d_ff)");
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (relu), 1 (fatrelu) or 2 (shifted_relu)");
  at::Tensor bg, bu;
  if (b_gate_.has_value()) {
    bg = b_gate_->contiguous();
    TORCH_CHECK(bg.numel() == d_ff && bg.scalar_type() == dtype, "b_gate must be (d_ff,)");
  }
  if (b_up_.has_value()) {
    bu = b_up_->contiguous();
    TORCH_CHECK(bu.numel() == d_ff && bu.scalar_type() == dtype, "b_up must be (d_ff,)");
  }
  at::Tensor out = at::empty({tokens, w2t.size(1)}, x.options());
  std::vector<float> xf = to_f32(x);
  const float p = static_cast<float>(param);
  const bool* m = mask.data_ptr<bool>();
  if (dtype == at::kFloat) {
    predicted_kernel<float>(xf.data(), tokens, d_model, m, w_gate.data_ptr<float>(),
                            w_gate.stride(0), w_up.data_ptr<float>(), w_up.stride(0),
                            w2t.data_ptr<float>(), w2t.stride(0),
                            bg.defined() ? bg.data_ptr<float>() : nullptr,
                            bu.defined() ? bu.data_ptr<float>() : nullptr, d_ff, act, p,
                            out.data_ptr<float>());
  } else {
    using B = at::BFloat16;
    predicted_kernel<bf16>(xf.data(), tokens, d_model, m, ptr<bf16, B>(w_gate), w_gate.stride(0),
                           ptr<bf16, B>(w_up), w_up.stride(0), ptr<bf16, B>(w2t), w2t.stride(0),
                           bg.defined() ? ptr<bf16, B>(bg) : nullptr,
                           bu.defined() ? ptr<bf16, B>(bu) : nullptr, d_ff, act, p,
                           ptr<bf16, B>(out));
  }
  return out;
}

}  // namespace prosparse_fused

TORCH_LIBRARY(prosparse, m) {
  m.def("active(Tensor g, int act, float param) -> Tensor");
  m.def("up_step(Tensor x, Tensor g, Tensor w1, Tensor idx, int act, float param) -> Tensor");
  m.def("down_step(Tensor x1, Tensor w2t, Tensor idx) -> Tensor");
  m.def("predicted_ffn(Tensor x, Tensor mask, Tensor w_gate, Tensor w_up, Tensor w2t, int act, "
        "float param, Tensor? b_gate, Tensor? b_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(prosparse, CPU, m) {
  m.impl("active", &prosparse_fused::active);
  m.impl("up_step", &prosparse_fused::up_step);
  m.impl("down_step", &prosparse_fused::down_step);
  m.impl("predicted_ffn", &prosparse_fused::predicted_ffn);
}
