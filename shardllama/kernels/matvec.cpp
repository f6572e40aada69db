// Matrix-vector products with 16-bit weights, for decoding: y = x @ W.T (F.linear without bias); and the same
// for int8 weights with one f32 scale per row (`matvec_int8`, at the end: the section "int8 weights").
//
// W is (N, K) f16 or bf16 with unit stride along K and any row stride (a worker's weights are slices of
// a shared-memory segment; no alignment is assumed).  x is (..., K) in W's dtype with at most kMaxM rows
// (one token per sequence of a decode step).  Sums are f32; each output is rounded once to W's dtype, as
// torch's own kernels do.
//
// Decoding reads every weight once per token and does two flops per weight, so this is a memory-bandwidth
// problem: the aim is the weights flowing at the machine's read bandwidth.  The loop walks W front to back,
// `rows` (1, 2 or 4) rows at a time, widens 16 weights per instruction (F16C `vcvtph2ps`, or a shift for
// bf16), multiplies each widened vector into every row of x, and keeps several independent f32 sums
// per row in flight so that FMA latency never stalls the stream.  It can prefetch `prefetch` bytes ahead
// (rounded up to whole rows), which covers the restart of the hardware prefetcher at each 4 KiB page.
// Which of these is fastest depends on the CPU: on Zen 5 one row with prefetch (a single linear stream; two
// or four rows measured 10-25% slower), on Sapphire Rapids four rows without (~10% faster than one row,
// tools/bench_kernels.py --variants), on Zen 3 (AVX2 only) four rows (~16.5 GB/s a thread against one row's
// 12.5: more misses in flight), so the variant is a setting (`set_variant`) that shardllama.kernels
// chooses by a short calibration on each machine.  Every variant sums each row in the same order, so the
// variants' results are bit-identical and the choice changes speed only.  x stays 16-bit and is widened as
// it is used: at half the bytes of f32 it stays in L1 next to the weight stream (11008 f32 values would not;
// f32 x measured 20-50% slower).
//
// One source serves two instruction sets, picked at run time through function target attributes (no
// -march flag, so the cached library also runs on the CPU that did not build it): AVX-512 (F, BW, VL, DQ,
// with F16C and FMA) and AVX2 (with F16C and FMA).  Threads: at::parallel_for over contiguous ranges of
// rows, i.e. torch's own OpenMP pool with torch.get_num_threads() threads (a worker process sets 1); the
// library is built with -fopenmp (without it ATen's parallel_for runs serially) and binds to the libgomp
// torch has already loaded.  The GIL is released while it runs, as torch's own ops do.

// Not <torch/extension.h>: these three cost half its compile time (10 s instead of 20 s on 2 cores).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,avx2")))
#define TARGET_AVX2 __attribute__((target("avx2,f16c,fma")))
#define INLINE inline __attribute__((always_inline))

constexpr int kMaxM = 8;
constexpr int64_t kDefaultPrefetch = 4096;  // bytes ahead, rounded up to whole rows; tools/bench_kernels.py --sweep

// The f16/bf16 variant used when a call does not name one (set_variant; shardllama.kernels calibrates it).
struct Variant {
  int64_t rows = 1;  // weight rows per step: 1, 2 or 4
  int64_t prefetch = kDefaultPrefetch;  // bytes ahead; 0: no software prefetch
};
// [0] for rows of kShortK weights or more, [1] for shorter ones (a 135M model's 576): the fastest variant
// differs between them (Zen 3: 4 rows + prefetch for 4096, one row + prefetch for 576, 16.8 and 11.2 GB/s).
constexpr int64_t kShortK = 1024;
Variant g_variant[2];

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
    return kAvx2;
  return kNone;
}

