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
// same terms; only f32 rounding differs, and the tests compare with a tolerance.  Measured on the Intel
// kind (tools/bench_qkernels.py, tools/results/quant-kernels.md) the loops run at 70-80% of what ports 0
// and 5 allow (~7 vector operations per 32 weights at one row of x).  Tried without gain: two weight rows at
// a time; Q4_K's high nibbles by conversion (port 0) instead of permute (port 5), kept as harmless.
//
// Around the loop: software prefetch into L2 of the same chunk a few rows ahead (the hardware prefetcher
// alone left Q8_0 at 6.6 GB/s a thread, with it 8.9); from 3 rows of x on, rows summed a chunk of columns at
// a time so that the chunk of x (32 KB) stays in L1 for every row of x; the scales of 16 groups at a time (one gather for the
// 32-weight types) broadcast from memory.
//
// A third kernel (rows_pairs, below) multiplies bf16 pairs with vdpbf16ps, x split into two bf16 parts;
// blocks.py times it against the f32 kernel once per process and uses it only where it wins (not on the
// Intel kind, where vdpbf16ps runs at a quarter of the FMA rate).
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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
// The target includes AVX-512 BF16 for rows_pairs' vdpbf16ps, which runs only where has_bf16() said so; GCC
// emits BF16 instructions for nothing else (there is no __bf16 arithmetic here).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma,avx2,bmi2")
#define INLINE inline __attribute__((always_inline))
#define INLINE_LAMBDA __attribute__((always_inline))  // GCC may otherwise call a large lambda it is handed

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

// bf16 words of small integers (at most 8 significant bits: exact), for tables of 32 or 64 entries looked up
// by vpermw / vpermt2w
struct Words {
  alignas(64) uint16_t v[64];
};
constexpr uint16_t bf16_of(int v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const int a = v < 0 ? -v : v;
  int e = 0;
  while ((a >> (e + 1)) != 0) ++e;
  return uint16_t(sign | ((127 + e) << 7) | ((a << (7 - e)) & 0x7F));
}
template <class F> constexpr Words words(F f) {
  Words t{};
  for (int i = 0; i < 64; ++i) t.v[i] = bf16_of(f(i));
  return t;
}
constexpr int kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
// 32-entry tables read with 5-bit indices whose bit 4 may be noise: entry i is that of i & 15
constexpr Words kNib = words([](int i) { return i & 15; }), kNibQ4_0 = words([](int i) { return (i & 15) - 8; }),
                kNibIQ4 = words([](int i) { return kIQ4NL[i & 15]; });
constexpr Words kFive = words([](int i) { return i & 31; }), kFiveQ5_0 = words([](int i) { return (i & 31) - 16; });
constexpr Words kSix = words([](int i) { return i - 32; });  // Q6_K: 64 entries, two registers

INLINE __m512i table(const Words& t, int half = 0) { return _mm512_load_si512(t.v + 32 * half); }

// The 16 quant bytes at b as 32 words: the low nibbles' bytes (words 0-15, bits 4-7 still there: the tables
// ignore them) and the high nibbles (words 16-31), i.e. weights 0-31 of a 32-weight block in order.
INLINE __m512i nibble_words(const uint8_t* b) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
  return _mm512_srlv_epi16(w, _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                                0x0004000400040004, 0, 0, 0, 0));
}

INLINE __m512i words32(const uint8_t* b) {  // 32 bytes, one to each 16-bit lane
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
}

// ---- the block types ---------------------------------------------------------------------------------
//
// Each has BS weights in TS bytes, decoded as BS / 16 vectors of 16 lanes; a scale group is GV consecutive
// vectors (one scale, and one min where MIN), G groups a block.  OFFSET (Q6_K): decode() gives unsigned
// integers and mn = -offset * s, applied by one FMA (w = q * s + mn rounds once, as gguf's s * (q - offset)
// does), never through sums of x.  Where PAIRS, units(b, f) also decodes a
// block as BS / 32 units of 32 weights in order, each a vector of 32 bf16 integers (exact: at most 8
// significant bits), for the bf16-pair kernel (rows_pairs).  Scales are read for CH = 16 / G blocks at
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
  static constexpr bool MIN = MIN_, OFFSET = false, PAIRS = true;
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
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    f(0, _mm512_permutexvar_epi16(nibble_words(b + 2), table(kNibQ4_0)));
  }
};

