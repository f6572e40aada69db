// Products with GGUF quantized weights, computed on the file's own blocks (shardllama/kernels/blocks.py).
//
// A matrix W (N rows, K columns) is held as uint8 blocks (N, K / BS, TS): BS weights in TS bytes per block, in
// ggml's layout (ggml-common.h), unit stride within a row's blocks and any row stride (a worker's slice of a
// shared-memory tensor, or a cut of whole blocks out of each row).  Nothing is repacked: memory is the file's
// bytes.  The layouts (offsets in bytes; "f16" a half-precision scale; q the stored integers):
//
//   Q4_0   d f16 @0, qs[16] @2          w[j] = d * (q - 8)    q: low nibbles are weights 0-15, high 16-31
//   Q4_1   d @0, m @2, qs[16] @4        w[j] = d * q + m
//   Q5_0   d @0, qh u32 @2, qs[16] @6   w[j] = d * (q - 16)   q = nibble as Q4_0 | bit j of qh << 4
//   Q5_1   d @0, m @2, qh @4, qs @8     w[j] = d * q + m
//   Q8_0   d @0, qs int8[32] @2         w[j] = d * q
//   IQ4_NL d @0, qs[16] @2              w[j] = d * kvalues[q]  (q as Q4_0, a table of 16 levels)
//   Q4_K   256 weights in 8 sub-blocks of 32: d @0, dmin @2, 6-bit scales and mins packed in 12 bytes @4,
//          qs[128] @16: sub-blocks 2c and 2c+1 are the low and high nibbles of bytes 32c..32c+31.
//          w = (d * sc[g]) * q - dmin * m[g]
//   Q5_K   as Q4_K with qh[32] @16 (bit g of byte l: the 5th bit of weight l of sub-block g), qs[128] @48
//   Q6_K   256 weights, 16 sub-blocks of 16: ql[128] @0 (low 4 bits), qh[64] @128 (high 2 bits), int8
//          scales[16] @192, d @208.  w = (d * sc[p / 16]) * (q - 32); the bits of weight p = 128h + r:
//          nibble r / 64 of ql[64h + r % 64], bits 2(r / 32) of qh[32h + r % 32]
//
// dequantize() computes exactly what gguf.quants.dequantize does in numpy: the same products and sums in the
// same order, each rounded once (the library is built with -ffp-contract=off so that no multiply and add
// fuse; the kernel's fused multiply-adds are FMA intrinsics, which that flag does not touch).
//
// matvec() is y = x @ W.T for up to kMaxM rows of f32 x (a decode step), f32 sums.  With 4-5 bits a weight
// and f32 activations this is bound by instructions, not memory, so the loop counts them: each block is
// decoded in registers into 16-lane f32 vectors of its integers (one table permute, vpermps, turns a nibble
// into its float value: Q4_0's offset and IQ4_NL's levels come free), and the scales are applied per
// sub-block to the partial sums rather than per weight ("scale after": t = sum q * x over the sub-block, then
// acc += t * scale: 3 operations per 32 weights and row of x against 4 when decoding w = q * scale first).
// The mins of Q4_1/Q5_1/Q4_K/Q5_K go through sums of x per 32 columns computed once per call:
// sum_j (q_j s + m) x_j = s sum_j q_j x_j + m sum_j x_j.  With more rows of x, decoding once and sharing
// w among them wins ("scale before"), as it does for Q6_K's 16-weight sub-blocks.  Both orders sum the
// same terms; only f32 rounding differs, and the tests compare with a tolerance.
//
// AVX-512 (F, BW, VL, DQ) only: both CPU kinds this project runs on have it; elsewhere blocks.py falls back
// to dequantizing in torch.  Threads: at::parallel_for over contiguous ranges of rows (torch's OpenMP pool;
// a worker process runs one thread); the GIL is released while it runs.

// Not <torch/extension.h>: these three cost half its compile time (as in matvec.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxM = 8;

// GGMLQuantizationType values
enum Type : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
                      kIQ4_NL = 20 };

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

// Everything from here to the dispatch is compiled for AVX-512 and runs only where has_avx512() said so.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,avx2,bmi2")
#define INLINE inline __attribute__((always_inline))

INLINE float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