struct Problem {
  const uint16_t* w;  // row i of W at w + i * ldw
  int64_t ldw;
  const uint16_t* x;  // the M rows of x, row m at x + m * ldx, zero-padded beyond K
  int64_t ldx;
  uint16_t* y;  // (M, N) outputs, row m at y + m * N
  int64_t N, K;
  int64_t ahead;  // prefetch the rows this far ahead (0: no prefetch)
};

// Rounding the f32 sums to the 16-bit type, to nearest even as torch does.
template <bool BF16>
__attribute__((target("f16c"))) INLINE uint16_t narrow(float s) {
  if constexpr (BF16) return c10::BFloat16(s).x;
  else return _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
}

template <bool BF16>
__attribute__((target("f16c"))) INLINE float widen(uint16_t h) {
  if constexpr (BF16) return c10::detail::f32_from_bits(h);
  else return _cvtsh_ss(h);
}

// ---- AVX-512: 16 lanes, 32 registers ------------------------------------------------------------------

template <bool BF16>
TARGET_AVX512 INLINE __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

template <bool BF16>
TARGET_AVX512 INLINE __m512 load16_masked(const uint16_t* p, __mmask16 m) {  // reads nothing past the mask
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

// Independent sums per row of x, so that at least 4 FMA chains are in flight (FMA latency 4, 2 per cycle).
constexpr int sums(int M) { return M == 1 ? 4 : M == 2 ? 2 : 1; }

template <bool BF16, int M>
TARGET_AVX512 INLINE void fma16(__m512 (&acc)[M], __m512 wv, const Problem& p, int64_t k) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, load16<BF16>(p.x + m * p.ldx + k), acc[m]);
}

// Rows [begin, end) of W times the M rows of x, R weight rows per step.  Row i's sums are the same for any
// R: chunk c of 16 weights goes to sum c % S, the masked tail to sum 0, and the S sums are added in order.
// R rows need R * S * M sums in registers: with more than 16 (M > 4 at R = 4) a step takes one row.
template <bool BF16, int M, int R>
TARGET_AVX512 void rows_avx512(const Problem& p, int64_t begin, int64_t end) {
  constexpr int S = sums(M), U = S < 2 ? 2 : S;  // U chunks of 16 weights per iteration: >= one 64-byte line
  int64_t i = begin;
  if constexpr (R > 1) {
    // Prefetch a whole step of rows ahead: the rows `ahead` beyond this step's last.
    const int64_t ahead = p.ahead ? (p.ahead + R - 1) / R * R : 0;
    for (; i + R <= end; i += R) {
      const uint16_t* w = p.w + i * p.ldw;
      __m512 acc[R][S][M];
      for (int r = 0; r < R; ++r)
        for (int s = 0; s < S; ++s)
          for (int m = 0; m < M; ++m) acc[r][s][m] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 * U <= p.K; k += 16 * U) {
        if (ahead)
          for (int r = 0; r < R; ++r) {
            const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + r + ahead, p.N - 1) * p.ldw);
#pragma GCC unroll 4
            for (int line = 0; line < U / 2; ++line) _mm_prefetch(pf + 2 * k + 64 * line, _MM_HINT_T0);
          }
#pragma GCC unroll 4
        for (int j = 0; j < U; ++j) {
          __m512 xv[M];
          for (int m = 0; m < M; ++m) xv[m] = load16<BF16>(p.x + m * p.ldx + k + 16 * j);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m512 wv = load16<BF16>(w + r * p.ldw + k + 16 * j);
            for (int m = 0; m < M; ++m) acc[r][j % S][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][j % S][m]);
          }
        }
      }
      for (; k < p.K; k += 16) {
        __mmask16 mask = p.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.K - k)) - 1);
        for (int r = 0; r < R; ++r) {
          const __m512 wv = load16_masked<BF16>(w + r * p.ldw + k, mask);
          for (int m = 0; m < M; ++m)
            acc[r][0][m] = _mm512_fmadd_ps(wv, load16<BF16>(p.x + m * p.ldx + k), acc[r][0][m]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
          __m512 sum = acc[r][0][m];
          for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[r][s][m]);
          p.y[m * p.N + i + r] = narrow<BF16>(_mm512_reduce_add_ps(sum));
        }
    }
  }
  for (; i < end; ++i) {  // one row at a time (R = 1, or the rows left over)
    const uint16_t* w = p.w + i * p.ldw;
    const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead, p.N - 1) * p.ldw);
    __m512 acc[S][M];
    for (int s = 0; s < S; ++s)
      for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= p.K; k += 16 * U) {
      if (p.ahead)
#pragma GCC unroll 4
        for (int line = 0; line < U / 2; ++line) _mm_prefetch(pf + 2 * k + 64 * line, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < U; ++j) fma16<BF16, M>(acc[j % S], load16<BF16>(w + k + 16 * j), p, k + 16 * j);
    }
    for (; k < p.K; k += 16) {  // x is zero-padded to a multiple of 16; W is not, so mask it
      __mmask16 mask = p.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.K - k)) - 1);
      fma16<BF16, M>(acc[0], load16_masked<BF16>(w + k, mask), p, k);
    }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
      p.y[m * p.N + i] = narrow<BF16>(_mm512_reduce_add_ps(sum));
    }
  }
}

