// The small operations between a transformer block's matmuls, each a pass or two over its data: what
// costs a decode step on CPU is not arithmetic but the count of tensor ops (each a dispatch, an
// allocation and often a dtype conversion), about 150 a block in eager torch. The blocks' matmuls
// stay torch's kernels; the LM head's int8 matmul is here too (int8_matmul: torch's reloads its
// weights for every row). Every function works per row, so a row's result does not depend on what
// else is in the batch. bf16 results are rounded to nearest even, as torch rounds them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

// Rows of at most this many values' work run on the calling thread: a decode step's rows are
// far too small to pay for waking the pool.
constexpr int64_t kGrain = 1 << 15;

int64_t grain_for(int64_t per_row) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_row, 1)); }

// bf16 <-> fp32 as plain bit operations (round to nearest even, NaN kept quiet), so that loops over
// them vectorise; c10's conversions give the same bits one value at a time.
inline float bf16_to_float(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// e^x for x <= 0 (softmax after subtracting the row's maximum): a degree-6 polynomial on
// [-ln2/2, ln2/2] times a power of two, about 2 ulp, written so the compiler vectorises a loop of
// it (the C library's expf is one call per value). Below -87 it is 0.
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.0f);
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// The mean of squares per row, by torch's own ops: its summation order is what the eager path's
// F.rms_norm uses, and a sum taken in any other order moved the small model's greedy answers
// (one flipped bf16 rounding is enough at a near-tie). ``x`` as fp32 [rows, d] or [rows, g, d].
at::Tensor mean_square(const at::Tensor& x) { return at::mean(at::pow(x, 2), {-1}, /*keepdim=*/true).contiguous(); }

// x * rsqrt(ms + eps) * weight, rounded where torch rounds: the sum plus eps, its square root
// and the reciprocal each in fp32, then the two products.
template <typename In, typename Out>
inline void norm_row(const In* x, const float* w, Out* y, int64_t d, float ms, double eps) {
    const float inv = 1.f / std::sqrt(ms + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) y[i] = static_cast<Out>(static_cast<float>(x[i]) * inv * w[i]);
}

// Sixteen independent partial sums: a fixed order the compiler can keep in vector registers
// (one running sum could not be vectorised without reordering it).
inline float dot_product(const float* a, const float* b, int64_t n) {
    constexpr int kLanes = 16;
    float part[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= n; c += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += a[c + l] * b[c + l];
    for (int width = kLanes / 2; width > 0; width /= 2)  // a tree: four dependent adds, not sixteen
        for (int l = 0; l < width; ++l) part[l] += part[l + width];
    float sum = part[0];
    for (; c < n; ++c) sum += a[c] * b[c];
    return sum;
}

void check_cpu(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
    TORCH_CHECK(t.stride(-1) == 1, name, "'s last axis must be contiguous");
}

// x [rows, d] or [rows, groups, d] (fp32 or bf16); weight [d] or [groups, d] fp32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool to_bf16) {
    check_cpu(x, "x");
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(), "weight must be contiguous fp32");
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must be 2-D or 3-D");
    const int64_t d = x.size(-1), groups = x.dim() == 3 ? x.size(1) : 1, rows = x.size(0);
    TORCH_CHECK(weight.numel() == d || weight.numel() == d * groups, "weight does not match x");
    const bool per_group = weight.numel() != d;
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const at::Tensor ms = mean_square(xf);
    const float* msp = ms.data_ptr<float>();
    auto y = at::empty(x.sizes(), x.options().dtype(to_bf16 ? at::kBFloat16 : at::kFloat));
    const int64_t row_stride = xf.stride(0), group_stride = xf.dim() == 3 ? xf.stride(1) : 0;
    const float* w = weight.data_ptr<float>();
    const float* xs = xf.data_ptr<float>();
    at::parallel_for(0, rows, grain_for(d * groups), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            for (int64_t g = 0; g < groups; ++g) {
                const float* row = xs + r * row_stride + g * group_stride;
                const float* wg = w + (per_group ? g * d : 0);
                const int64_t at = r * groups + g;
                if (to_bf16) norm_row(row, wg, y.data_ptr<bf16>() + at * d, d, msp[at], eps);
                else norm_row(row, wg, y.data_ptr<float>() + at * d, d, msp[at], eps);
            }
        }
    });
    return y;
}