template <> struct Fmt<kIQ4_NL> : Small<18, false> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<2>(b, iq4nl_levels(), f); }
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    f(0, _mm512_permutexvar_epi16(nibble_words(b + 2), table(kNibIQ4)));
  }
};

template <> struct Fmt<kQ4_1> : Small<20, true> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { nibbles<4>(b, levels(0), f); }
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    f(0, _mm512_permutexvar_epi16(nibble_words(b + 4), table(kNib)));
  }
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

// 5-bit words: the nibble, and bit j of qh (weight j's) as bit 4
template <int QH, int QS> INLINE __m512i five_words(const uint8_t* b) {
  uint32_t qh;
  std::memcpy(&qh, b + QH, 4);
  const __m512i nib = _mm512_and_si512(nibble_words(b + QS), _mm512_set1_epi16(15));
  return _mm512_mask_add_epi16(nib, __mmask32(qh), nib, _mm512_set1_epi16(16));
}

template <> struct Fmt<kQ5_0> : Small<22, false> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { fives<2, 6>(b, -16, f); }
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    f(0, _mm512_permutexvar_epi16(five_words<2, 6>(b), table(kFiveQ5_0)));
  }
};

template <> struct Fmt<kQ5_1> : Small<24, true> {
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) { fives<4, 8>(b, 0, f); }
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    f(0, _mm512_permutexvar_epi16(five_words<4, 8>(b), table(kFive)));
  }
};

template <> struct Fmt<kQ8_0> : Small<34, false> {
  static constexpr bool PAIRS = false;  // bytes to bf16 costs more than it saves: Q8_0 is bound by memory
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
  static constexpr bool MIN = true, OFFSET = false, PAIRS = true;
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
      // the high nibbles are clean after the shift: a conversion (port 0) instead of a permute (port 5,
      // which the low nibbles and the widening already keep busy)
      f(4 * c + 2, _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)));
      f(4 * c + 3, _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)));
    }
  }
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    const __m512i t = table(kNib);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {  // sub-blocks 2c and 2c+1: the low and high nibbles of 32 bytes
      const __m512i v = words32(b + 16 + 32 * c);
      f(2 * c, _mm512_permutexvar_epi16(v, t));
      f(2 * c + 1, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t));
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
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    const __m512i t = table(kFive), h = words32(b + 16), c15 = _mm512_set1_epi16(15);
    auto bit = [&](int g) INLINE_LAMBDA { return g <= 4 ? _mm512_slli_epi16(h, 4 - g) : _mm512_srli_epi16(h, g - 4); };
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v = words32(b + 48 + 32 * c);
      f(2 * c, _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(v, bit(2 * c), c15, 0xE4), t));
      f(2 * c + 1, _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), bit(2 * c + 1), c15, 0xE4), t));
    }
  }
};