// ---- AVX2: 8 lanes, 16 registers -----------------------------------------------------------------------

template <bool BF16>
TARGET_AVX2 INLINE __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

TARGET_AVX2 INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool BF16, int M>
TARGET_AVX2 INLINE void fma8(__m256 (&acc)[M], __m256 wv, const Problem& p, int64_t k) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, load8<BF16>(p.x + m * p.ldx + k), acc[m]);
}

// AVX2's sums per row of x: half AVX-512's, so that 4 rows of one x row fit in its 16 registers (Zen 3 streams
// ~12.5 GB/s per thread with one row a step, ~16.5 with four: more rows, more misses in flight).
constexpr int sums2(int M) { return M == 1 ? 2 : 1; }

// As rows_avx512, 8 lanes wide: row i's sums are the same for any R (chunk c of 8 weights to sum c % S, the
// chunks short of a 32-weight step to sum 0, the last K % 8 in scalar code after the sums are added).
template <bool BF16, int M, int R>
TARGET_AVX2 void rows_avx2(const Problem& p, int64_t begin, int64_t end) {
  constexpr int S = sums2(M), U = 4;  // U chunks of 8 weights per iteration: one 64-byte line
  int64_t i = begin;
  for (; i + R <= end; i += R) {
    const uint16_t* w = p.w + i * p.ldw;
    const int64_t ahead = p.ahead ? (p.ahead + R - 1) / R * R : 0;  // a whole step of rows ahead
    __m256 acc[R][S][M];
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s)
        for (int m = 0; m < M; ++m) acc[r][s][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= p.K; k += 8 * U) {
      if (ahead)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(p.w + std::min(i + r + ahead, p.N - 1) * p.ldw) + 2 * k,
                       _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < U; ++j) {
        __m256 xv[M];
        for (int m = 0; m < M; ++m) xv[m] = load8<BF16>(p.x + m * p.ldx + k + 8 * j);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256 wv = load8<BF16>(w + r * p.ldw + k + 8 * j);
          for (int m = 0; m < M; ++m) acc[r][j % S][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][j % S][m]);
        }
      }
    }
    for (; k + 8 <= p.K; k += 8)
      for (int r = 0; r < R; ++r) fma8<BF16, M>(acc[r][0], load8<BF16>(w + r * p.ldw + k), p, k);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        __m256 sum = acc[r][0][m];
        for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[r][s][m]);
        float total = hsum8(sum);
        for (int64_t kk = k; kk < p.K; ++kk)
          total += widen<BF16>(w[r * p.ldw + kk]) * widen<BF16>(p.x[m * p.ldx + kk]);
        p.y[m * p.N + i + r] = narrow<BF16>(total);
      }
  }
  if constexpr (R > 1) rows_avx2<BF16, M, 1>(p, i, end);  // the rows left over, one at a time
}