// h + y (y fp32 or bf16), and the sum normalised for the next matmul.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const at::Tensor& y, const at::Tensor& weight, double eps) {
    check_cpu(h, "h");
    check_cpu(y, "y");
    TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && y.dim() == 2 && h.sizes() == y.sizes(), "h must be fp32 [rows, d] like y");
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == h.size(1) && weight.is_contiguous(), "weight must be fp32 [d]");
    const int64_t rows = h.size(0), d = h.size(1);
    auto sum = at::empty({rows, d}, h.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "add_rms_norm", [&] {
        const scalar_t* ys = y.data_ptr<scalar_t>();
        const float* hs = h.data_ptr<float>();
        at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; ++r) {
                float* s = sum.data_ptr<float>() + r * d;
                const float* hr = hs + r * h.stride(0);
                const scalar_t* yr = ys + r * y.stride(0);
                for (int64_t i = 0; i < d; ++i) s[i] = hr[i] + static_cast<float>(yr[i]);
            }
        });
    });
    return {sum, rms_norm(sum, weight, eps, true)};
}

// The fp32 [n_kv_heads, slots, hd] cache of block ``layer`` within a store [layers, n_kv_heads, slots, hd]
// (an offset, not a tensor op: a decode step does this twice per block).
float* layer_of(at::Tensor& store, int64_t layer, int64_t hkv, int64_t hd) {
    TORCH_CHECK(store.scalar_type() == at::kFloat && store.is_contiguous() && store.dim() == 4, "the cache must be contiguous fp32 [layers, heads, slots, hd]");
    TORCH_CHECK(layer >= 0 && layer < store.size(0) && store.size(1) == hkv && store.size(3) == hd, "the cache's shape does not match");
    return store.data_ptr<float>() + layer * store.stride(0);
}