INLINE __m512i bytes16(const uint8_t* p) {  // 16 bytes, one to each 32-bit lane (zero-extended)
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Float tables indexed by the low 4 bits of each lane (vpermps) or 5 bits (vpermt2ps over two tables).
INLINE __m512 levels(int first) {
  return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_ps(float(first)));
}
INLINE __m512 iq4nl_levels() {
  return _mm512_setr_ps(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
}

// bits 0-3 from a, the rest from b (the 5th bit of a 5-bit index, put at bit 4 of b): vpternlogd "c ? a : b"
INLINE __m512i low4_from(__m512i a, __m512i b) { return _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi32(15), 0xE4); }

// ---- the block types ---------------------------------------------------------------------------------
//
// Each has BS weights in TS bytes, decoded as BS / 16 vectors of 16 lanes; a scale group is GV consecutive
// vectors (one scale, and one min where MIN).  scales() writes a block's G = BS / 16 / GV scales (and mins,
// as added offsets: w = q * s + mn); decode() calls f(v, q) for each vector v in order with the 16 integers
// (offsets included) as floats.  w = q * s (+ mn) is then exactly what gguf computes.

template <int T> struct Fmt;

// the four 32-weight types with 4-bit nibbles: Q4_0, Q4_1, IQ4_NL (and the low bits of Q5_0/Q5_1)
template <int QS, class F> INLINE void nibbles(const uint8_t* b, __m512 table, F&& f) {
  const __m512i v = bytes16(b + QS);
  f(0, _mm512_permutexvar_ps(v, table));
  f(1, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
}

template <> struct Fmt<kQ4_0> {
  static constexpr int BS = 32, TS = 18, GV = 2;
  static constexpr bool MIN = false;
  static INLINE void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<2>(b, levels(-8), f); }
};

template <> struct Fmt<kIQ4_NL> : Fmt<kQ4_0> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<2>(b, iq4nl_levels(), f); }
};

template <> struct Fmt<kQ4_1> {
  static constexpr int BS = 32, TS = 20, GV = 2;
  static constexpr bool MIN = true;
  static INLINE void scales(const uint8_t* b, float* s, float* mn) { s[0] = f16(b), mn[0] = f16(b + 2); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<4>(b, levels(0), f); }
};

template <int QH, int QS, class F> INLINE void fives(const uint8_t* b, int first, F&& f) {
  uint32_t qh;
  std::memcpy(&qh, b + QH, 4);
  const __m512i v = bytes16(b + QS), c16 = _mm512_set1_epi32(16);
  const __m512 lo = levels(first), hi = levels(first + 16);
  const __m512i i0 = _mm512_and_si512(v, _mm512_set1_epi32(15)), i1 = _mm512_srli_epi32(v, 4);
  f(0, _mm512_permutex2var_ps(lo, _mm512_mask_or_epi32(i0, __mmask16(qh), i0, c16), hi));
  f(1, _mm512_permutex2var_ps(lo, _mm512_mask_or_epi32(i1, __mmask16(qh >> 16), i1, c16), hi));
}

template <> struct Fmt<kQ5_0> {
  static constexpr int BS = 32, TS = 22, GV = 2;
  static constexpr bool MIN = false;
  static INLINE void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { fives<2, 6>(b, -16, f); }
};

template <> struct Fmt<kQ5_1> {
  static constexpr int BS = 32, TS = 24, GV = 2;
  static constexpr bool MIN = true;
  static INLINE void scales(const uint8_t* b, float* s, float* mn) { s[0] = f16(b), mn[0] = f16(b + 2); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { fives<4, 8>(b, 0, f); }
};

template <> struct Fmt<kQ8_0> {
  static constexpr int BS = 32, TS = 34, GV = 2;
  static constexpr bool MIN = false;
  static INLINE void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
    for (int v = 0; v < 2; ++v)
      f(v, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * v)))));
  }
};

// Q4_K/Q5_K's eight 6-bit scales and mins (12 bytes at b + 4), times d and -dmin.
INLINE void k_scales(const uint8_t* b, float* s, float* mn) {
  const float d = f16(b), dmin = f16(b + 2);
  const uint8_t* q = b + 4;
  for (int j = 0; j < 4; ++j) {
    s[j] = d * float(q[j] & 63);
    mn[j] = -(dmin * float(q[j + 4] & 63));
    s[j + 4] = d * float((q[j + 8] & 15) | ((q[j] >> 6) << 4));
    mn[j + 4] = -(dmin * float((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4)));
  }
}