// ---- int8 weights, one f32 scale per row ---------------------------------------------------------------
//
// y[m, i] = scale[i] * sum_k x[m, k] * q[i, k]: the same single front-to-back stream of rows, at half the
// bytes of f16.  Each 16 (8 on AVX2) weights are sign-extended to int32 and converted to f32 (exact, since
// |q| <= 127) and multiplied into x by FMA; the row's scale multiplies the finished sum once (scale * sum =
// sum of scale * terms, which is also why a worker holding a column slice of a row keeps the whole row's
// scale).
//
// x comes in as f32 and is kept here as f16, scaled per row by a power of two that puts its largest value
// near 2^15: one byte per weight leaves x's reads from L1 as the next limit, and f32 x (44 KB at K = 11008)
// falls out of L1 and halved the rate on w2-shaped matrices (17 against 35 GB/s, tools/bench_kernels.py).
// The power of two is exact and undone on the sum, so x loses only f16's rounding (relative 2^-11, an order
// of magnitude below the int8 rounding of the weights) and never overflows.

struct Problem8 {
  const int8_t* w;  // row i of q at w + i * ldw
  int64_t ldw;
  const uint16_t* x;  // the M rows of x as f16 (scaled), row m at x + m * ldx, zero-padded beyond K
  int64_t ldx;
  const float* unscale;  // (M,) the power of two that undoes row m's scaling
  const float* scale;  // (N,) the weight rows' scales
  float* y;  // (M, N)
  int64_t N, K;
  int64_t ahead;  // prefetch the rows this far ahead (0: no prefetch)
};

TARGET_AVX512 INLINE __m512 load16_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

TARGET_AVX512 INLINE __m512 load16_i8_masked(const int8_t* p, __mmask16 m) {  // reads nothing past the mask
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

template <int M>
TARGET_AVX512 INLINE void fma16_i8(__m512 (&acc)[M], __m512 wv, const Problem8& p, int64_t k) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, load16<false>(p.x + m * p.ldx + k), acc[m]);
}

template <int M>
TARGET_AVX512 void rows8_avx512(const Problem8& p, int64_t begin, int64_t end) {
  constexpr int S = sums(M), U = 4;  // U chunks of 16 weights per iteration: one 64-byte line
  for (int64_t i = begin; i < end; ++i) {
    const int8_t* w = p.w + i * p.ldw;
    const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead, p.N - 1) * p.ldw);
    __m512 acc[S][M];
    for (int s = 0; s < S; ++s)
      for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= p.K; k += 16 * U) {
      if (p.ahead) _mm_prefetch(pf + k, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < U; ++j) fma16_i8<M>(acc[j % S], load16_i8(w + k + 16 * j), p, k + 16 * j);
    }
    for (; k < p.K; k += 16) {  // x is zero-padded to a multiple of 16; q is not, so mask it
      __mmask16 mask = p.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.K - k)) - 1);
      fma16_i8<M>(acc[0], load16_i8_masked(w + k, mask), p, k);
    }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
      p.y[m * p.N + i] = p.scale[i] * (_mm512_reduce_add_ps(sum) * p.unscale[m]);
    }
  }
}