// RoPE on q|k in bf16 (x * cos + roll(x, hd / 2) * sin, each product and the sum rounded to bf16,
// ``sin`` signed: the same steps as the eager path), then k and v written as fp32 into the
// cache's slots and q returned as fp32 times ``scale``.
// qkv [T, (hq + 2 hkv) hd] bf16, the projection's output; qk_normed: its q|k heads normalised
// ([T, hq + hkv, hd], Qwen 3 / Gemma 3) or None; cos, sin [T, 1, hd] bf16; keys, values: stores.
at::Tensor rope_to_cache(const at::Tensor& qkv, const c10::optional<at::Tensor>& qk_normed, const at::Tensor& cos,
                         const at::Tensor& sin, double scale, int64_t hq, int64_t hkv, at::Tensor keys, at::Tensor values,
                         int64_t layer, const at::Tensor& slots) {
    for (auto* t : {&qkv, &cos, &sin}) check_cpu(*t, "qkv, cos and sin");
    TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
                "qkv, cos and sin must be bf16");
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
    const int64_t t_rows = qkv.size(0), hd = keys.size(-1), n_slots = keys.size(2);
    TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (hq + 2 * hkv) * hd && slots.numel() == t_rows, "shapes do not match");
    TORCH_CHECK(cos.size(0) == t_rows && cos.size(-1) == hd && sin.sizes() == cos.sizes() && cos.stride(-1) == 1 && sin.stride(-1) == 1
                && hd % 2 == 0, "cos/sin do not match");
    float* k_cache = layer_of(keys, layer, hkv, hd);
    float* v_cache = layer_of(values, layer, hkv, hd);
    TORCH_CHECK(values.sizes() == keys.sizes(), "keys and values differ in shape");
    const bf16* qk = qkv.data_ptr<bf16>();
    int64_t qk_row = qkv.stride(0);
    if (qk_normed.has_value()) {
        const at::Tensor& normed = *qk_normed;
        TORCH_CHECK(normed.scalar_type() == at::kBFloat16 && normed.is_contiguous() && normed.numel() == t_rows * (hq + hkv) * hd,
                    "qk_normed must be contiguous bf16 [T, hq + hkv, hd]");
        qk = normed.data_ptr<bf16>();
        qk_row = (hq + hkv) * hd;
    }
    const bf16* v = qkv.data_ptr<bf16>() + (hq + hkv) * hd;
    auto q = at::empty({t_rows, hq, hd}, qkv.options().dtype(at::kFloat));
    const int64_t half = hd / 2;
    const float s = static_cast<float>(scale);
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t t = 0; t < t_rows; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < n_slots, "slot out of range");
    at::parallel_for(0, t_rows, grain_for((hq + 2 * hkv) * hd), [&](int64_t begin, int64_t end) {
        std::vector<float> rot(hd);
        for (int64_t t = begin; t < end; ++t) {
            const bf16* c = cos.data_ptr<bf16>() + t * cos.stride(0);
            const bf16* sn = sin.data_ptr<bf16>() + t * sin.stride(0);
            for (int64_t h = 0; h < hq + hkv; ++h) {
                const bf16* x = qk + t * qk_row + h * hd;
                for (int64_t j = 0; j < hd; ++j) {
                    const bf16 a = static_cast<bf16>(static_cast<float>(x[j]) * static_cast<float>(c[j]));
                    const bf16 b = static_cast<bf16>(static_cast<float>(x[j < half ? j + half : j - half]) * static_cast<float>(sn[j]));
                    rot[j] = static_cast<float>(static_cast<bf16>(static_cast<float>(a) + static_cast<float>(b)));
                }
                if (h < hq) {
                    float* out = q.data_ptr<float>() + (t * hq + h) * hd;
                    for (int64_t j = 0; j < hd; ++j) out[j] = rot[j] * s;
                } else {
                    std::copy(rot.begin(), rot.end(), k_cache + ((h - hq) * n_slots + slot[t]) * hd);
                }
            }
            for (int64_t h = 0; h < hkv; ++h) {
                const bf16* x = v + t * qkv.stride(0) + h * hd;
                float* out = v_cache + (h * n_slots + slot[t]) * hd;
                for (int64_t j = 0; j < hd; ++j) out[j] = static_cast<float>(x[j]);
            }
        }
    });
    return q;
}

