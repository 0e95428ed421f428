"""C++ source of the fused inverted-residual block (appended to ``cpp_kernel``'s source: it reuses its column tiles).

``block(x, e_ptr, e_col, e_val, e_bias, dw, dw_bias, p_ptr, p_col, p_val, p_bias, geom, clamps)`` computes one
MobileNetV2-style block, ``project(act(depthwise(act(expand(x))))) (+ x)``, with sparse 1x1 expand and project
weights (CSR over output channels, ``int32`` input-channel columns) and a ``k x k`` depthwise filter (only its
non-zero taps where fewer than half are non-zero), without
ever writing the expanded activation to memory: the output is computed in bands of output rows, and per band the
expanded rows the band's depthwise taps need (``(R - 1) * s + k``) live in a buffer sized for the L2 cache, then
the depthwise output of the band (``[C_e, R * Wo]``), and the project step reads it from there. Consecutive bands
share ``k - s`` expanded rows: they are carried over (moved to the front of the buffer), not recomputed. Each work
item (an image and a run of output rows) owns its buffers; items are spread over ``at::parallel_for``.

The expand and project steps are the column tiles of ``conv`` (``run_columns`` with a CSR ``Columns`` index: input
channel ``c`` of the band is row ``c`` at the band plane's stride); the expand writes whole rows, contiguous, so
its tiles store straight from the registers. The depthwise step computes eight output columns per vector with the
taps' weights in registers; rows outside the image are zero rows, and the vectors whose taps reach past a row's
ends multiply those lanes by zero (``edge_masks``), which is the zero padding without padded rows.

Measured on mobilenet_v2 at 90%, batch 1, one thread (``backends/sparse_block.py`` has the band sizes): the fused
blocks ran 1.1-3.1x faster than the same three layers lowered one by one, and the whole model went from about 1.0x
to 1.43x onnxruntime dense.
"""