// A full block of 8 rows of x (a prompt, or 8 sequences decoding) is bound by reading and widening x, not by
// the weights: there, four weight rows at a time share each widened vector of x (1.5x at 8 rows; at 4 rows or
// fewer it measured no gain, and one row of x keeps the single stream above).  The 32 sums do not all fit in
// registers; it is faster all the same.
template <int M>
TARGET_AVX512 void rows8x4_avx512(const Problem8& p, int64_t begin, int64_t end) {
  constexpr int R = 4;
  int64_t i = begin;
  for (; i + R <= end; i += R) {
    const int8_t* w = p.w + i * p.ldw;
    const char* pf[R];
    for (int r = 0; r < R; ++r) pf[r] = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead + r, p.N - 1) * p.ldw);
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    auto step = [&](int64_t k, const __m512 (&wv)[R]) TARGET_AVX512 {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512 xv = load16<false>(p.x + m * p.ldx + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    };
    int64_t k = 0;
    for (; k + 64 <= p.K; k += 64) {
      if (p.ahead)
        for (int r = 0; r < R; ++r) _mm_prefetch(pf[r] + k, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = load16_i8(w + r * p.ldw + k + 16 * j);
        step(k + 16 * j, wv);
      }
    }
    for (; k < p.K; k += 16) {
      __mmask16 mask = p.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.K - k)) - 1);
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16_i8_masked(w + r * p.ldw + k, mask);
      step(k, wv);
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        p.y[m * p.N + i + r] = p.scale[i + r] * (_mm512_reduce_add_ps(acc[r][m]) * p.unscale[m]);
  }
  if (i < end) rows8_avx512<M>(p, i, end);
}

TARGET_AVX2 INLINE __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int M>
TARGET_AVX2 INLINE void fma8_i8(__m256 (&acc)[M], __m256 wv, const Problem8& p, int64_t k) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, load8<false>(p.x + m * p.ldx + k), acc[m]);
}

template <int M>
TARGET_AVX2 void rows8_avx2(const Problem8& p, int64_t begin, int64_t end) {
  constexpr int S = sums(M), U = 8;  // U chunks of 8 weights per iteration: one 64-byte line
  for (int64_t i = begin; i < end; ++i) {
    const int8_t* w = p.w + i * p.ldw;
    const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead, p.N - 1) * p.ldw);
    __m256 acc[S][M];
    for (int s = 0; s < S; ++s)
      for (int m = 0; m < M; ++m) acc[s][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= p.K; k += 8 * U) {
      if (p.ahead) _mm_prefetch(pf + k, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int j = 0; j < U; ++j) fma8_i8<M>(acc[j % S], load8_i8(w + k + 8 * j), p, k + 8 * j);
    }
    for (; k + 8 <= p.K; k += 8) fma8_i8<M>(acc[0], load8_i8(w + k), p, k);
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[0][m];
      for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s][m]);
      float total = hsum8(sum);
      for (int64_t kk = k; kk < p.K; ++kk) total += float(w[kk]) * widen<false>(p.x[m * p.ldx + kk]);
      p.y[m * p.N + i] = p.scale[i] * (total * p.unscale[m]);
    }
  }
}

// One row of f32 x into f16, times 2^e with e chosen so that the largest |x| lands in [2^14, 2^15): no
// overflow, and f16's full precision for everything within 2^24 of the largest value.  Returns 2^-e.
// Infinities and NaNs are converted unscaled, and propagate as they would in f32.
__attribute__((target("avx2,f16c"))) float to_f16_scaled(const float* x, int64_t K, uint16_t* out) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  int e = 0;
  if (amax > 0.0f && std::isfinite(amax)) {
    std::frexp(amax, &e);  // amax = f * 2^e, 0.5 <= f < 1
    e = std::clamp(15 - e, -100, 100);  // 2^e and 2^-e stay normal floats
  }
  const float up = std::ldexp(1.0f, e);
  const __m256 upv = _mm256_set1_ps(up);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(x + k), upv), _MM_FROUND_TO_NEAREST_INT));
  for (; k < K; ++k) out[k] = _cvtss_sh(x[k] * up, _MM_FROUND_TO_NEAREST_INT);
  return std::ldexp(1.0f, -e);
}

// ---- dispatch ------------------------------------------------------------------------------------------

using RowsFn = void (*)(const Problem&, int64_t, int64_t);
using Table = std::array<RowsFn, kMaxM>;

