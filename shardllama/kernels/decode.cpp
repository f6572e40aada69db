// The small operations of a decode step, one call each: what surrounds the matrix products of one token.
//
// A 135M model decoding one token runs 30 layers of ~57 torch operations besides its 7 matrix products: norms,
// rotary embedding, cache writes, the two attention products and their dtype changes, SwiGLU, the reductions
// between workers.  Each costs 3-15 us of dispatch and allocation for a few hundred numbers of work, which made
// such a token mostly overhead (issue 12).  Here each group is one call on plain loops:
//
//   rms_norm    x * rsqrt(mean(x^2) + eps), rounded to x's dtype, times the weight
//   silu_mul    silu(a) * b (SwiGLU's gate), rounded as torch rounds each of the two ops
//   attend      one token in each of B rows: rotary embedding of q and k, k and v written into the cache,
//               grouped attention over each row's cached keys, the heads' outputs
//   publish / gather   the shared-memory reduction of shardllama.allreduce (its layout, tickets and order)
//
// Each computes in f32 and rounds to the activations' dtype where the torch code it replaces does
// (shardllama.model), so the two paths differ only in the order of f32 sums, never in where results are
// rounded; shardllama.kernels.decode says which calls come here, and every engine (the reference, the star and
// the workers' whole pass) uses the same choice for the same shapes.  gather adds the partials in rank order in
// f32 exactly as allreduce's torch code does: bit for bit the same.  Dtypes: f32 and f16 (and bf16 for the
// elementwise ones); attention in bf16 stays in torch, whose bf16 products round differently.  Built with
// -mavx2 -mf16c -mfma (shardllama.kernels.build loads no kernel on a CPU without them): -O3 vectorises the
// elementwise loops, c10::Half converts with F16C, and attention's products are written with AVX2 intrinsics.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }

// Sum of x[i] * y[i] in f32, in 16 interleaved partial sums (vectorisable without reassociating).
template <typename A, typename B>
float dot(const A* x, const B* y, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += f(x[i + j]) * f(y[i + j]);
  for (; i < n; ++i) acc[i & 15] += f(x[i]) * f(y[i]);
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

#define DISPATCH_FLOATS(dtype, NAME, ...)                                             \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                     \
      case at::kHalf: { using T = c10::Half; return __VA_ARGS__(); }                  \
      case at::kBFloat16: { using T = c10::BFloat16; return __VA_ARGS__(); }          \
      default: TORCH_CHECK(false, NAME ": float32, float16 or bfloat16 only, got ", dtype); \
    }                                                                                 \
  }()

void check_cpu_contiguous(const at::Tensor& t, const char* who, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), who, ": ", what, " must be a contiguous CPU tensor");
}

// ---- rms_norm, silu_mul ------------------------------------------------------------------------------------

// torch: F.rms_norm(x.float(), eps=eps).type_as(x) * weight
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu_contiguous(x, "rms_norm", "x");
  check_cpu_contiguous(w, "rms_norm", "the weight");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x is ", x.scalar_type(), ", the weight ", w.scalar_type());
  const int64_t D = w.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == D, "rms_norm: x has ", x.size(-1), " columns, the weight ", D);
  at::Tensor y = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    const T* xs = x.data_ptr<T>();
    const T* ws = w.data_ptr<T>();
    T* ys = y.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = xs + r * D;
      const float ms = dot(xr, xr, D) / float(D);
      const float scale = 1.0f / std::sqrt(ms + float(eps));
      for (int64_t i = 0; i < D; ++i) ys[r * D + i] = T(f(T(f(xr[i]) * scale)) * f(ws[i]));
    }
  });
  return y;
}

// torch: F.silu(a) * b, each op rounding to the dtype
at::Tensor silu_mul(const at::Tensor& a, const at::Tensor& b) {
  check_cpu_contiguous(a, "silu_mul", "a");
  check_cpu_contiguous(b, "silu_mul", "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "silu_mul: a and b differ in shape or dtype");
  at::Tensor y = at::empty_like(a);
  DISPATCH_FLOATS(a.scalar_type(), "silu_mul", [&] {
    const T* as = a.data_ptr<T>();
    const T* bs = b.data_ptr<T>();
    T* ys = y.data_ptr<T>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) {
      const float v = f(as[i]);
      ys[i] = T(f(T(v / (1.0f + std::exp(-v)))) * f(bs[i]));
    }
  });
  return y;
}

// ---- attention of one token a row ---------------------------------------------------------------------------------