template <> struct Fmt<kQ6_K> {
  static constexpr int BS = 256, TS = 210, GV = 1;
  static constexpr bool MIN = false, OFFSET = true, PAIRS = true;
  template <class F> static INLINE void units(const uint8_t* b, F&& f) {
    const __m512i t0 = table(kSix, 0), t1 = table(kSix, 1), c15 = _mm512_set1_epi16(15);
    auto q = [&](__m512i low, __m512i high) INLINE_LAMBDA {  // bits 0-3 from low, 4-5 from high (above: ignored)
      return _mm512_permutex2var_epi16(t0, _mm512_ternarylogic_epi32(low, high, c15, 0xE4), t1);
    };
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // weights 128h + 32k + l: ql[64h + 32(k % 2) + l] nibble k / 2, crumb k
      const __m512i l0 = words32(b + 64 * h), l1 = words32(b + 64 * h + 32), hq = words32(b + 128 + 32 * h);
      f(4 * h + 0, q(l0, _mm512_slli_epi16(hq, 4)));
      f(4 * h + 1, q(l1, _mm512_slli_epi16(hq, 2)));
      f(4 * h + 2, q(_mm512_srli_epi16(l0, 4), hq));
      f(4 * h + 3, q(_mm512_srli_epi16(l1, 4), _mm512_srli_epi16(hq, 2)));
    }
  }
  static INLINE void scales(const uint8_t* b, int, float* s, float* mn) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192))));
    const __m512 d = _mm512_mul_ps(_mm512_set1_ps(f16(b + 208)), sc);
    _mm512_store_ps(s, d);
    _mm512_store_ps(mn, _mm512_mul_ps(_mm512_set1_ps(-32.0f), d));  // exact
  }
  template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
    // The 6-bit q (unsigned; the -32 is in mn) of 64 weights at a time, as bytes: bits 0-3 from a nibble of
    // ql, bits 4-5 from a crumb of qh, chosen by one vpternlogd with the mask 0x30 (word shifts spill bits
    // across bytes; the masks drop them).  The bytes then go through memory: a widening load per 16 weights
    // is cheaper than extracting 128-bit lanes.
    const __m512i c15 = _mm512_set1_epi8(15), c48 = _mm512_set1_epi8(0x30), c63 = _mm512_set1_epi8(63);
    const __m512i left = _mm512_set_epi64(0x0002000200020002, 0x0002000200020002, 0x0002000200020002,
                                          0x0002000200020002, 0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0x0004000400040004);  // crumbs 0 | 1 to bits 4-5
    const __m512i right = _mm512_set_epi64(0x0002000200020002, 0x0002000200020002, 0x0002000200020002,
                                           0x0002000200020002, 0, 0, 0, 0);  // crumbs 2 | 3 to bits 4-5
    alignas(64) uint8_t q[128];
    // weights 128h + r: ql[64h + r % 64] nibble r / 64, qh[32h + r % 32] crumb r / 32.  The halves are
    // written out (not a loop) so that every v is a constant: the sums stay in registers.
    auto half = [&](auto h_) INLINE_LAMBDA {
      constexpr int h = decltype(h_)::value;
      const __m512i ql = _mm512_loadu_si512(b + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
      _mm512_store_si512(q, _mm512_ternarylogic_epi32(c48, _mm512_sllv_epi16(qh, left), _mm512_and_si512(ql, c15), 0xCA));
      _mm512_store_si512(q + 64, _mm512_and_si512(_mm512_ternarylogic_epi32(c48, _mm512_srlv_epi16(qh, right),
                                                                           _mm512_srli_epi16(ql, 4), 0xCA), c63));
      asm volatile("" : "+m"(q));  // read back by widening loads, not lane extractions
      f(8 * h + 0, _mm512_cvtepi32_ps(bytes16(q)));
      f(8 * h + 1, _mm512_cvtepi32_ps(bytes16(q + 16)));
      f(8 * h + 2, _mm512_cvtepi32_ps(bytes16(q + 32)));
      f(8 * h + 3, _mm512_cvtepi32_ps(bytes16(q + 48)));
      f(8 * h + 4, _mm512_cvtepi32_ps(bytes16(q + 64)));
      f(8 * h + 5, _mm512_cvtepi32_ps(bytes16(q + 80)));
      f(8 * h + 6, _mm512_cvtepi32_ps(bytes16(q + 96)));
      f(8 * h + 7, _mm512_cvtepi32_ps(bytes16(q + 112)));
    };
    half(std::integral_constant<int, 0>());
    half(std::integral_constant<int, 1>());
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
        T::decode(w + i * ldw + (b0 + j) * T::TS, [&](int v, __m512 q) INLINE_LAMBDA {
          __m512 r = _mm512_mul_ps(q, _mm512_set1_ps(s[j * G + v / T::GV]));
          if constexpr (T::OFFSET) r = _mm512_fmadd_ps(q, _mm512_set1_ps(s[j * G + v / T::GV]), _mm512_set1_ps(mn[j * G + v / T::GV]));
          else if constexpr (T::MIN) r = _mm512_add_ps(r, _mm512_set1_ps(mn[j * G + v / T::GV]));
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
  const uint16_t* xh;  // for rows_pairs: x = xh + xl in bf16 (16 significant bits), row m at + m * ldx
  const uint16_t* xl;
  int64_t kb;  // blocks per column chunk (a multiple of the chunk of scales): see rows
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
    T::decode(blk, [&](int v, __m512 q) INLINE_LAMBDA {
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
    T::decode(blk, [&](int v, __m512 q) INLINE_LAMBDA {
      const int g = v / T::GV;
      const __m512 w = T::MIN || T::OFFSET ? _mm512_fmadd_ps(q, _mm512_set1_ps(s[g]), _mm512_set1_ps(mn[g]))
                              : _mm512_mul_ps(q, _mm512_set1_ps(s[g]));
      for (int m = 0; m < M; ++m)
        acc[(j * G + g) % 2][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + m * p.ldx + 16 * v), acc[(j * G + g) % 2][m]);
    });
  }
}

// Rows [begin, end) of W, p.kb blocks of columns at a time (all the rows over one chunk of columns, then the
// next): the chunk of the M rows of x stays in L1 while the weights stream past (32 KB of x: more rows of x,
// shorter chunks); each output sums its chunks in order.
template <class T, int M, bool AFTER>
void rows(const Problem& p, int64_t begin, int64_t end) {
  constexpr int G = kGroups<T>, CH = kChunk<T>;
  for (int64_t kb = 0; kb < p.nb; kb += p.kb)
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* row = p.w + i * p.ldw;
    const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead, p.N - 1) * p.ldw);
    __m512 acc[2][M], macc[M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = macc[m] = _mm512_setzero_ps();
    for (int64_t b0 = kb; b0 < std::min(p.nb, kb + p.kb); b0 += CH) {
      const int n = int(std::min<int64_t>(CH, p.nb - b0));
      if (p.ahead)  // the same chunk of a row further on, into L2 (T1: more misses in flight than L1 takes)
        for (int64_t at = b0 * T::TS; at < (b0 + n) * T::TS; at += 64) _mm_prefetch(pf + at, _MM_HINT_T1);
      alignas(64) float s[16], mn[16];
      T::scales(row + b0 * T::TS, n, s, mn);
      // The scales are read back from memory one at a time: a broadcast load is free of the vector ports,
      // where GCC would otherwise keep the vector in a register and broadcast each lane with a port-5 vpermd.
      // (The asm says only s and mn may have changed: a "memory" clobber would also spill the sums.)
      asm volatile("" : "+m"(s), "+m"(mn));
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
    for (int m = 0; m < M; ++m) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), macc[m]));
      p.y[m * p.N + i] = kb == 0 ? sum : p.y[m * p.N + i] + sum;
    }
  }
}