// R rows per step where the R * S * M sums fit in 16 of the 32 registers, else one.
constexpr int fits(int M, int R) { return R * sums(M) * M <= 16 ? R : 1; }
template <bool BF16, int R, std::size_t... I>
constexpr Table avx512_table(std::index_sequence<I...>) { return {&rows_avx512<BF16, int(I) + 1, fits(int(I) + 1, R)>...}; }
// AVX2: R rows where the R * S * M sums, M rows of x and a weight fit in its 16 registers, else one.
constexpr int fits2(int M, int R) { return R * sums2(M) * M + M + 1 <= 16 ? R : 1; }
template <bool BF16, int R, std::size_t... I>
constexpr Table avx2_table(std::index_sequence<I...>) { return {&rows_avx2<BF16, int(I) + 1, fits2(int(I) + 1, R)>...}; }

constexpr int64_t kRows[] = {1, 2, 4};  // the rows-per-step variants
constexpr auto kSeq = std::make_index_sequence<kMaxM>();
const Table kTables[2][2][3] = {  // [isa == AVX-512][bf16][rows 1, 2, 4]
    {{avx2_table<false, 1>(kSeq), avx2_table<false, 2>(kSeq), avx2_table<false, 4>(kSeq)},
     {avx2_table<true, 1>(kSeq), avx2_table<true, 2>(kSeq), avx2_table<true, 4>(kSeq)}},
    {{avx512_table<false, 1>(kSeq), avx512_table<false, 2>(kSeq), avx512_table<false, 4>(kSeq)},
     {avx512_table<true, 1>(kSeq), avx512_table<true, 2>(kSeq), avx512_table<true, 4>(kSeq)}},
};

int rows_index(int64_t rows) {
  for (int r = 0; r < 3; ++r)
    if (kRows[r] == rows) return r;
  TORCH_CHECK(false, "matvec: rows per step must be 1, 2 or 4, got ", rows);
  return 0;
}

using Rows8Fn = void (*)(const Problem8&, int64_t, int64_t);
using Table8 = std::array<Rows8Fn, kMaxM>;

template <std::size_t... I>
constexpr Table8 avx512_table8(std::index_sequence<I...>) {
  return {(int(I) + 1 == kMaxM ? &rows8x4_avx512<int(I) + 1> : &rows8_avx512<int(I) + 1>)...};
}
template <std::size_t... I>
constexpr Table8 avx2_table8(std::index_sequence<I...>) { return {&rows8_avx2<int(I) + 1>...}; }

const Table8 kTables8[2] = {avx2_table8(std::make_index_sequence<kMaxM>()),  // [isa == AVX-512]
                            avx512_table8(std::make_index_sequence<kMaxM>())};

// The instruction set to run: -1 picks the best this CPU has.
int64_t pick_isa(int64_t isa, const char* who) {
  static const Isa have = best_isa();
  if (isa < 0) isa = have;
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512, who, ": unknown instruction set ", isa);
  TORCH_CHECK(isa <= have, who, ": this CPU lacks the instruction set asked for (", isa, " > ", int64_t(have), ")");
  return isa;
}

