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

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxM = 8;
constexpr int64_t kDefaultPrefetch = 4096;  // bytes ahead, rounded up to whole rows (tools/bench_qkernels.py)

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
// vectors (one scale, and one min where MIN), G groups a block.  Scales are read for CH = 16 / G blocks at
// a time (16 groups: one vector of scales, one of mins): scales(b, n, s, mn) writes s[16] and mn[16] for
// the n <= CH blocks from b, mins as added offsets (w = q * s + mn) and zero beyond the n blocks' groups.
// decode(b, f) calls f(v, q) for each vector v of a block with its 16 integers (offsets included) as
// floats.  w = q * s (+ mn) is then exactly what gguf computes.

template <int T> struct Fmt;

// The f16 scale (and min, 2 bytes later, where MIN) at the start of each of n <= 16 blocks TS bytes apart:
// one gather of a 32-bit word per block instead of a widening per block (which costs three port-5 uops,
// the port the decoding already keeps busiest).
template <int TS, bool MIN> INLINE void first_scales(const uint8_t* b, int n, float* s, float* mn) {
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(TS));
  const __mmask16 k = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, at, b, 1);
  _mm512_store_ps(s, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)));
  if constexpr (MIN) _mm512_store_ps(mn, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))));
}

template <int TS_, bool MIN_> struct Small {  // the 32-weight types: one scale (and min) per block
  static constexpr int BS = 32, TS = TS_, GV = 2;
  static constexpr bool MIN = MIN_;
  static INLINE void scales(const uint8_t* b, int n, float* s, float* mn) { first_scales<TS, MIN>(b, n, s, mn); }
};

// Q4_0, Q4_1, IQ4_NL (and the low bits of Q5_0/Q5_1): nibbles to floats through a 16-entry table
template <int QS, class F> INLINE void nibbles(const uint8_t* b, __m512 table, F&& f) {
  const __m512i v = bytes16(b + QS);
  f(0, _mm512_permutexvar_ps(v, table));
  f(1, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
}

template <> struct Fmt<kQ4_0> : Small<18, false> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<2>(b, levels(-8), f); }
};

template <> struct Fmt<kIQ4_NL> : Small<18, false> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<2>(b, iq4nl_levels(), f); }
};

template <> struct Fmt<kQ4_1> : Small<20, true> {
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

template <> struct Fmt<kQ5_0> : Small<22, false> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { fives<2, 6>(b, -16, f); }
};

template <> struct Fmt<kQ5_1> : Small<24, true> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { fives<4, 8>(b, 0, f); }
};

template <> struct Fmt<kQ8_0> : Small<34, false> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
    for (int v = 0; v < 2; ++v)
      f(v, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * v)))));
  }
};

// Q4_K/Q5_K's eight 6-bit scales and eight mins, packed in 12 bytes at b + 4, as 16 bytes (llama.cpp's
// shuffle): 0-3 hold scales 0-3 in their low 6 bits and the top bits of scales 4-7 above; 4-7 the same for
// the mins; 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
INLINE __m128i k_scale_bytes(const uint8_t* b) {
  constexpr uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
  uint32_t u[4];
  std::memcpy(u, b + 4, 12);
  u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);  // mins 4-7
  const uint32_t mins = u[1] & m6;  // mins 0-3
  u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);  // scales 4-7
  u[2] = mins;
  u[0] &= m6;  // scales 0-3
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
}

struct KQuant {  // Q4_K, Q5_K: 8 groups of 32 a block, two blocks' scales at a time
  static constexpr int BS = 256, GV = 2;
  static constexpr bool MIN = true;
  template <int TS> static INLINE void k_scales(const uint8_t* b, int n, float* s, float* mn) {
    const uint8_t* b1 = n > 1 ? b + TS : b;
    const __m128i u0 = k_scale_bytes(b), u1 = k_scale_bytes(b1);
    uint32_t d0, d1;  // d and dmin of each block
    std::memcpy(&d0, b, 4);
    std::memcpy(&d1, b1, 4);
    const __m512 dd = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_setr_epi32(int(d0), int(d1), 0, 0)));  // d0 m0 d1 m1
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512 d = _mm512_permutexvar_ps(lanes, dd);
    const __m512 dmin = _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(1)), dd);
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(u0, u1)));
    const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi64(u0, u1)));
    _mm512_store_ps(s, _mm512_mul_ps(d, sc));
    _mm512_store_ps(mn, _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), dmin), m));  // (-dmin) * m = -(dmin * m)
  }
};