// Rotate adjacent pairs (a, b) of n_heads heads of hd by cis (hd/2 pairs of cos, sin), in f32: Meta's rope,
// as model.apply_rope's complex product computes it.
template <typename T>
void rope(T* x, int64_t n_heads, int64_t hd, const float* cis) {
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t i = 0; i < hd / 2; ++i) {
      T* p = x + h * hd + 2 * i;
      const float a = f(p[0]), b = f(p[1]), c = cis[2 * i], s = cis[2 * i + 1];
      p[0] = T(a * c - b * s);
      p[1] = T(a * s + b * c);
    }
}

// Eight values widened to f32 (F16C for f16), and a dot product / axpy over n of them, n % 8 == 0.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <typename T>
float dot8(const float* x, const T* y, int64_t n) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(x + i), load8(y + i)));
    b = _mm256_add_ps(b, _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), load8(y + i + 8)));
  }
  if (i < n) a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(x + i), load8(y + i)));
  float s[8];
  _mm256_storeu_ps(s, _mm256_add_ps(a, b));
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename T>
void axpy8(float a, const T* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(av, load8(x + i))));
}

// One row: this token's keys and values are already in the cache (rotated), q is rotated; out = softmax(q k^T /
// sqrt(hd)) v per query head over the flat cache rows reads[0..L), products and softmax in f32.
template <typename T>
void attend_row(const T* qs, const T* ks, const T* vs, int64_t hq, int64_t hkv, int64_t hd, const int64_t* reads,
                int64_t L, const int64_t* g, T* os) {
  const int64_t row = hkv * hd;
  const float scale = float(std::pow(double(hd), -0.5));  // as torch rounds head_dim**-0.5
  const bool wide = hd % 8 == 0;  // the vector loops; other head sizes (tests' tiny models) the scalar ones
  std::vector<float> qf(hq * hd), p(hq * L), acc(hq * hd, 0.0f);
  for (int64_t i = 0; i < hq * hd; ++i) qf[i] = f(qs[i]);
  // Scores, key row by key row (each read once for all query heads), then each head's softmax.
  for (int64_t l = 0; l < L; ++l) {
    const T* kr = ks + reads[l] * row;
    for (int64_t j = 0; j < hq; ++j)
      p[j * L + l] = (wide ? dot8(qf.data() + j * hd, kr + g[j] * hd, hd) : dot(qf.data() + j * hd, kr + g[j] * hd, hd)) * scale;
  }
  for (int64_t j = 0; j < hq; ++j) {
    float* pj = p.data() + j * L;
    const float m = *std::max_element(pj, pj + L);
    float sum = 0.0f;
    for (int64_t l = 0; l < L; ++l) sum += (pj[l] = std::exp(pj[l] - m));
    for (int64_t l = 0; l < L; ++l) pj[l] /= sum;
  }
  for (int64_t l = 0; l < L; ++l) {
    const T* vr = vs + reads[l] * row;
    for (int64_t j = 0; j < hq; ++j) {
      float* aj = acc.data() + j * hd;
      const float pl = p[j * L + l];
      if (wide) axpy8(pl, vr + g[j] * hd, aj, hd);
      else for (int64_t d = 0; d < hd; ++d) aj[d] += pl * f(vr[g[j] * hd + d]);
    }
  }
  for (int64_t i = 0; i < hq * hd; ++i) os[i] = T(acc[i]);
}

template <typename T>
void attend_impl(at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_k,
                 const at::Tensor& cache_v, const at::Tensor& cis, const int64_t* writes, const at::Tensor& read_at,
                 const int64_t* n_keys, const std::vector<int64_t>& g, at::Tensor& out) {
  const int64_t B = q.size(0), hkv = cache_k.size(2), hd = cache_k.size(3), hq = q.size(1) / hd, row = hkv * hd;
  T* ks = cache_k.data_ptr<T>();
  T* vs = cache_v.data_ptr<T>();
  // Every row's key and value into the cache first (torch's path writes them all before reading any).
  for (int64_t b = 0; b < B; ++b) {
    std::copy(k.data_ptr<T>() + b * row, k.data_ptr<T>() + (b + 1) * row, ks + writes[b] * row);
    std::copy(v.data_ptr<T>() + b * row, v.data_ptr<T>() + (b + 1) * row, vs + writes[b] * row);
    rope(q.data_ptr<T>() + b * hq * hd, hq, hd, cis.data_ptr<float>() + b * hd);
    rope(ks + writes[b] * row, hkv, hd, cis.data_ptr<float>() + b * hd);
  }
  for (int64_t b = 0; b < B; ++b)
    attend_row(q.data_ptr<T>() + b * hq * hd, ks, vs, hq, hkv, hd, read_at.data_ptr<int64_t>() + b * read_at.size(1),
               n_keys[b], g.data(), out.data_ptr<T>() + b * hq * hd);
}