at::Tensor matvec(const at::Tensor& x, const at::Tensor& w, int64_t prefetch, int64_t isa, int64_t rows) {
  TORCH_CHECK(w.device().is_cpu() && x.device().is_cpu(), "matvec: CPU tensors only");
  TORCH_CHECK(w.dim() == 2, "matvec: the weight must be 2-D, got ", w.dim(), "-D");
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
              "matvec: the weight must be float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "matvec: x is ", x.scalar_type(), ", the weight ", w.scalar_type());
  TORCH_CHECK(w.size(0) <= 1 || w.stride(1) == 1 || w.size(1) <= 1, "matvec: the weight's rows must be contiguous");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "matvec: x has ", x.size(-1), " columns, the weight ", K);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  TORCH_CHECK(M <= kMaxM, "matvec: at most ", kMaxM, " rows of x, got ", M);
  isa = pick_isa(isa, "matvec");
  const Variant v = g_variant[w.size(1) < kShortK];
  const int r = rows_index(rows < 0 ? v.rows : rows);

  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return y;

  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const at::Tensor xc = x.contiguous();
  // x stays 16-bit (widened as it is used: it stays in L1 beside the weight stream) and is zero-padded to a
  // multiple of 16, so the kernels never mask it; the extra 32 bytes put its rows in different cache sets.
  const int64_t ldx = (K + 15) / 16 * 16 + 16;
  std::vector<uint16_t> xs(M * ldx, 0);
  const auto* xbits = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  for (int64_t m = 0; m < M; ++m) std::copy(xbits + m * K, xbits + (m + 1) * K, xs.data() + m * ldx);

  if (prefetch < 0) prefetch = v.prefetch;
  const int64_t row_bytes = std::max<int64_t>(2 * K, 64);
  const Problem p{reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0), xs.data(), ldx,
                  reinterpret_cast<uint16_t*>(y.data_ptr()), N, K, (prefetch + row_bytes - 1) / row_bytes};
  const RowsFn fn = kTables[isa == kAvx512][bf16][r][M - 1];
  // Contiguous ranges of rows per thread, at least 64 KiB of weights each.
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return y;
}

at::Tensor matvec_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t prefetch,
                       int64_t isa) {
  TORCH_CHECK(q.device().is_cpu() && x.device().is_cpu() && scale.device().is_cpu(), "matvec_int8: CPU tensors only");
  TORCH_CHECK(q.dim() == 2, "matvec_int8: the weight must be 2-D, got ", q.dim(), "-D");
  TORCH_CHECK(q.scalar_type() == at::kChar, "matvec_int8: the weight must be int8, got ", q.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "matvec_int8: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(q.size(0) <= 1 || q.stride(1) == 1 || q.size(1) <= 1, "matvec_int8: the weight's rows must be contiguous");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N,
              "matvec_int8: the scale must be float32 of shape (", N, "), got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "matvec_int8: x has ", x.size(-1), " columns, the weight ", K);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  isa = pick_isa(isa, "matvec_int8");

  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return y;

  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  // As in matvec: zero-padded to a multiple of 16, and 16 more values put the rows in other cache sets.
  const int64_t ldx = (K + 15) / 16 * 16 + 16;
  std::vector<uint16_t> xs(M * ldx, 0);
  std::vector<float> unscale(M);
  for (int64_t m = 0; m < M; ++m) unscale[m] = to_f16_scaled(xc.data_ptr<float>() + m * K, K, xs.data() + m * ldx);

  if (prefetch < 0) prefetch = kDefaultPrefetch;
  const int64_t row_bytes = std::max<int64_t>(K, 64);
  const Problem8 p{q.data_ptr<int8_t>(), q.stride(0), xs.data(), ldx, unscale.data(), sc.data_ptr<float>(),
                   y.data_ptr<float>(), N, K, (prefetch + row_bytes - 1) / row_bytes};
  const Table8& table = kTables8[isa == kAvx512];
  // More than kMaxM rows of x (a prompt) go in blocks of kMaxM over chunks of 256 KiB of q, so that each chunk
  // comes from memory once and from L2 for the other blocks.  Threads take contiguous ranges of rows, at
  // least 64 KiB of weights each.
  const int64_t chunk = M <= kMaxM ? N : std::max<int64_t>(1, 262144 / row_bytes);
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += chunk) {
      for (int64_t m = 0; m < M; m += kMaxM) {
        Problem8 block = p;
        block.x += m * ldx;
        block.unscale += m;
        block.y += m * N;
        table[std::min<int64_t>(kMaxM, M - m) - 1](block, i, std::min(i + chunk, end));
      }
    }
  });
  return y;
}