template <> struct Fmt<kQ4_K> : KQuant {
  static constexpr int TS = 144;
  static INLINE void scales(const uint8_t* b, int n, float* s, float* mn) { k_scales<TS>(b, n, s, mn); }
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

template <> struct Fmt<kQ5_K> : KQuant {
  static constexpr int TS = 176;
  static INLINE void scales(const uint8_t* b, int n, float* s, float* mn) { k_scales<TS>(b, n, s, mn); }
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
  static INLINE void scales(const uint8_t* b, int, float* s, float*) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192))));
    _mm512_store_ps(s, _mm512_mul_ps(_mm512_set1_ps(f16(b + 208)), sc));
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

template <class T> constexpr int kGroups = T::BS / 16 / T::GV;  // scale groups a block
template <class T> constexpr int kChunk = 16 / kGroups<T>;  // blocks whose scales fill one vector

// ---- dequantization ----------------------------------------------------------------------------------

template <class T>
void dequantize_rows(const uint8_t* w, int64_t ldw, int64_t nb, float* out, int64_t ldo, int64_t begin,
                     int64_t end) {
  constexpr int G = kGroups<T>, CH = kChunk<T>;
  for (int64_t i = begin; i < end; ++i)
    for (int64_t b0 = 0; b0 < nb; b0 += CH) {
      const int n = int(std::min<int64_t>(CH, nb - b0));
      alignas(64) float s[16], mn[16];
      T::scales(w + i * ldw + b0 * T::TS, n, s, mn);
      for (int j = 0; j < n; ++j) {
        float* o = out + i * ldo + (b0 + j) * T::BS;
        T::decode(w + i * ldw + (b0 + j) * T::TS, [&](int v, __m512 q) {
          __m512 r = _mm512_mul_ps(q, _mm512_set1_ps(s[j * G + v / T::GV]));
          if constexpr (T::MIN) r = _mm512_add_ps(r, _mm512_set1_ps(mn[j * G + v / T::GV]));
          _mm512_storeu_ps(o + 16 * v, r);
        });
      }
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
  int64_t ahead;  // prefetch the row this many rows ahead (0: none)
};

// One block into the sums acc[2][M]: scale group g of block j goes to acc[(j * G + g) % 2], so that
// consecutive groups feed two independent chains of FMAs (j is a constant where it matters: the unrolled
// loop over a full chunk).
template <class T, int M, bool AFTER>
INLINE void block(const Problem& p, const uint8_t* blk, const float* xb, const float* s, const float* mn,
                  __m512 (&acc)[2][M], int j) {
  constexpr int G = kGroups<T>;
  if constexpr (AFTER) {  // t = sum q * x over the group, then acc += t * scale (the mins: sums of x)
    __m512 t[M];
    T::decode(blk, [&](int v, __m512 q) {
      const int g = v / T::GV;
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(xb + m * p.ldx + 16 * v);
        t[m] = v % T::GV == 0 ? _mm512_mul_ps(q, xv) : _mm512_fmadd_ps(q, xv, t[m]);
      }
      if (v % T::GV == T::GV - 1) {
        const __m512 sv = _mm512_set1_ps(s[g]);
        for (int m = 0; m < M; ++m) acc[(j * G + g) % 2][m] = _mm512_fmadd_ps(t[m], sv, acc[(j * G + g) % 2][m]);
      }
    });
  } else {  // w = q * scale (+ min), shared by the M rows of x
    T::decode(blk, [&](int v, __m512 q) {
      const int g = v / T::GV;
      const __m512 w = T::MIN ? _mm512_fmadd_ps(q, _mm512_set1_ps(s[g]), _mm512_set1_ps(mn[g]))
                              : _mm512_mul_ps(q, _mm512_set1_ps(s[g]));
      for (int m = 0; m < M; ++m)
        acc[(j * G + g) % 2][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + m * p.ldx + 16 * v), acc[(j * G + g) % 2][m]);
    });
  }
}