// ---- the bf16-pair kernel ------------------------------------------------------------------------------
//
// vdpbf16ps multiplies 32 pairs of bf16 and adds each pair's two products into one of 16 f32 sums: one
// instruction for 32 weights where f32 needs two FMAs and a second table lookup.  The weights' integers are
// exact in bf16; x is split into two bf16 parts, x = xh + xl (xl the bf16 rounding of x - xh), which keeps 16
// significant bits of each activation (f16 keeps 11), and each unit of 32 weights is multiplied into both.
// Scales and mins are applied per group as in the f32 kernel.  Needs AVX-512 BF16 (Intel from Cooper Lake
// and Sapphire Rapids, AMD from Zen 4).

INLINE __m512bh bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

template <class T, int M>
void rows_pairs(const Problem& p, int64_t begin, int64_t end) {
  constexpr int G = kGroups<T>, CH = kChunk<T>, U = T::BS / 32;  // U units of 32 a block
  for (int64_t kb = 0; kb < p.nb; kb += p.kb)  // column chunks, as in rows
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* row = p.w + i * p.ldw;
    const char* pf = reinterpret_cast<const char*>(p.w + std::min(i + p.ahead, p.N - 1) * p.ldw);
    __m512 acc[4][M], macc[M];  // four chains: Q6_K's units feed two groups of 16 each
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = acc[2][m] = acc[3][m] = macc[m] = _mm512_setzero_ps();
    for (int64_t b0 = kb; b0 < std::min(p.nb, kb + p.kb); b0 += CH) {
      const int n = int(std::min<int64_t>(CH, p.nb - b0));
      if (p.ahead)
        for (int64_t at = b0 * T::TS; at < (b0 + n) * T::TS; at += 64) _mm_prefetch(pf + at, _MM_HINT_T1);
      alignas(64) float s[16], mn[16];
      T::scales(row + b0 * T::TS, n, s, mn);
      asm volatile("" : "+m"(s), "+m"(mn));  // broadcast from memory (see rows)
      auto one = [&](int j, int parity) INLINE_LAMBDA {  // block b0 + j; parity: j where it is a constant (unrolled), else 0
        const int64_t b = b0 + j;
        T::units(row + b * T::TS, [&](int u, __m512i w) INLINE_LAMBDA {
          const int64_t at = b * T::BS + 32 * u;
          const int c = (parity * U + u) % 2;
          for (int m = 0; m < M; ++m) {
            __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, bh(p.xh + m * p.ldx + at));
            t = _mm512_dpbf16_ps(t, (__m512bh)w, bh(p.xl + m * p.ldx + at));
            if constexpr (T::GV == 2) {  // one group of 32
              acc[c][m] = _mm512_fmadd_ps(t, _mm512_set1_ps(s[j * G + u]), acc[c][m]);
            } else {  // two groups of 16: the sums of lanes 0-7 and 8-15
              acc[c][m] = _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s[j * G + 2 * u]), acc[c][m], 0x00FF);
              acc[c + 2][m] = _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s[j * G + 2 * u + 1]), acc[c + 2][m], 0xFF00);
            }
          }
        });
      };
      if (n == CH) {
#pragma GCC unroll 16
        for (int j = 0; j < CH; ++j) one(j, j);
      } else {
        for (int j = 0; j < n; ++j) one(j, 0);
      }
      if constexpr (T::MIN) {
        const __m512 mv = _mm512_load_ps(mn);
        const __mmask16 k = n == CH ? __mmask16(0xFFFF) : __mmask16((1u << (n * G)) - 1);
        for (int m = 0; m < M; ++m)
          macc[m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, p.sx + m * p.ldsx + b0 * G), macc[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]),
                                                                         _mm512_add_ps(acc[2][m], acc[3][m])), macc[m]));
      p.y[m * p.N + i] = kb == 0 ? sum : p.y[m * p.N + i] + sum;
    }
  }
}