// Reads every byte of t once, in `streams` interleaved parts of 64-byte lines, and returns their XOR: a plain
// read of memory with nothing else to do, the ceiling tools/scaling.py holds decoding to.  Portable code; -O3
// vectorises it.  One thread.
uint64_t read_all(const at::Tensor& t, int64_t streams) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "read_all: a contiguous CPU tensor");
  TORCH_CHECK(streams >= 1 && streams <= 16, "read_all: 1..16 streams, got ", streams);
  const auto* p = reinterpret_cast<const uint64_t*>(t.data_ptr());
  const int64_t lines = t.numel() * t.element_size() / 64, part = lines / streams;
  uint64_t acc[8] = {};
  for (int64_t i = 0; i < part; ++i)
    for (int64_t s = 0; s < streams; ++s) {
      const uint64_t* line = p + 8 * (s * part + i);
      for (int j = 0; j < 8; ++j) acc[j] ^= line[j];
    }
  uint64_t out = 0;
  for (int j = 0; j < 8; ++j) out ^= acc[j];
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "f16/bf16 and int8 matrix-vector products for decoding (shardllama.kernels)";
  m.def("matvec", &matvec,
        "y = x @ w.T for a few rows of x; f32 sums, output in w's dtype; prefetch: bytes ahead, rows: weight rows "
        "per step (1, 2, 4; -1: the variant set_variant chose)", py::arg("x"), py::arg("w"), py::arg("prefetch") = -1,
        py::arg("isa") = -1, py::arg("rows") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("set_variant", [](int64_t rows, int64_t prefetch, int64_t short_rows, int64_t short_prefetch) {
    if (short_rows < 0) short_rows = rows;
    if (short_prefetch < 0) short_prefetch = prefetch;
    for (int64_t r : {rows, short_rows}) rows_index(r);
    for (int64_t b : {prefetch, short_prefetch})
      TORCH_CHECK(b >= 0 && b <= (1 << 20), "matvec: prefetch must be 0..1 MiB, got ", b);
    g_variant[0] = Variant{rows, prefetch};
    g_variant[1] = Variant{short_rows, short_prefetch};
  }, "the f16/bf16 variants matvec uses when a call names none: weight rows per step and prefetch bytes, for rows "
        "of short_k weights or more and (short_rows, short_prefetch; -1: the same as those) for shorter ones",
        py::arg("rows"), py::arg("prefetch"), py::arg("short_rows") = -1, py::arg("short_prefetch") = -1);
  m.def("variant", [](bool short_rows) {
    const Variant v = g_variant[short_rows];
    return std::make_pair(v.rows, v.prefetch);
  },
        "(rows, prefetch) in use for rows of short_k weights or more (or, short_rows, for shorter ones)",
        py::arg("short_rows") = false);
  m.attr("short_k") = kShortK;
  m.def("variant_rows", [](int64_t isa) {
    pick_isa(isa, "variant_rows");
    return std::vector<int64_t>(std::begin(kRows), std::end(kRows));
  }, "the rows-per-step variants that differ on this instruction set", py::arg("isa") = -1);
  m.def("matvec_int8", &matvec_int8,
        "y = scale * (x @ q.T) for int8 q (N, K), f32 scale (N,) and f32 x (..., K), x rounded to f16 after a "
        "power-of-two scaling per row; f32 sums and output; "
        "prefetch: bytes ahead (-1: default)", py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("prefetch") = -1,
        py::arg("isa") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("read_all", &read_all, "XOR of every 64-bit word of t, read in `streams` interleaved parts (a bandwidth "
        "probe)", py::arg("t"), py::arg("streams") = 1, py::call_guard<py::gil_scoped_release>());
  m.def("best_isa", []() { return int64_t(best_isa()); }, "2: AVX-512, 1: AVX2, 0: neither");
  m.attr("max_rows") = kMaxM;
  m.attr("default_prefetch") = kDefaultPrefetch;
}