template <> struct Fmt<kQ4_K> {
  static constexpr int BS = 256, TS = 144, GV = 2;
  static constexpr bool MIN = true;
  static INLINE void scales(const uint8_t* b, float* s, float* mn) { k_scales(b, s, mn); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
    const __m512 table = levels(0);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v0 = bytes16(b + 16 + 32 * c), v1 = bytes16(b + 32 + 32 * c);
      f(4 * c + 0, _mm512_permutexvar_ps(v0, table));
      f(4 * c + 1, _mm512_permutexvar_ps(v1, table));
      f(4 * c + 2, _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), table));
      f(4 * c + 3, _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), table));
    }
  }
};

// bit g of each lane moved to bit 4 (what lies above it is ignored by the 5-bit table lookup)
INLINE __m512i bit_to_4(__m512i h, int g) {
  return g <= 4 ? _mm512_slli_epi32(h, 4 - g) : _mm512_srli_epi32(h, g - 4);
}

template <> struct Fmt<kQ5_K> {
  static constexpr int BS = 256, TS = 176, GV = 2;
  static constexpr bool MIN = true;
  static INLINE void scales(const uint8_t* b, float* s, float* mn) { k_scales(b, s, mn); }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
    const __m512 lo = levels(0), hi = levels(16);
    const __m512i h0 = bytes16(b + 16), h1 = bytes16(b + 32);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v0 = bytes16(b + 48 + 32 * c), v1 = bytes16(b + 64 + 32 * c);
      f(4 * c + 0, _mm512_permutex2var_ps(lo, low4_from(v0, bit_to_4(h0, 2 * c)), hi));
      f(4 * c + 1, _mm512_permutex2var_ps(lo, low4_from(v1, bit_to_4(h1, 2 * c)), hi));
      f(4 * c + 2, _mm512_permutex2var_ps(lo, low4_from(_mm512_srli_epi32(v0, 4), bit_to_4(h0, 2 * c + 1)), hi));
      f(4 * c + 3, _mm512_permutex2var_ps(lo, low4_from(_mm512_srli_epi32(v1, 4), bit_to_4(h1, 2 * c + 1)), hi));
    }
  }
};

template <> struct Fmt<kQ6_K> {
  static constexpr int BS = 256, TS = 210, GV = 1;
  static constexpr bool MIN = false;
  static INLINE void scales(const uint8_t* b, float* s, float*) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192))));
    _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_set1_ps(f16(b + 208)), sc));
  }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
    const __m512i c63 = _mm512_set1_epi32(63), c32 = _mm512_set1_epi32(32);
    auto q = [&](__m512i low, __m512i high) {  // 6-bit index: bits 0-3 from low, 4-5 from high; minus 32
      return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(low4_from(low, high), c63), c32));
    };
#pragma GCC unroll 4
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 2; ++l) {  // weights 128h + 16l + {0, 32, 64, 96} + 0..15
        const __m512i a0 = bytes16(b + 64 * h + 16 * l), a1 = bytes16(b + 64 * h + 32 + 16 * l);
        const __m512i hq = bytes16(b + 128 + 32 * h + 16 * l);
        f(8 * h + l + 0, q(a0, _mm512_slli_epi32(hq, 4)));
        f(8 * h + l + 2, q(a1, _mm512_slli_epi32(hq, 2)));
        f(8 * h + l + 4, q(_mm512_srli_epi32(a0, 4), hq));
        f(8 * h + l + 6, q(_mm512_srli_epi32(a1, 4), _mm512_srli_epi32(hq, 2)));
      }
  }
};

// decode() above hands vectors over out of order (Q6_K); the kernels below index x by v, so order is free.

// ---- dequantization ----------------------------------------------------------------------------------

template <class T>
void dequantize_rows(const uint8_t* w, int64_t ldw, int64_t nb, float* out, int64_t ldo, int64_t begin,
                     int64_t end) {
  constexpr int G = T::BS / 16 / T::GV;
  for (int64_t i = begin; i < end; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + i * ldw + b * T::TS;
      float* o = out + i * ldo + b * T::BS;
      float s[16], mn[16];
      T::scales(blk, s, mn);
      T::decode(blk, [&](int v, __m512 q) {
        __m512 r = _mm512_mul_ps(q, _mm512_set1_ps(s[v / T::GV]));
        if constexpr (T::MIN) r = _mm512_add_ps(r, _mm512_set1_ps(mn[v / T::GV]));
        _mm512_storeu_ps(o + 16 * v, r);
      });
      (void)G;
    }
}

// ---- the matrix-vector kernel --------------------------------------------------------------------------