// x as two bf16 parts, x = xh + xl, each rounded to nearest even
void split_bf16(const float* x, int64_t K, uint16_t* xh, uint16_t* xl) {
  auto bf16 = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  };
  for (int64_t k = 0; k < K; ++k) {
    xh[k] = bf16(x[k]);
    const uint32_t hi = uint32_t(xh[k]) << 16;
    float h;
    std::memcpy(&h, &hi, 4);
    xl[k] = bf16(x[k] - h);
  }
}

// ---- quantizing (Q8_0, Q4_0): gguf.quants' numpy arithmetic, operation for operation -------------------
//
// Every step is one IEEE f32 operation as numpy does it (-ffp-contract=off keeps products and sums apart),
// so the bytes are gguf's (the tests compare).

INLINE void store_f16(uint8_t* p, float v) {
  const uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);  // numpy's astype(float16): nearest even
  std::memcpy(p, &h, 2);
}

INLINE float amax32(__m512 a0, __m512 a1) { return _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)); }

void quantize_q8_0(const float* x, uint8_t* out) {  // 32 weights -> 34 bytes
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const float d = amax32(_mm512_abs_ps(x0), _mm512_abs_ps(x1)) / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
  store_f16(out, d);
  for (int h = 0; h < 2; ++h) {  // np_roundf: floor(a) + floor(2 (a - floor(a))) with v's sign, a = |v|
    const __m512 v = _mm512_mul_ps(h ? x1 : x0, _mm512_set1_ps(id)), a = _mm512_abs_ps(v);
    const __m512 fl = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 two = _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_sub_ps(a, fl));
    __m512 r = _mm512_add_ps(fl, _mm512_roundscale_ps(two, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    r = _mm512_mask_sub_ps(r, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), r);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
  }
}