// Attention of the listed rows of q, each over its own keys: row i attends slots
// key_slots[begin[i] : begin[i] + count[i]] (its session's positions it may see, in order).
// q [T, hq, hd] fp32 (scaled); keys, values: stores; returns [T, hq * hd] bf16 (rows not listed
// are left for the caller to fill).
at::Tensor attend(const at::Tensor& q, at::Tensor keys, at::Tensor values, int64_t layer, const at::Tensor& rows,
                  const at::Tensor& key_slots, const at::Tensor& begin, const at::Tensor& count) {
    TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q must be contiguous fp32 [T, heads, hd]");
    TORCH_CHECK(values.sizes() == keys.sizes() && keys.dim() == 4, "keys and values differ in shape");
    for (auto* t : {&rows, &key_slots, &begin, &count})
        TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "rows, key_slots, begin and count must be contiguous int64");
    const int64_t n_rows = rows.numel(), hq = q.size(1), hd = q.size(2), hkv = keys.size(1), n_slots = keys.size(2);
    TORCH_CHECK(keys.size(3) == hd && hq % hkv == 0 && begin.numel() == n_rows && count.numel() == n_rows, "shapes do not match");
    const float* ks = layer_of(keys, layer, hkv, hd);
    const float* vs = layer_of(values, layer, hkv, hd);
    auto out = at::empty({q.size(0), hq * hd}, q.options().dtype(at::kBFloat16));
    const int64_t group = hq / hkv;
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* first = begin.data_ptr<int64_t>();
    const int64_t* n = count.data_ptr<int64_t>();
    const int64_t* slot = key_slots.data_ptr<int64_t>();
    int64_t work = 0;
    for (int64_t i = 0; i < n_rows; ++i) {
        TORCH_CHECK(row[i] >= 0 && row[i] < q.size(0) && n[i] > 0 && first[i] >= 0 && first[i] + n[i] <= key_slots.numel(), "row out of range");
        for (int64_t j = first[i]; j < first[i] + n[i]; ++j) TORCH_CHECK(slot[j] >= 0 && slot[j] < n_slots, "slot out of range");
        work += n[i];
    }
    const float* qs = q.data_ptr<float>();
    uint16_t* os = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    // One task per (row, KV head): the query heads sharing that KV head read its keys once.
    const int64_t tasks = n_rows * hkv;
    const int64_t per_task = std::max<int64_t>(1, work / std::max<int64_t>(n_rows, 1)) * hd * group * 2;
    at::parallel_for(0, tasks, grain_for(per_task), [&](int64_t b, int64_t e) {
        std::vector<float> probs, acc(group * hd);
        for (int64_t task = b; task < e; ++task) {
            const int64_t i = task / hkv, kv = task % hkv, m = n[i];
            const int64_t* sl = slot + first[i];
            const float* qr = qs + (row[i] * hq + kv * group) * hd;  // the group's heads, consecutive
            probs.resize(group * m);  // [group, m]
            for (int64_t j = 0; j < m; ++j) {
                const float* k = ks + (kv * n_slots + sl[j]) * hd;
                for (int64_t g = 0; g < group; ++g) probs[g * m + j] = dot_product(qr + g * hd, k, hd);
            }
            for (int64_t g = 0; g < group; ++g) {
                float* p = probs.data() + g * m;
                float top = -INFINITY;
                for (int64_t j = 0; j < m; ++j) top = std::max(top, p[j]);
                float total = 0.f;
                for (int64_t j = 0; j < m; ++j) p[j] = exp_nonpositive(p[j] - top);
                for (int64_t j = 0; j < m; ++j) total += p[j];
                const float inv = 1.f / total;
                for (int64_t j = 0; j < m; ++j) p[j] *= inv;
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t j = 0; j < m; ++j) {
                const float* v = vs + (kv * n_slots + sl[j]) * hd;
                for (int64_t g = 0; g < group; ++g) {
                    const float w = probs[g * m + j];
                    float* a = acc.data() + g * hd;
                    for (int64_t c = 0; c < hd; ++c) a[c] += w * v[c];
                }
            }
            uint16_t* o = os + (row[i] * hq + kv * group) * hd;
            for (int64_t c = 0; c < group * hd; ++c) o[c] = float_to_bf16(acc[c]);
        }
    });
    return out;
}

// act(gate) * up for gate|up [T, 2f] bf16 -> [T, f] bf16: the activation by torch's own op (SiLU,
// or Gemma's tanh GELU) rounded to bf16, then the product rounded, as the eager ops round them.
// Only the product is ours: a plain GELU formula missed torch's bits in 0.4% of values, and the
// C library's expf is a call per value where torch's is vectorised.
at::Tensor act_mul(const at::Tensor& gate_up, bool gelu) {
    check_cpu(gate_up, "gate_up");
    TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be bf16 [T, 2f]");
    const int64_t rows = gate_up.size(0), f = gate_up.size(1) / 2;
    const at::Tensor gate = gate_up.narrow(1, 0, f);
    const at::Tensor activated = (gelu ? at::gelu(gate, "tanh") : at::silu(gate)).contiguous();
    auto y = at::empty({rows, f}, gate_up.options());
    at::parallel_for(0, rows, grain_for(f), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const uint16_t* a = reinterpret_cast<const uint16_t*>(activated.data_ptr<at::BFloat16>()) + r * f;
            const uint16_t* u = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>()) + r * gate_up.stride(0) + f;
            uint16_t* o = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + r * f;
            for (int64_t i = 0; i < f; ++i) o[i] = float_to_bf16(bf16_to_float(a[i]) * bf16_to_float(u[i]));
        }
    });
    return y;
}

constexpr int64_t kTile = 16;  // output columns per tile: one vector of fp32 lanes
constexpr int64_t kRowBlock = 4;  // input rows sharing one conversion of a tile's weights