template <class T, int M, bool AFTER>
void rows(const Problem& p, int64_t begin, int64_t end) {
  constexpr int G = kGroups<T>, CH = kChunk<T>;
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* row = p.w + i * p.ldw;
    const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead, p.N - 1) * p.ldw);
    __m512 acc[2][M], macc[M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = macc[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < p.nb; b0 += CH) {
      const int n = int(std::min<int64_t>(CH, p.nb - b0));
      if (p.ahead)  // the same chunk of a row further on: the hardware prefetcher alone leaves gaps
        for (int64_t at = b0 * T::TS; at < (b0 + n) * T::TS; at += 64) _mm_prefetch(pf + at, _MM_HINT_T0);
      alignas(64) float s[16], mn[16];
      T::scales(row + b0 * T::TS, n, s, mn);
      // The scales are read back from memory one at a time: a broadcast load is free of the vector ports,
      // where GCC would otherwise keep the vector in a register and broadcast each lane with a port-5 vpermd.
      asm volatile("" : : "r"(s), "r"(mn) : "memory");
      if (n == CH) {
#pragma GCC unroll 16
        for (int j = 0; j < CH; ++j)
          block<T, M, AFTER>(p, row + (b0 + j) * T::TS, p.x + (b0 + j) * T::BS, s + j * G, mn + j * G, acc, j);
      } else {
        for (int j = 0; j < n; ++j)
          block<T, M, AFTER>(p, row + (b0 + j) * T::TS, p.x + (b0 + j) * T::BS, s + j * G, mn + j * G, acc, 0);
      }
      if constexpr (AFTER && T::MIN) {  // + sum over groups of min * (sum of x over the group)
        const __m512 mv = _mm512_load_ps(mn);
        const __mmask16 k = n == CH ? __mmask16(0xFFFF) : __mmask16((1u << (n * G)) - 1);
        for (int m = 0; m < M; ++m)
          macc[m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, p.sx + m * p.ldsx + b0 * G), macc[m]);
      }
    }
    for (int m = 0; m < M; ++m)
      p.y[m * p.N + i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), macc[m]));
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
at::Tensor matvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t variant, int64_t prefetch) {
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
  const int64_t row_bytes = std::max<int64_t>(1, nb * k.ts);
  if (prefetch < 0) prefetch = kDefaultPrefetch;
  const Problem p{blocks.data_ptr<uint8_t>(), blocks.stride(0), nb, xs.data(), ldx, sx.data(), groups,
                  y.data_ptr<float>(), N, (prefetch + row_bytes - 1) / row_bytes};
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / row_bytes), [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GGUF quantized blocks: dequantization and matrix-vector products (shardllama.kernels.blocks)";
  m.def("dequantize", &dequantize, "(N, nb, ts) uint8 blocks of a GGML type -> (N, nb * bs) float32, into out if given",
        py::arg("blocks"), py::arg("qtype"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("matvec", &matvec, "y = x @ W.T for f32 x (..., K) of at most max_rows rows and W as blocks; f32 sums; "
        "variant: -1 chooses, 0 scales per group after the sums, 1 decodes the weights first; prefetch: bytes ahead "
        "(-1: the default, 0: none)",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"), py::arg("variant") = -1, py::arg("prefetch") = -1,
        py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &has_avx512, "whether this CPU has the AVX-512 (F, BW, VL, DQ) the kernels need");
  m.attr("max_rows") = kMaxM;
}