void quantize_q4_0(const float* x, uint8_t* out) {  // 32 weights -> 18 bytes
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const __m512 a0 = _mm512_abs_ps(x0), a1 = _mm512_abs_ps(x1);
  const __m512 amax = _mm512_set1_ps(amax32(a0, a1));
  // the first value of the largest magnitude, as np.argmax finds it
  const uint32_t at = uint32_t(_mm512_cmp_ps_mask(a0, amax, _CMP_EQ_OQ)) |
                      (uint32_t(_mm512_cmp_ps_mask(a1, amax, _CMP_EQ_OQ)) << 16);
  const float d = x[at ? __builtin_ctz(at) : 0] / -8.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
  store_f16(out, d);
  __m512i q[2];
  for (int h = 0; h < 2; ++h) {  // min(15, trunc(x * id + 8.5))
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(h ? x1 : x0, _mm512_set1_ps(id)), _mm512_set1_ps(8.5f));
    q[h] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(15.0f),
                                            _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2), _mm512_cvtepi32_epi8(_mm512_or_si512(q[0], _mm512_slli_epi32(q[1], 4))));
}


// 32 weights of w's dtype as f32 (exact)
template <class E> INLINE void widen32(const E* p, float* out) {
  if constexpr (std::is_same_v<E, float>) {
    std::memcpy(out, p, 128);
  } else {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * h));
      _mm512_storeu_ps(out + 16 * h, std::is_same_v<E, at::Half> ? _mm512_cvtph_ps(v) :
                       _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
    }
  }
}

template <class E>
void quantize_rows(const E* w, int64_t ldw, int64_t nb, int64_t qtype, uint8_t* out, int64_t begin, int64_t end) {
  const int64_t ts = qtype == kQ8_0 ? 34 : 18;
  alignas(64) float x[32];
  for (int64_t i = begin; i < end; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      widen32(w + i * ldw + 32 * b, x);
      if (qtype == kQ8_0) quantize_q8_0(x, out + (i * nb + b) * ts);
      else quantize_q4_0(x, out + (i * nb + b) * ts);
    }
}

#pragma GCC pop_options

at::Tensor quantize(const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(has_avx512(), "quantize: this CPU lacks AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_0, "quantize: Q8_0 (8) or Q4_0 (2) only, got type ", qtype);
  const auto dtype = w.scalar_type();
  TORCH_CHECK(w.device().is_cpu() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
              w.dim() == 2 && w.size(1) % 32 == 0 && (w.size(1) <= 1 || w.stride(1) == 1),
              "quantize: w must be float32/16 or bfloat16 (N, K) with contiguous rows and K a multiple of 32, got ",
              dtype, " ", w.sizes());
  const int64_t N = w.size(0), nb = w.size(1) / 32, ts = qtype == kQ8_0 ? 34 : 18, ldw = w.stride(0);
  at::Tensor out = at::empty({N, nb, ts}, at::TensorOptions().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, 32 * nb)), [&](int64_t begin, int64_t end) {
    if (dtype == at::kFloat) quantize_rows(w.data_ptr<float>(), ldw, nb, qtype, o, begin, end);
    else if (dtype == at::kHalf) quantize_rows(w.data_ptr<at::Half>(), ldw, nb, qtype, o, begin, end);
    else quantize_rows(w.data_ptr<at::BFloat16>(), ldw, nb, qtype, o, begin, end);
  });
  return out;
}

bool has_bf16() {
  __builtin_cpu_init();
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}

// ---- dispatch ------------------------------------------------------------------------------------------