struct Problem {
  const uint8_t* w;  // row i's blocks at w + i * ldw
  int64_t ldw, nb;  // row stride (bytes), blocks per row
  const float* x;  // the M rows of x, row m at x + m * ldx
  int64_t ldx;
  const float* sx;  // sums of x over each 32 columns (for types with mins), row m at sx + m * ldsx
  int64_t ldsx;
  float* y;  // (M, N): y[m * N + i]
  int64_t N;
};

template <class T, int M, bool AFTER>
void rows(const Problem& p, int64_t begin, int64_t end) {
  constexpr int G = T::BS / 16 / T::GV;  // scale groups per block
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* row = p.w + i * p.ldw;
    __m512 acc[2][M];
    float macc[M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps(), macc[m] = 0.0f;
    for (int64_t b = 0; b < p.nb; ++b) {
      const uint8_t* blk = row + b * T::TS;
      const float* xb = p.x + b * T::BS;
      float s[16], mn[16];
      T::scales(blk, s, mn);
      if constexpr (AFTER) {
        __m512 t[M];
        T::decode(blk, [&](int v, __m512 q) {
          const int g = v / T::GV;
          for (int m = 0; m < M; ++m) {
            const __m512 xv = _mm512_loadu_ps(xb + m * p.ldx + 16 * v);
            t[m] = v % T::GV == 0 ? _mm512_mul_ps(q, xv) : _mm512_fmadd_ps(q, xv, t[m]);
          }
          if (v % T::GV == T::GV - 1)
            for (int m = 0; m < M; ++m) acc[g % 2][m] = _mm512_fmadd_ps(t[m], _mm512_set1_ps(s[g]), acc[g % 2][m]);
        });
        if constexpr (T::MIN)
          for (int m = 0; m < M; ++m)
            for (int g = 0; g < G; ++g) macc[m] += mn[g] * p.sx[m * p.ldsx + b * G + g];
      } else {
        T::decode(blk, [&](int v, __m512 q) {
          const int g = v / T::GV;
          const __m512 w = T::MIN ? _mm512_fmadd_ps(q, _mm512_set1_ps(s[g]), _mm512_set1_ps(mn[g]))
                                  : _mm512_mul_ps(q, _mm512_set1_ps(s[g]));
          for (int m = 0; m < M; ++m)
            acc[v % 2][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + m * p.ldx + 16 * v), acc[v % 2][m]);
        });
      }
    }
    for (int m = 0; m < M; ++m) p.y[m * p.N + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) + macc[m];
  }
}

#pragma GCC pop_options

// ---- dispatch ------------------------------------------------------------------------------------------