// An int8 weight [N, K] laid out for ``int8_matmul``: tiles of 16 rows, column by column
// ([N / 16, K, 16]), so one contiguous load holds the weights of 16 outputs for one input value.
// N is padded with zero rows to a multiple of 16.
at::Tensor pack_int8(const at::Tensor& weight) {
    TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, "weight must be int8 [N, K]");
    const int64_t n = weight.size(0), k = weight.size(1), tiles = (n + kTile - 1) / kTile;
    auto padded = at::zeros({tiles * kTile, k}, weight.options());
    padded.narrow(0, 0, n).copy_(weight);
    return padded.view({tiles, kTile, k}).transpose(1, 2).contiguous();
}

// acc[r][l] = sum over c of x[r][c] * w[c][l], for four input rows and one packed tile: the four
// sums of 16 lanes stay in vector registers, and each tile column is converted once for the four.
inline void tile_dot(const int8_t* wt, const float* const* x, int64_t k, float (*acc)[kTile]) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; ++c) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wt + c * kTile))));
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[0][c]), wv, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(x[1][c]), wv, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(x[2][c]), wv, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(x[3][c]), wv, a3);
    }
    _mm512_storeu_ps(acc[0], a0);
    _mm512_storeu_ps(acc[1], a1);
    _mm512_storeu_ps(acc[2], a2);
    _mm512_storeu_ps(acc[3], a3);
#else
    for (int64_t r = 0; r < kRowBlock; ++r)
        for (int64_t l = 0; l < kTile; ++l) acc[r][l] = 0.f;
    for (int64_t c = 0; c < k; ++c)
        for (int64_t r = 0; r < kRowBlock; ++r)
            for (int64_t l = 0; l < kTile; ++l) acc[r][l] += x[r][c] * static_cast<float>(wt[c * kTile + l]);
#endif
}

// x [M, K] bf16 times a packed int8 weight with one bf16 scale per row: the product summed in
// fp32, times the scale, rounded to bf16, like torch's _weight_int8pack_mm, but each tile of
// weights is read once for all M rows (torch's kernel reloads the weights per row, which made the
// LM head, 49152 x 576 for SmolLM2, a quarter of a 16-session step). Returns [M, n].
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n) {
    check_cpu(x, "x");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bf16 [M, K]");
    const int64_t m = x.size(0), k = x.size(1), tiles = (n + kTile - 1) / kTile;
    TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 3 && packed.size(0) == tiles
                && packed.size(1) == k && packed.size(2) == kTile, "weight must be packed by pack_int8 for this input width");
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() == n, "scales must be bf16 [N]");
    std::vector<float> xf(m * k);
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < k; ++c) xf[r * k + c] = bf16_to_float(xs[r * x.stride(0) + c]);
    auto y = at::empty({m, n}, x.options());
    const int8_t* w = packed.data_ptr<int8_t>();
    const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
    uint16_t* out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    const std::vector<float> zeros(k, 0.f);  // the rows past M in a block of four
    at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int8_t* wt = w + t * k * kTile;
            for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
                const int64_t rows = std::min(kRowBlock, m - r0);
                const float* xr[kRowBlock];
                for (int64_t rr = 0; rr < kRowBlock; ++rr) xr[rr] = rr < rows ? xf.data() + (r0 + rr) * k : zeros.data();
                float acc[kRowBlock][kTile];
                tile_dot(wt, xr, k, acc);
                for (int64_t rr = 0; rr < rows; ++rr)
                    for (int64_t l = 0; l < kTile && t * kTile + l < n; ++l)
                        out[(r0 + rr) * n + t * kTile + l] = float_to_bf16(acc[rr][l] * bf16_to_float(sc[t * kTile + l]));
            }
        }
    });
    return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("rms_norm", &rms_norm);
    m.def("add_rms_norm", &add_rms_norm);
    m.def("rope_to_cache", &rope_to_cache);
    m.def("attend", &attend);
    m.def("act_mul", &act_mul);
    m.def("pack_int8", &pack_int8);
    m.def("int8_matmul", &int8_matmul);
}