// B rows of one token each: q (B, hq * hd), k and v (B, hkv * hd), projections before rope; cache_k / cache_v
// (n_blocks, block_size, hkv, hd); cis (B, hd/2, 2) f32 cos, sin of each row's position.  Row b's key and value
// go to flat cache row write_at[b], and it attends to the flat rows read_at[b, :n_keys[b]] in order; kv_of_q
// (hq,) is the local KV head of each query head, or empty (head j: j / (hq / hkv)).  Returns (B, hq * hd) in
// q's dtype.  Every index is checked against the cache: they come from block tables a peer sent.
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_k,
                  const at::Tensor& cache_v, const at::Tensor& cis, const at::Tensor& write_at,
                  const at::Tensor& read_at, const at::Tensor& n_keys, const at::Tensor& kv_of_q) {
  for (const at::Tensor* t : {&q_in, &k, &v, &cache_k, &cache_v, &cis, &write_at, &read_at, &n_keys, &kv_of_q})
    check_cpu_contiguous(*t, "attend", "every argument");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf, "attend: float32 or float16 only, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && cache_k.scalar_type() == dtype &&
              cache_v.scalar_type() == dtype, "attend: q, k, v and the cache must share one dtype");
  TORCH_CHECK(cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "attend: the caches must be (blocks, size, hkv, hd)");
  const int64_t hkv = cache_k.size(2), hd = cache_k.size(3), rows = cache_k.size(0) * cache_k.size(1);
  TORCH_CHECK(hkv > 0 && hd > 0 && hd % 2 == 0, "attend: bad cache shape");
  TORCH_CHECK(q_in.dim() == 2 && q_in.size(1) % hd == 0 && q_in.size(1) > 0, "attend: q must be (B, whole heads of ", hd, ")");
  const int64_t B = q_in.size(0), hq = q_in.size(1) / hd;
  TORCH_CHECK(k.sizes() == at::IntArrayRef({B, hkv * hd}) && v.sizes() == k.sizes(), "attend: k and v must be (",
              B, ", ", hkv * hd, ")");
  TORCH_CHECK(cis.scalar_type() == at::kFloat && cis.numel() == B * hd, "attend: cis must be (B, hd/2, 2) float32");
  TORCH_CHECK(write_at.scalar_type() == at::kLong && write_at.numel() == B, "attend: write_at must be (B,) int64");
  TORCH_CHECK(n_keys.scalar_type() == at::kLong && n_keys.numel() == B, "attend: n_keys must be (B,) int64");
  TORCH_CHECK(read_at.scalar_type() == at::kLong && read_at.dim() == 2 && read_at.size(0) == B,
              "attend: read_at must be (B, L) int64");
  const int64_t L = read_at.size(1);
  const int64_t* writes = write_at.data_ptr<int64_t>();
  const int64_t* keys = n_keys.data_ptr<int64_t>();
  const int64_t* reads = read_at.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= writes[b] && writes[b] < rows, "attend: write_at ", writes[b], " is outside the cache");
    TORCH_CHECK(1 <= keys[b] && keys[b] <= L, "attend: n_keys ", keys[b], " is not within 1..", L);
    for (int64_t l = 0; l < keys[b]; ++l)
      TORCH_CHECK(0 <= reads[b * L + l] && reads[b * L + l] < rows, "attend: read_at is outside the cache");
  }
  std::vector<int64_t> g(hq);
  if (kv_of_q.numel() > 0) {
    TORCH_CHECK(kv_of_q.numel() == hq && kv_of_q.scalar_type() == at::kLong, "attend: kv_of_q must have ", hq, " heads");
    for (int64_t j = 0; j < hq; ++j) {
      g[j] = kv_of_q.data_ptr<int64_t>()[j];
      TORCH_CHECK(0 <= g[j] && g[j] < hkv, "attend: kv_of_q names KV head ", g[j], " of ", hkv);
    }
  } else {
    TORCH_CHECK(hq % hkv == 0, "attend: ", hq, " query heads do not share ", hkv, " KV heads evenly; give kv_of_q");
    for (int64_t j = 0; j < hq; ++j) g[j] = j / (hq / hkv);
  }
  at::Tensor q = q_in.clone(), out = at::empty({B, hq * hd}, q_in.options());
  if (dtype == at::kFloat)
    attend_impl<float>(q, k, v, cache_k, cache_v, cis, writes, read_at, keys, g, out);
  else
    attend_impl<c10::Half>(q, k, v, cache_k, cache_v, cis, writes, read_at, keys, g, out);
  return out;
}