using DeqFn = void (*)(const uint8_t*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
using RowsFn = void (*)(const Problem&, int64_t, int64_t);

constexpr int kPairsMaxM = 4;  // rows of x up to which rows_pairs is compiled

struct Kernels {
  int64_t bs, ts;
  bool min;
  DeqFn dequantize;
  // by M - 1: f32, scale after (per group sums) or before (decoded w); bf16 pairs (none for Q8_0)
  std::array<RowsFn, kMaxM> after, before;
  std::array<RowsFn, kPairsMaxM> pairs;
};

template <class T, int M> constexpr RowsFn pairs_of() {
  if constexpr (T::PAIRS) return &rows_pairs<T, M>;
  else return nullptr;
}

template <class T, std::size_t... I, std::size_t... J>
constexpr Kernels kernels_of(std::index_sequence<I...>, std::index_sequence<J...>) {
  return {T::BS, T::TS, T::MIN, &dequantize_rows<T>,
          {&rows<T, int(I) + 1, T::GV == 2>...}, {&rows<T, int(I) + 1, false>...}, {pairs_of<T, int(J) + 1>()...}};
}

const Kernels& kernels_for(int64_t qtype, const char* who) {
  constexpr auto seq = std::make_index_sequence<kMaxM>();
  constexpr auto pseq = std::make_index_sequence<kPairsMaxM>();
  static const Kernels q4_0 = kernels_of<Fmt<kQ4_0>>(seq, pseq), q4_1 = kernels_of<Fmt<kQ4_1>>(seq, pseq),
                       q5_0 = kernels_of<Fmt<kQ5_0>>(seq, pseq), q5_1 = kernels_of<Fmt<kQ5_1>>(seq, pseq),
                       q8_0 = kernels_of<Fmt<kQ8_0>>(seq, pseq), q4_k = kernels_of<Fmt<kQ4_K>>(seq, pseq),
                       q5_k = kernels_of<Fmt<kQ5_K>>(seq, pseq), q6_k = kernels_of<Fmt<kQ6_K>>(seq, pseq),
                       iq4_nl = kernels_of<Fmt<kIQ4_NL>>(seq, pseq);
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

enum Variant : int64_t { kChoose = -1, kAfter = 0, kBefore = 1, kPairs = 2 };
// Rows of x up to which a call that names no variant takes the bf16-pair kernel: 0 (never) until
// shardllama.kernels.blocks has timed it against the f32 kernel on this CPU (set_pairs_up_to).
int64_t g_pairs_up_to = 0;

constexpr int64_t kChunkBytes = 32768;  // of x per column chunk (L1 is 32-48 KB)

at::Tensor matvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t variant, int64_t prefetch,
                  int64_t kb_override) {
  const Kernels& k = kernels_for(qtype, "matvec");
  check_blocks(blocks, k, "matvec");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "matvec: x must be a float32 CPU tensor, got ",
              x.scalar_type());
  const int64_t N = blocks.size(0), nb = blocks.size(1), K = nb * k.bs;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "matvec: x has ", x.size(-1), " columns, the weight ", K);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  TORCH_CHECK(M <= kMaxM, "matvec: at most ", kMaxM, " rows of x, got ", M);
  static const bool bf16 = has_bf16();
  if (variant == kChoose)
    variant = bf16 && M <= g_pairs_up_to && k.pairs[0] ? kPairs : M <= 2 ? kAfter : kBefore;
  TORCH_CHECK(variant >= kAfter && variant <= kPairs, "matvec: variant must be -1, 0, 1 or 2, got ", variant);
  TORCH_CHECK(variant != kPairs || (bf16 && M <= kPairsMaxM && k.pairs[0]),
              "matvec: the bf16-pair kernel needs AVX-512 BF16, at most ", kPairsMaxM, " rows and a type other than Q8_0");
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  // x rows 64 bytes apart beyond K, so that the M rows fall in different cache sets; sums over 32 columns for
  // the types with mins
  const int64_t ldx = K + 32, groups = K / 32;
  std::vector<float> xs, sx(k.min ? M * groups : 0);
  std::vector<uint16_t> xh, xl;
  if (variant == kPairs) xh.resize(M * ldx), xl.resize(M * ldx);
  else xs.resize(M * ldx);
  for (int64_t m = 0; m < M; ++m) {
    if (variant == kPairs) split_bf16(xp + m * K, K, xh.data() + m * ldx, xl.data() + m * ldx);
    else std::copy(xp + m * K, xp + (m + 1) * K, xs.data() + m * ldx);
    for (int64_t g = 0; g < (k.min ? groups : 0); ++g) {
      float s = 0.0f;
      for (int j = 0; j < 32; ++j) s += xp[m * K + 32 * g + j];
      sx[m * groups + g] = s;
    }
  }
  const RowsFn fn = variant == kPairs ? k.pairs[M - 1] : (variant == kAfter ? k.after : k.before)[M - 1];
  const int64_t row_bytes = std::max<int64_t>(1, nb * k.ts);
  if (prefetch < 0) prefetch = kDefaultPrefetch;
  // columns a chunk: 32 KB of x (4 bytes a value either way), whole chunks of scales.  One or two rows of x
  // take whole rows: streaming each row front to back measured 15-20% faster than chunks (4096 x 11008),
  // and x (44 KB at most for a 7B) mostly stays in L1 anyway.
  const int64_t chunk = k.bs * (k.bs == 32 ? 16 : 2);
  const int64_t kb = M <= 2 ? nb : std::max<int64_t>(1, kChunkBytes / (4 * M) / chunk) * chunk / k.bs;
  TORCH_CHECK(kb_override >= 0 && kb_override % (chunk / k.bs) == 0, "matvec: chunk must be a multiple of ",
              chunk / k.bs, " blocks, got ", kb_override);
  const Problem p{blocks.data_ptr<uint8_t>(), blocks.stride(0), nb, xs.data(), ldx, sx.data(), groups,
                  y.data_ptr<float>(), N, (prefetch + row_bytes - 1) / row_bytes, xh.data(), xl.data(),
                  kb_override > 0 ? kb_override : kb};
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / row_bytes), [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GGUF quantized blocks: dequantization and matrix-vector products (shardllama.kernels.blocks)";
  m.def("dequantize", &dequantize, "(N, nb, ts) uint8 blocks of a GGML type -> (N, nb * bs) float32, into out if given",
        py::arg("blocks"), py::arg("qtype"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("matvec", &matvec, "y = x @ W.T for f32 x (..., K) of at most max_rows rows and W as blocks; f32 sums; "
        "variant: -1 chooses, 0 f32 scaling per group after the sums, 1 f32 decoding the weights first, 2 bf16 pairs "
        "(x as two bf16 parts); prefetch: bytes ahead (-1: the default, 0: none); chunk: blocks of columns at a "
        "time (0: whole rows up to 2 rows of x, else 32 KB of x; a multiple of 16 blocks of 32 or 2 of 256)",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"), py::arg("variant") = -1, py::arg("prefetch") = -1,
        py::arg("chunk") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize", &quantize, "float32 (N, K) -> (N, K / 32, ts) uint8 blocks of Q8_0 or Q4_0, gguf's bytes",
        py::arg("w"), py::arg("qtype"), py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &has_avx512, "whether this CPU has the AVX-512 (F, BW, VL, DQ) the kernels need");
  m.def("set_pairs_up_to", [](int64_t rows) {
    TORCH_CHECK(rows >= 0 && rows <= kPairsMaxM, "set_pairs_up_to: 0..", kPairsMaxM, " rows, got ", rows);
    TORCH_CHECK(rows == 0 || has_bf16(), "set_pairs_up_to: this CPU lacks AVX-512 BF16");
    g_pairs_up_to = rows;
  }, "rows of x up to which calls naming no variant use the bf16-pair kernel (0: never)", py::arg("rows"));
  m.def("pairs_up_to", []() { return g_pairs_up_to; }, "see set_pairs_up_to");
  m.def("has_bf16", &has_bf16, "whether this CPU also has AVX-512 BF16 (the bf16-pair kernel, variant 2)");
  m.attr("max_rows") = kMaxM;
}