BLOCK_SOURCE = r"""
// p[0], p[2], ..., p[14] (reads p[0..15])
static inline v8 ld_even(const float* p) {
#if defined(__AVX2__)
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  const __m256 e = _mm256_shuffle_ps(a, b, 0x88);  // a0 a2 b0 b2 | a4 a6 b4 b6
  const __m256 r = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
  v8 v; __builtin_memcpy(&v, &r, 32); return v;
#else
  v8 v; for (int i = 0; i < 8; ++i) v[i] = p[2 * i]; return v;
#endif
}

// R output rows of one channel's depthwise K x K convolution, stride S, padding P, from rows E of W columns (rows
// outside the image already zero; the buffer has slack before and after): eight output columns per vector (the
// last ones masked), the taps' weights in registers, the sum clamped to [lo, hi] before the one store. A vector
// whose taps reach past either end of a row (the first, and those from `vr` on) multiplies what each tap read by
// `mask[v * K + tb]`: 1 for the lanes that read inside the row, 0 for those that read the zero padding.
template <int K, int S>
static void depthwise_fixed(const float* __restrict E, const float* __restrict w, float bias, float* __restrict D,
                            int64_t R, int64_t Wo, int64_t W, int64_t P, float lo, float hi, const v8* mask,
                            int64_t vr) {
  const v8 vlo = v8{} + lo, vhi = v8{} + hi;
  v8 wv[K * K];
  int64_t toff[K * K];
  int ttb[K * K], nt = 0;  // the non-zero taps: their offset (row * W + column), column and weight
  for (int t = 0; t < K * K; ++t)
    if (w[t] != 0.f) { toff[nt] = (t / K) * W + t % K; ttb[nt] = t % K; wv[nt++] = v8{} + w[t]; }
  // two copies of the vector loop on purpose: folded into one helper taking the tap sum as a lambda, the dense
  // filter's loop (all K * K taps unrolled) ran 5-9% slower on mobilenet_v2's blocks
  if (2 * nt < K * K) {  // a sparse filter (a pruned depthwise layer): only its non-zero taps
    for (int64_t i = 0; i < R; ++i) {
      const float* er = E + i * S * W - P;
      float* d = D + i * Wo;
      for (int64_t j = 0, v = 0; j < Wo; j += 8, ++v) {
        const int n = (int)std::min<int64_t>(8, Wo - j);
        const bool edge = v == 0 || v >= vr;
        v8 acc = v8{} + bias;
        for (int t = 0; t < nt; ++t) {
          const float* e = er + j * S + toff[t];
          v8 x = S == 1 ? (n == 8 ? ld8(e) : ld_part(e, n)) : ld_even(e);
          if (edge) x *= mask[v * K + ttb[t]];
          acc += wv[t] * x;
        }
        acc = acc > vlo ? acc : vlo;
        acc = acc < vhi ? acc : vhi;
        if (n == 8) st8(d + j, acc);
        else st_part(d + j, acc, n);
      }
    }
    return;
  }
  for (int t = 0; t < K * K; ++t) wv[t] = v8{} + w[t];
  for (int64_t i = 0; i < R; ++i) {
    const float* er = E + i * S * W - P;
    float* d = D + i * Wo;
    for (int64_t j = 0, v = 0; j < Wo; j += 8, ++v) {
      const int n = (int)std::min<int64_t>(8, Wo - j);
      const bool edge = v == 0 || v >= vr;
      v8 acc = v8{} + bias;
      for (int ta = 0; ta < K; ++ta) {
        const float* e = er + ta * W + j * S;
        for (int tb = 0; tb < K; ++tb) {
          v8 x;
          if (S == 1) x = n == 8 ? ld8(e + tb) : ld_part(e + tb, n);
          else x = ld_even(e + tb);  // lanes past n read the slack or the next row: never stored
          if (edge) x *= mask[v * K + tb];
          acc += wv[ta * K + tb] * x;
        }
      }
      acc = acc > vlo ? acc : vlo;
      acc = acc < vhi ? acc : vhi;
      if (n == 8) st8(d + j, acc);
      else st_part(d + j, acc, n);
    }
  }
}

// the lane masks of depthwise_fixed: [ceil(Wo / 8) * k] vectors, and the first vector from which the right end
// needs them
static std::vector<v8> edge_masks(int64_t Wo, int64_t W, int64_t k, int64_t s, int64_t p, int64_t& vr) {
  const int64_t nv = (Wo + 7) / 8;
  std::vector<v8> m(nv * k);
  vr = nv;
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t tb = 0; tb < k; ++tb)
      for (int l = 0; l < 8; ++l) {
        const int64_t col = (8 * v + l) * s - p + tb;
        m[v * k + tb][l] = (col >= 0 && col < W) ? 1.f : 0.f;
        if (col >= W && 8 * v + l < Wo) vr = std::min(vr, v);
      }
  return m;
}

// output column j of rows [0, R), only the taps inside the row (zero padding at both ends)
static inline void depthwise_column(const float* __restrict E, const float* __restrict w, float bias,
                                    float* __restrict D, int64_t R, int64_t j, int64_t Wo, int64_t W, int64_t k,
                                    int64_t s, int64_t p, float lo, float hi) {
  const int64_t c0 = j * s - p, tb0 = std::max<int64_t>(0, -c0), tb1 = std::min<int64_t>(k, W - c0);
  for (int64_t i = 0; i < R; ++i) {
    float acc = bias;
    for (int64_t ta = 0; ta < k; ++ta)
      for (int64_t tb = tb0; tb < tb1; ++tb) acc += w[ta * k + tb] * E[(i * s + ta) * W + c0 + tb];
    D[i * Wo + j] = std::min(std::max(acc, lo), hi);
  }
}

static inline void depthwise_rows(const float* E, const float* w, float bias, float* D, int64_t R, int64_t Wo,
                                  int64_t W, int64_t k, int64_t s, int64_t p, float lo, float hi, const v8* mask,
                                  int64_t vr) {
  if (k == 3 && s == 1) depthwise_fixed<3, 1>(E, w, bias, D, R, Wo, W, p, lo, hi, mask, vr);
  else if (k == 3 && s == 2) depthwise_fixed<3, 2>(E, w, bias, D, R, Wo, W, p, lo, hi, mask, vr);
  else if (k == 5 && s == 1) depthwise_fixed<5, 1>(E, w, bias, D, R, Wo, W, p, lo, hi, mask, vr);
  else if (k == 5 && s == 2) depthwise_fixed<5, 2>(E, w, bias, D, R, Wo, W, p, lo, hi, mask, vr);
  else  // any other kernel size or stride: scalar
    for (int64_t j = 0; j < Wo; ++j) depthwise_column(E, w, bias, D, R, j, Wo, W, k, s, p, lo, hi);
}

// geom = {k, s, p, band_rows, items_per_image, residual}; clamps = {expand lo, hi, depthwise lo, hi}
// x [N, Ci, H, W]; expand CSR [Ce, Ci] (e_ptr int64 [Ce + 1]); dw [Ce, k * k]; project CSR [Co, Ce]
torch::Tensor block(torch::Tensor x, torch::Tensor e_ptr, torch::Tensor e_col, torch::Tensor e_val,
                    c10::optional<torch::Tensor> e_bias, torch::Tensor dw, c10::optional<torch::Tensor> dw_bias,
                    torch::Tensor p_ptr, torch::Tensor p_col, torch::Tensor p_val,
                    c10::optional<torch::Tensor> p_bias, std::vector<int64_t> geom, std::vector<double> clamps) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be fp32 [N, C, H, W]");
  TORCH_CHECK(geom.size() == 6 && clamps.size() == 4, "geom has 6 entries, clamps 4");
  const int64_t k = geom[0], s = geom[1], p = geom[2], RB = geom[3], items = geom[4];
  const bool residual = geom[5] != 0;
  x = x.contiguous();
  const int64_t N = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ce = e_ptr.numel() - 1, Co = p_ptr.numel() - 1;
  TORCH_CHECK(k >= 1 && s >= 1 && p >= 0 && RB >= 1 && items >= 1, "bad block geometry");
  const int64_t Ho = (H + 2 * p - k) / s + 1, Wo = (W + 2 * p - k) / s + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "the depthwise window is larger than the input");
  TORCH_CHECK(e_ptr.scalar_type() == at::kLong && p_ptr.scalar_type() == at::kLong && e_col.scalar_type() == at::kInt
                  && p_col.scalar_type() == at::kInt && e_val.scalar_type() == at::kFloat
                  && p_val.scalar_type() == at::kFloat && dw.scalar_type() == at::kFloat,
              "CSR pointers int64, columns int32, values fp32");
  TORCH_CHECK(dw.numel() == Ce * k * k && dw.is_contiguous(), "dw must be [Ce, k * k]");
  TORCH_CHECK(e_col.numel() == e_val.numel() && p_col.numel() == p_val.numel(), "CSR columns and values differ");
  TORCH_CHECK(!residual || (s == 1 && Co == Ci && Ho == H && Wo == W), "a residual needs the block to keep shapes");
  const int64_t* ep = e_ptr.data_ptr<int64_t>();
  const int64_t* pp = p_ptr.data_ptr<int64_t>();
  TORCH_CHECK(ep[0] == 0 && ep[Ce] == e_val.numel() && pp[0] == 0 && pp[Co] == p_val.numel(),
              "block: row pointers do not span the weights");
  // column indices are checked where the buffers are built or loaded (SparseInvertedResidual.check)
  const int32_t* ec = e_col.data_ptr<int32_t>();
  const int32_t* pc = p_col.data_ptr<int32_t>();
  torch::Tensor eb, db, pb;
  const float* ebp = nullptr;
  const float* dbp = nullptr;
  const float* pbp = nullptr;
  const auto take = [](const c10::optional<torch::Tensor>& t, torch::Tensor& keep, int64_t n) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    keep = t->contiguous();
    TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.numel() == n, "a bias does not match its channels");
    return keep.data_ptr<float>();
  };
  ebp = take(e_bias, eb, Ce);
  dbp = take(dw_bias, db, Ce);
  pbp = take(p_bias, pb, Co);
  auto Y = torch::empty({N, Co, Ho, Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* evp = e_val.data_ptr<float>();
  const float* pvp = p_val.data_ptr<float>();
  const float* wp = dw.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  const float elo = (float)clamps[0], ehi = (float)clamps[1], dlo = (float)clamps[2], dhi = (float)clamps[3];
  const bool eclamp = clamps[0] > -INFINITY || clamps[1] < INFINITY;
  const int64_t rb = std::min(RB, Ho);
  const int64_t NR = (rb - 1) * s + k;   // expanded rows a full band reads
  const int64_t EPL = NR * W;            // expanded plane of one channel in the buffer
  const int64_t SLACK = 64;              // floats before and after E: the vector loads of edge columns
  const int64_t DPL = rb * Wo;           // depthwise plane of one channel in the buffer
  const int64_t per_item = (Ho + items - 1) / items;
  const int64_t n_items = (Ho + per_item - 1) / per_item;
  int64_t vr = 0;
  const std::vector<v8> masks = edge_masks(Wo, W, k, s, p, vr);
  at::parallel_for(0, N * n_items, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> Ebuf(new float[Ce * EPL + 2 * SLACK]()), Dbuf(new float[Ce * DPL]);
    float* E = Ebuf.get() + SLACK;
    float* D = Dbuf.get();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / n_items, q0 = (it % n_items) * per_item, q1 = std::min(Ho, q0 + per_item);
      const float* xn = xp + n * Ci * H * W;
      float* yn = yp + n * Co * Ho * Wo;
      int64_t have0 = 0, have1 = 0;  // image rows [have0, have1) held in E rows [0, have1 - have0)
      for (int64_t o0 = q0; o0 < q1; o0 += rb) {
        const int64_t o1 = std::min(q1, o0 + rb), R = o1 - o0;
        const int64_t e0 = o0 * s - p, e1 = (o1 - 1) * s - p + k;  // expanded rows this band reads
        int64_t keep = 0;
        if (o0 > q0 && have1 > e0 && e0 >= have0) {  // carry the shared rows to the front
          keep = have1 - e0;
          const int64_t from = e0 - have0;
          for (int64_t c = 0; c < Ce; ++c)
            std::memmove(E + c * EPL, E + c * EPL + from * W, sizeof(float) * keep * W);
        }
        const int64_t f0 = e0 + keep;  // first row to compute
        // rows outside the image: zero
        for (int64_t r = f0; r < e1; ++r)
          if (r < 0 || r >= H)
            for (int64_t c = 0; c < Ce; ++c) std::memset(E + c * EPL + (r - e0) * W, 0, sizeof(float) * W);
        const int64_t a = std::max<int64_t>(f0, 0), b = std::min<int64_t>(e1, H);
        if (b > a) {  // expand rows [a, b) of the image into E rows from a - e0: contiguous columns
          Epilogue ee{ebp, nullptr, eclamp, elo, ehi, W, W, b - a, W, EPL, 0};
          for (int64_t c = 0; c < (b - a) * W; c += 64)
            run_columns(Rows{ep, Ce + 1, 1, nullptr}, Columns<int32_t>{ec, H * W}, evp, xn + a * W, c,
                        std::min<int64_t>(64, (b - a) * W - c), 0, Ce, E + (a - e0) * W, ee, Dest{true, c, c});
        }
        have0 = e0;
        have1 = e1;
        // depthwise: D[c][i * Wo + j] = act(bias + sum_ab w[a, b] * E[c][i * s + a][j * s + b])
        for (int64_t c = 0; c < Ce; ++c)
          depthwise_rows(E + c * EPL, wp + c * k * k, dbp ? dbp[c] : 0.f, D + c * DPL, R, Wo, W, k, s, p, dlo, dhi,
                         masks.data(), vr);
        // project the band: columns [0, R * Wo) of D into output rows [o0, o1)
        Epilogue pe{pbp, residual ? xn : nullptr, false, 0.f, 0.f, Wo, Wo, Ho, Wo, Ho * Wo, 0};
        for (int64_t c = 0; c < R * Wo; c += 64) {
          const int64_t w = std::min<int64_t>(64, R * Wo - c);
          run_columns(Rows{pp, Co + 1, 1, nullptr}, Columns<int32_t>{pc, DPL}, pvp, D, c, w, 0, Co, yn, pe,
                      Dest{true, o0 * Wo + c, o0 * Wo + c});
        }
      }
    }
  });
  return Y;
}
"""