// ---- the reduction between workers (shardllama.allreduce) ----------------------------------------------------

// Copy this worker's partial into its buffer `mine`, then publish `ticket` in its flag (flags[rank, 0]).  The
// release store keeps the data before the flag (on x86 every store is ordered so; this also stops the compiler).
void publish(const at::Tensor& part, at::Tensor& mine, at::Tensor& flags, int64_t rank, int64_t ticket) {
  check_cpu_contiguous(part, "publish", "the partial");
  TORCH_CHECK(mine.device().is_cpu() && mine.is_contiguous() && mine.scalar_type() == part.scalar_type() &&
              mine.numel() >= part.numel(), "publish: the buffer must be a contiguous CPU tensor of the partial's "
              "dtype with room for it");
  TORCH_CHECK(flags.scalar_type() == at::kLong && flags.dim() == 2 && flags.is_contiguous() && 0 <= rank &&
              rank < flags.size(0), "publish: flags must be (workers, stride) int64 and rank one of them");
  std::memcpy(mine.data_ptr(), part.data_ptr(), part.numel() * part.element_size());
  __atomic_store_n(flags.data_ptr<int64_t>() + rank * flags.size(1), ticket, __ATOMIC_RELEASE);
}

// h + the sum of every worker's partial (parts[r][:h.numel()], in rank order, in f32), rounded to h's dtype:
// allreduce's torch code, bit for bit.  Waits for every flag to reach `ticket`, up to `spins` looks (each
// followed by sched_yield, which lets a peer run where cores are short), and returns None if one has not: the
// caller checks the clock, the abort word and its parent, then calls again.
std::optional<at::Tensor> gather(const at::Tensor& h, const std::vector<at::Tensor>& parts, const at::Tensor& flags,
                                 int64_t ticket, int64_t spins) {
  check_cpu_contiguous(h, "gather", "h");
  const int64_t n = h.numel(), workers = flags.size(0), stride = flags.size(1);
  TORCH_CHECK(flags.scalar_type() == at::kLong && flags.dim() == 2 && flags.is_contiguous() &&
              int64_t(parts.size()) == workers, "gather: one buffer per worker's flag");
  for (const at::Tensor& p : parts)
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == h.scalar_type() && p.numel() >= n,
                "gather: every buffer must be a contiguous CPU tensor of h's dtype with room for h");
  const int64_t* fl = flags.data_ptr<int64_t>();
  for (int64_t r = 0, tries = 0; r < workers;) {
    if (__atomic_load_n(fl + r * stride, __ATOMIC_ACQUIRE) >= ticket) {
      ++r;
      continue;
    }
    if (++tries > spins) return std::nullopt;
    sched_yield();
  }
  at::Tensor out = at::empty_like(h);
  DISPATCH_FLOATS(h.scalar_type(), "gather", [&] {
    const T* hs = h.data_ptr<T>();
    T* os = out.data_ptr<T>();
    std::vector<float> acc(n);
    const T* p0 = parts[0].data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) acc[i] = f(p0[i]);
    for (int64_t r = 1; r < workers; ++r) {
      const T* pr = parts[r].data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) acc[i] += f(pr[i]);
    }
    for (int64_t i = 0; i < n; ++i) os[i] = T(f(hs[i]) + acc[i]);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "the small operations of a decode step in one call each (shardllama.kernels.decode)";
  m.def("rms_norm", &rms_norm, "F.rms_norm(x.float(), eps).type_as(x) * w", py::arg("x"), py::arg("w"),
        py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "F.silu(a) * b", py::arg("a"), py::arg("b"), py::call_guard<py::gil_scoped_release>());
  m.def("attend", &attend, "rope, cache write and grouped attention of B rows of one token", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("cache_k"), py::arg("cache_v"), py::arg("cis"), py::arg("write_at"),
        py::arg("read_at"), py::arg("n_keys"), py::arg("kv_of_q"), py::call_guard<py::gil_scoped_release>());
  m.def("publish", &publish, "copy a partial into this worker's buffer and publish its ticket", py::arg("part"),
        py::arg("mine"), py::arg("flags"), py::arg("rank"), py::arg("ticket"), py::call_guard<py::gil_scoped_release>());
  m.def("gather", &gather, "h + every worker's partial once every flag reached the ticket; None after `spins` looks",
        py::arg("h"), py::arg("parts"), py::arg("flags"), py::arg("ticket"), py::arg("spins"),
        py::call_guard<py::gil_scoped_release>());
}