using DeqFn = void (*)(const uint8_t*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
using RowsFn = void (*)(const Problem&, int64_t, int64_t);

struct Kernels {
  int64_t bs, ts;
  bool min;
  DeqFn dequantize;
  std::array<RowsFn, kMaxM> after, before;  // by M - 1: scale after (per group sums) or before (decoded w)
};

template <class T, std::size_t... I>
constexpr Kernels kernels_of(std::index_sequence<I...>) {
  return {T::BS, T::TS, T::MIN, &dequantize_rows<T>,
          {&rows<T, int(I) + 1, T::GV == 2>...}, {&rows<T, int(I) + 1, false>...}};
}

const Kernels& kernels_for(int64_t qtype, const char* who) {
  constexpr auto seq = std::make_index_sequence<kMaxM>();
  static const Kernels q4_0 = kernels_of<Fmt<kQ4_0>>(seq), q4_1 = kernels_of<Fmt<kQ4_1>>(seq),
                       q5_0 = kernels_of<Fmt<kQ5_0>>(seq), q5_1 = kernels_of<Fmt<kQ5_1>>(seq),
                       q8_0 = kernels_of<Fmt<kQ8_0>>(seq), q4_k = kernels_of<Fmt<kQ4_K>>(seq),
                       q5_k = kernels_of<Fmt<kQ5_K>>(seq), q6_k = kernels_of<Fmt<kQ6_K>>(seq),
                       iq4_nl = kernels_of<Fmt<kIQ4_NL>>(seq);
  switch (qtype) {
    case kQ4_0: return q4_0;
    case kQ4_1: return q4_1;
    case kQ5_0: return q5_0;
    case kQ5_1: return q5_1;
    case kQ8_0: return q8_0;
    case kQ4_K: return q4_k;
    case kQ5_K: return q5_k;
    case kQ6_K: return q6_k;
    case kIQ4_NL: return iq4_nl;
  }
  TORCH_CHECK(false, who, ": unsupported GGML type ", qtype);
  return q4_0;
}

void check_blocks(const at::Tensor& blocks, const Kernels& k, const char* who) {
  TORCH_CHECK(has_avx512(), who, ": this CPU lacks AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(blocks.device().is_cpu(), who, ": CPU tensors only");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 3 && blocks.size(2) == k.ts, who,
              ": blocks must be uint8 (N, K / ", k.bs, ", ", k.ts, "), got ", blocks.scalar_type(), " ", blocks.sizes());
  TORCH_CHECK((blocks.size(1) <= 1 || blocks.stride(1) == k.ts) && (blocks.size(2) <= 1 || blocks.stride(2) == 1),
              who, ": a row's blocks must be contiguous, got strides ", blocks.strides());
}

at::Tensor dequantize(const at::Tensor& blocks, int64_t qtype, c10::optional<at::Tensor> out) {
  const Kernels& k = kernels_for(qtype, "dequantize");
  check_blocks(blocks, k, "dequantize");
  const int64_t N = blocks.size(0), nb = blocks.size(1);
  at::Tensor y;
  if (out) {
    y = *out;
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == N && y.size(1) == nb * k.bs &&
                (y.size(1) <= 1 || y.stride(1) == 1), "dequantize: out must be float32 (", N, ", ", nb * k.bs,
                ") with contiguous rows, got ", y.scalar_type(), " ", y.sizes());
  } else {
    y = at::empty({N, nb * k.bs}, at::TensorOptions().dtype(at::kFloat));
  }
  if (N == 0 || nb == 0) return y;
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  float* o = y.data_ptr<float>();
  const int64_t ldw = blocks.stride(0), ldo = y.stride(0);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / (nb * k.bs)),
                   [&](int64_t begin, int64_t end) { k.dequantize(w, ldw, nb, o, ldo, begin, end); });
  return y;
}

// variant: -1 chooses; 0 scale after (types with 32-weight groups), 1 scale before
at::Tensor matvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t variant) {
  const Kernels& k = kernels_for(qtype, "matvec");
  check_blocks(blocks, k, "matvec");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "matvec: x must be a float32 CPU tensor, got ",
              x.scalar_type());
  const int64_t N = blocks.size(0), nb = blocks.size(1), K = nb * k.bs;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "matvec: x has ", x.size(-1), " columns, the weight ", K);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  TORCH_CHECK(M <= kMaxM, "matvec: at most ", kMaxM, " rows of x, got ", M);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  // x rows 64 bytes apart beyond K, so that the M rows fall in different cache sets
  const int64_t ldx = K + 16, groups = K / 32;
  std::vector<float> xs(M * ldx, 0.0f), sx(k.min ? M * groups : 0);
  for (int64_t m = 0; m < M; ++m) {
    std::copy(xp + m * K, xp + (m + 1) * K, xs.data() + m * ldx);
    for (int64_t g = 0; g < (k.min ? groups : 0); ++g) {
      float s = 0.0f;
      for (int j = 0; j < 32; ++j) s += xp[m * K + 32 * g + j];
      sx[m * groups + g] = s;
    }
  }
  const bool after = variant < 0 ? M <= 2 : variant == 0;
  const RowsFn fn = (after ? k.after : k.before)[M - 1];
  const Problem p{blocks.data_ptr<uint8_t>(), blocks.stride(0), nb, xs.data(), ldx, sx.data(), groups,
                  y.data_ptr<float>(), N};
  const int64_t row_bytes = std::max<int64_t>(1, nb * k.ts);
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / row_bytes), [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GGUF quantized blocks: dequantization and matrix-vector products (shardllama.kernels.blocks)";
  m.def("dequantize", &dequantize, "(N, nb, ts) uint8 blocks of a GGML type -> (N, nb * bs) float32, into out if given",
        py::arg("blocks"), py::arg("qtype"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("matvec", &matvec, "y = x @ W.T for f32 x (..., K) of at most max_rows rows and W as blocks; f32 sums; "
        "variant: -1 chooses, 0 scales per group after the sums, 1 decodes the weights first",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"), py::arg("variant") = -1,
        py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &has_avx512, "whether this CPU has the AVX-512 (F, BW, VL, DQ) the kernels need");
  m.attr("max_rows") = kMaxM;
}
