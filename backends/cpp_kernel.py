"""The C++ CPU kernels of the sparse runtime (one extension, built on first use by ``backends/cpp_build.py``).

``conv(x, blockptr, off, val, bias, residual, lo, hi, geom, phases)``: direct sparse convolution, unstructured-sparse
weights times dense NCHW activations, no im2col. Every non-zero weight ``W[r, c, a, b]`` becomes one *offset* into
a prepared input grid, so a convolution of any kernel size, stride, padding, dilation and grouping is the same loop
(Park et al. 2017, "direct sparse convolution"; the vectorisation over the spatial axis follows Elsen et al. 2020,
"Fast Sparse ConvNets")::

    Y[r, j] = act(bias[r] + sum_k val[k] * G[off[k] + j] (+ residual[r, j]))   for grid columns j

The grid ``G`` is the input zero-padded and, for strides above 1, split into stride phases (``[C * P, Hq, Wq]``
with ``P`` the phases the taps use), so that every tap reads a contiguous run of ``G``: output ``(oh, ow)`` is grid
column ``oh * Wq + ow`` and tap ``(a, b)`` reads it at ``(c * P + phase) * Hq * Wq + row_off * Wq + col_off``.
Grid columns with ``ow >= Wo`` are computed and dropped. A 1x1 stride-1 convolution without padding reads the input
itself (no copy). Columns are processed in tiles of 64 held in vector registers (8 x AVX2 ``ymm``), the last
partial tile in 1-8 vectors with masked loads; each non-zero costs one broadcast and one FMA per 8 columns. The
epilogue adds bias and residual and clamps to ``[lo, hi]`` (ReLU: ``[0, inf]``, ReLU6: ``[0, 6]``) before the
single store.

Channel blocks: where a tile's reads over all input channels would not stay in the L1 cache, the non-zeros are
stored block-major (``blockptr`` ``[blocks, R + 1]``: input-channel block, then row) and a tile runs block by block
over all its rows, partial sums kept in a small scratch buffer: each block's slice of the grid is read from L1 by
every row, and the weights still stream once, in order (``sparse_conv.channel_blocks`` picks the blocks).

``spmm(rowptr, col, val, X, bias)``: ``Y[n] = W @ X[n] (+ bias)`` for CSR ``W`` (``col`` uint16 stored as int16,
or int32) and ``X`` ``[N, K, M]``, on the same column tiles (non-zero ``k`` reads row ``col[k]`` of ``X``); one
column (a matrix-vector product) runs four scalar accumulators per row. ``linear(rowptr, col, val, x, bias)`` is
``x @ W.T (+ bias)`` for ``x`` ``[B, K]``. ``maxpool(x, kh, kw, sh, sw, ph, pw)``: NCHW max pooling.

Work items (image, column tile, block of rows) are spread over ``at::parallel_for`` (torch's thread pool:
``torch.set_num_threads`` applies). Built with ``-march=native`` on the machine that runs it.
"""

from __future__ import annotations

from .cpp_block import BLOCK_SOURCE
from .cpp_build import CppExtension, cache_dir  # noqa: F401  (cache_dir: where kernels and calibrations live)

CONV_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <cmath>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld8(const float* p) { v8 x; __builtin_memcpy(&x, p, 32); return x; }
static inline void st8(float* p, v8 x) { __builtin_memcpy(p, &x, 32); }

// the first n (< 8) floats at p, zeros after; never touches memory past p + n
static inline v8 ld_part(const float* p, int n) {
#if defined(__AVX2__)
  static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - n));
  __m256 x = _mm256_maskload_ps(p, m);
  v8 r; __builtin_memcpy(&r, &x, 32); return r;
#else
  v8 r = v8{};
  for (int i = 0; i < n; ++i) r[i] = p[i];
  return r;
#endif
}

// store the first n (< 8) floats of x at p; never touches memory past p + n
static inline void st_part(float* p, v8 x, int n) {
#if defined(__AVX2__)
  static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - n));
  __m256 v; __builtin_memcpy(&v, &x, 32);
  _mm256_maskstore_ps(p, m, v);
#else
  for (int i = 0; i < n; ++i) p[i] = x[i];
#endif
}

struct Epilogue {
  const float* bias;      // [R] or null
  const float* residual;  // [R, Ho*Wo] of this image or null
  bool clamp;             // clamp to [lo, hi] (an activation)
  float lo, hi;
  int64_t wq, wo, ho;     // grid width, output width and height
  int64_t ostride, oplane, ooff;  // output row stride, plane size, offset of (0, 0): a padded output when
                                  // the next convolution reads it as its grid
};

// y[0..n) = clamp(a + res) (res may be null), eight columns at a time
static inline void finish_run(const float* __restrict a, const float* __restrict res, float* __restrict y, int n,
                              const Epilogue& e) {
  const v8 lo = v8{} + e.lo, hi = v8{} + e.hi;
  int t = 0;
  for (; t + 8 <= n; t += 8) {
    v8 v = ld8(a + t);
    if (res) v += ld8(res + t);
    if (e.clamp) { v = v > lo ? v : lo; v = v < hi ? v : hi; }
    st8(y + t, v);
  }
  if (t < n) {  // the last 1-7 columns: masked loads and store
    const int m = n - t;
    v8 v = ld_part(a + t, m);
    if (res) v += ld_part(res + t, m);
    if (e.clamp) { v = v > lo ? v : lo; v = v < hi ? v : hi; }
    st_part(y + t, v, m);
  }
}

// y = act(acc + residual) for w columns starting at grid column c0 of row r (only the valid grid columns)
static inline void store_row(const float* acc, int w, int64_t c0, int64_t r, float* Y, const Epilogue& e) {
  const int64_t plane = e.ho * e.wo;
  float* yr = Y + r * e.oplane + e.ooff;
  const float* rr = e.residual ? e.residual + r * plane : nullptr;
  if (e.wq == e.wo && e.ostride == e.wo) {  // grid columns are output columns
    finish_run(acc, rr ? rr + c0 : nullptr, yr + c0, w, e);
    return;
  }
  int64_t oh = c0 / e.wq, ow = c0 - oh * e.wq;
  int i = 0;
  while (i < w) {
    const int run = (int)std::min<int64_t>(w - i, e.wq - ow);
    const int valid = (int)std::max<int64_t>(0, std::min<int64_t>(run, e.wo - ow));
    if (valid > 0 && oh < e.ho)
      finish_run(acc + i, rr ? rr + oh * e.wo + ow : nullptr, yr + oh * e.ostride + ow, valid, e);
    i += run;
    ow = 0;
    ++oh;
  }
}

// rows r0..r1 times NV vectors of 8 grid columns from c0; the last vector holds only `last` columns when last < 8
// (masked loads: nothing past the grid is read). U independent accumulator sets (non-zeros k, k+1, ...) keep
// U * NV FMA chains in flight.
// where non-zero k reads: a precomputed grid offset (convolutions) or a column index times the row length (CSR)
struct Offsets {
  const int32_t* __restrict off;
  inline int64_t operator()(int64_t k) const { return off[k]; }
};
template <typename I>
struct Columns {
  const I* __restrict col;
  int64_t ld;
  inline int64_t operator()(int64_t k) const { return (int64_t)col[k] * ld; }
};

// where a run of grid columns lands: `direct` (they are consecutive output columns, at `yoff` in the output
// plane and `roff` in the residual plane: stored from the registers) or spread over output rows (store_row)
struct Dest {
  bool direct;
  int64_t yoff, roff;
};

// the non-zeros of row r in input-channel block b: [ptr[b * stride + r], ptr[b * stride + r + 1]) (one block:
// plain CSR row pointers); partial sums wait in `scratch` ([rows, 64]) between blocks
struct Rows {
  const int64_t* __restrict ptr;
  int64_t stride, nb;
  float* scratch;
};

template <int NV, int U, bool MASKED, typename Idx>
static inline void tile(const Rows rows, const Idx off, const float* __restrict val,
                        const float* __restrict G, int64_t c0, int last, int64_t r0, int64_t r1, float* Y,
                        const Epilogue& e, const Dest d) {
  const float* Gc = G + c0;
  const int w = 8 * (NV - 1) + (MASKED ? last : 8);
  const int64_t plane = e.ho * e.wo;
  const v8 lo = v8{} + e.lo, hi = v8{} + e.hi;
  for (int64_t blk = 0; blk < rows.nb; ++blk) {
  for (int64_t r = r0; r < r1; ++r) {
    v8 acc[U][NV];
    float* sc = rows.scratch + (r - r0) * 64;
    for (int u = 0; u < U; ++u)
      for (int q = 0; q < NV; ++q) acc[u][q] = (u == 0 && blk > 0) ? ld8(sc + 8 * q) : v8{};
    int64_t k = rows.ptr[blk * rows.stride + r];
    const int64_t end = rows.ptr[blk * rows.stride + r + 1];
    for (; k + U <= end; k += U)
      for (int u = 0; u < U; ++u) {
        const v8 v = v8{} + val[k + u];
        const float* __restrict x = Gc + off(k + u);
        for (int q = 0; q < NV; ++q)
          acc[u][q] += v * ((MASKED && q == NV - 1) ? ld_part(x + 8 * q, last) : ld8(x + 8 * q));
      }
    for (; k < end; ++k) {
      const v8 v = v8{} + val[k];
      const float* __restrict x = Gc + off(k);
      for (int q = 0; q < NV; ++q)
        acc[0][q] += v * ((MASKED && q == NV - 1) ? ld_part(x + 8 * q, last) : ld8(x + 8 * q));
    }
    for (int u = 1; u < U; ++u)
      for (int q = 0; q < NV; ++q) acc[0][q] += acc[u][q];
    if (blk + 1 < rows.nb) {
      for (int q = 0; q < NV; ++q) st8(sc + 8 * q, acc[0][q]);
      continue;
    }
    const v8 b = v8{} + (e.bias ? e.bias[r] : 0.f);
    if (d.direct) {  // bias, residual and clamp on the registers, one store
      float* y = Y + r * e.oplane + d.yoff;
      const float* res = e.residual ? e.residual + r * plane + d.roff : nullptr;
      for (int q = 0; q < NV; ++q) {
        const bool part = MASKED && q == NV - 1;
        v8 a = acc[0][q] + b;
        if (res) a += part ? ld_part(res + 8 * q, last) : ld8(res + 8 * q);
        if (e.clamp) { a = a > lo ? a : lo; a = a < hi ? a : hi; }
        if (part) st_part(y + 8 * q, a, last);
        else st8(y + 8 * q, a);
      }
    } else {
      alignas(32) float out[8 * NV];
      for (int q = 0; q < NV; ++q) st8(out + 8 * q, acc[0][q] + b);
      store_row(out, w, c0, r, Y, e);
    }
  }
  }
}

// the last columns (fewer than 64): ceil(left / 8) vectors, the last one masked when left is not a multiple of 8
template <int NV, int U, typename Idx>
static inline void tail(const Rows rowptr, const Idx off, const float* val, const float* G, int64_t c,
                        int last, int64_t r0, int64_t r1, float* Y, const Epilogue& e, const Dest d) {
  if (last == 8) tile<NV, U, false>(rowptr, off, val, G, c, 8, r0, r1, Y, e, d);
  else tile<NV, U, true>(rowptr, off, val, G, c, last, r0, r1, Y, e, d);
}

// grid columns [c0, c0 + width), width <= 64, landing at `d`
template <typename Idx>
static void run_columns(const Rows rowptr, const Idx off, const float* val, const float* G, int64_t c,
                        int64_t width, int64_t r0, int64_t r1, float* Y, const Epilogue& e, const Dest d) {
  if (width == 64) { tile<8, 1, false>(rowptr, off, val, G, c, 8, r0, r1, Y, e, d); return; }
  const int nv = (int)((width + 7) / 8), last = (int)(width - 8 * (nv - 1));
  switch (nv) {
    case 1: tail<1, 4>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    case 2: tail<2, 4>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    case 3: tail<3, 2>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    case 4: tail<4, 2>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    case 5: tail<5, 1>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    case 6: tail<6, 1>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    case 7: tail<7, 1>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
    default: tail<8, 1>(rowptr, off, val, G, c, last, r0, r1, Y, e, d); break;
  }
}

// A column segment: grid columns [c0, c0 + width) and where they land
struct Segment {
  int64_t c0, width;
  Dest d;
};

// how a convolution's grid columns are cut: contiguous outputs in 64-column tiles; rows of at least ROW_MIN
// outputs one row at a time (only valid columns computed, stored from the registers); narrower rows in 64-column
// tiles across rows (stored through store_row, the grid's padding columns computed and dropped): a 7-wide row cut
// alone would pay each non-zero's loads for one masked vector
static std::vector<Segment> segments(int64_t ho, int64_t wo, int64_t wq, int64_t ostride, int64_t ooff) {
  const int64_t ROW_MIN = 48;
  std::vector<Segment> out;
  if (wq == wo && ostride == wo && ooff == 0) {
    for (int64_t c = 0; c < ho * wo; c += 64) out.push_back({c, std::min<int64_t>(64, ho * wo - c), {true, c, c}});
  } else if (wo >= ROW_MIN) {
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t j = 0; j < wo; j += 64)
        out.push_back({i * wq + j, std::min<int64_t>(64, wo - j), {true, ooff + i * ostride + j, i * wo + j}});
  } else {
    for (int64_t c = 0; c < ho * wq; c += 64) out.push_back({c, std::min<int64_t>(64, ho * wq - c), {false, 0, 0}});
  }
  return out;
}

// d[j] = s[2 j] for j in [j0, j1): eight at a time from two loads (never reading past s[2 (j1 - 1)])
static inline void copy_stride2(float* __restrict d, const float* __restrict s, int64_t j0, int64_t j1) {
  int64_t j = j0;
#if defined(__AVX2__)
  for (; j + 8 < j1; j += 8) {
    const __m256 a = _mm256_loadu_ps(s + 2 * j), b = _mm256_loadu_ps(s + 2 * j + 8);
    const __m256 e = _mm256_shuffle_ps(a, b, 0x88);  // a0 a2 b0 b2 | a4 a6 b4 b6
    _mm256_storeu_ps(d + j, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
  }
#endif
  for (; j < j1; ++j) d[j] = s[2 * j];
}

// the first i >= 0 with i * s + a >= 0 (at most n), and one past the last i with i * s + a <= last (in [lo, n])
static inline int64_t first_inside(int64_t a, int64_t s, int64_t n) {
  return a >= 0 ? 0 : std::min<int64_t>(n, (-a + s - 1) / s);
}
static inline int64_t end_inside(int64_t a, int64_t s, int64_t last, int64_t lo, int64_t n) {
  return last - a < 0 ? lo : std::max<int64_t>(lo, std::min<int64_t>(n, (last - a) / s + 1));
}

// the zero-padded, phase-split grid [N, C * P, Hq, Wq] of x [N, C, H, W]; phase p reads input row
// (i * sh + py[p] - ph) and column (j * sw + px[p] - pw). Per phase the rows and columns that fall inside the
// input are found once; the rest is zeroed.
static torch::Tensor make_grid(const torch::Tensor& x, const std::vector<int64_t>& phases, int64_t sh, int64_t sw,
                               int64_t ph, int64_t pw, int64_t hq, int64_t wq) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t P = (int64_t)phases.size() / 2;
  auto G = torch::empty({N, C * P, hq, wq}, x.options());
  const float* xp = x.data_ptr<float>();
  float* gp = G.data_ptr<float>();
  at::parallel_for(0, N * C, 4, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const float* src = xp + nc * H * W;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t py = phases[2 * p], px = phases[2 * p + 1];
        float* dst = gp + (nc * P + p) * hq * wq;
        const int64_t i0 = first_inside(py - ph, sh, hq), i1 = end_inside(py - ph, sh, H - 1, i0, hq);
        const int64_t j0 = first_inside(px - pw, sw, wq), j1 = end_inside(px - pw, sw, W - 1, j0, wq);
        std::memset(dst, 0, sizeof(float) * i0 * wq);
        std::memset(dst + i1 * wq, 0, sizeof(float) * (hq - i1) * wq);
        for (int64_t i = i0; i < i1; ++i) {
          float* drow = dst + i * wq;
          const float* s0 = src + (i * sh + py - ph) * W + px - pw;
          for (int64_t j = 0; j < j0; ++j) drow[j] = 0.f;
          if (sw == 1) std::memcpy(drow + j0, s0 + j0, sizeof(float) * (j1 - j0));
          else if (sw == 2) copy_stride2(drow, s0, j0, j1);
          else for (int64_t j = j0; j < j1; ++j) drow[j] = s0[j * sw];
          for (int64_t j = j1; j < wq; ++j) drow[j] = 0.f;
        }
      }
    }
  });
  return G;
}

// geom = {sh, sw, ph, pw, hq, wq, ho, wo, direct, oph, opw, max_off}; phases = {py0, px0, py1, px1, ...}
// oph/opw > 0: the output is written zero-padded ([ho + 2 oph + 1, wo + 2 opw], the extra row for the grid reads
// of the next convolution), so that a following stride-1 "same" convolution reads it as its grid directly
torch::Tensor conv(torch::Tensor x, torch::Tensor rowptr, torch::Tensor off, torch::Tensor val,
                   c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual, double lo, double hi,
                   std::vector<int64_t> geom, std::vector<int64_t> phases) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be fp32 [N, C, H, W]");
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && off.scalar_type() == at::kInt && val.scalar_type() == at::kFloat,
              "rowptr int64, off int32, val fp32");
  TORCH_CHECK(geom.size() == 12, "geom has 12 entries");
  const int64_t sh = geom[0], sw = geom[1], ph = geom[2], pw = geom[3], hq = geom[4], wq = geom[5];
  const int64_t ho = geom[6], wo = geom[7];
  const bool direct = geom[8] != 0;
  const int64_t oph = geom[9], opw = geom[10];
  const bool padded_out = oph > 0 || opw > 0;
  const int64_t oh_all = padded_out ? ho + 2 * oph + 1 : ho, ow_all = padded_out ? wo + 2 * opw : wo;
  x = x.contiguous();
  TORCH_CHECK(rowptr.dim() == 2 && rowptr.size(0) >= 1 && rowptr.size(1) >= 2 && rowptr.is_contiguous(),
              "rowptr must be [channel blocks, R + 1]");
  const int64_t N = x.size(0), nb = rowptr.size(0), R = rowptr.size(1) - 1;
  torch::Tensor G = direct ? x : make_grid(x, phases, sh, sw, ph, pw, hq, wq);
  const int64_t gstride = G.numel() / std::max<int64_t>(1, N);
  auto Y = torch::empty({N, R, oh_all, ow_all}, x.options());
  torch::Tensor bc, rc;
  const float* bp = nullptr;
  const float* rp = nullptr;
  if (bias.has_value() && bias->defined()) { bc = bias->contiguous(); bp = bc.data_ptr<float>(); }
  if (residual.has_value() && residual->defined()) {
    rc = residual->contiguous();
    TORCH_CHECK(rc.numel() == N * R * ho * wo && rc.scalar_type() == at::kFloat, "residual must match the output");
    rp = rc.data_ptr<float>();
  }
  const bool clamp = lo > -INFINITY || hi < INFINITY;
  const int64_t M = ho * wq;  // grid columns that hold outputs
  // every read is G[off[k] + j] with 0 <= off[k] <= max_off and j < M: it must stay inside this image's grid
  TORCH_CHECK(ho > 0 && wo > 0 && wo <= wq && geom[11] >= 0 && geom[11] + M <= gstride,
              "sparse convolution: the weight's offsets do not fit this input (", geom[11], " + ", M, " > ",
              gstride, ")");
  const std::vector<Segment> segs = segments(ho, wo, wq, ow_all, oph * ow_all + opw);
  const int64_t ntiles = (int64_t)segs.size();
  const int64_t nnz = val.numel();
  // rows per work item: about 32k multiply-adds per item, at least 4 rows
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(1, R)) * std::min<int64_t>(M, 64);
  int64_t rb = std::min<int64_t>(R, std::max<int64_t>(4, 32768 / per_row));
  if (nb > 1) {  // channel blocks: all rows of a tile in one work item, unless threads would idle
    const int64_t items = std::max<int64_t>(1, (2 * at::get_num_threads() + N * ntiles - 1) / (N * ntiles));
    rb = (R + items - 1) / items;
  }
  const int64_t nrb = (R + rb - 1) / rb;
  const int64_t* rpp = rowptr.data_ptr<int64_t>();
  // the blocks are checked to be one non-decreasing run from 0 to nnz where they are built (sparse_conv._plan)
  TORCH_CHECK(rpp[0] == 0 && rpp[nb * (R + 1) - 1] == nnz, "sparse convolution: row pointers do not span the weight");
  const int32_t* op = off.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  const float* gp = G.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  const int64_t oplane = oh_all * ow_all;
  if (padded_out) {  // zero the border the kernel does not write
    at::parallel_for(0, N * R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float* pl = yp + p * oplane;
        std::memset(pl, 0, sizeof(float) * oph * ow_all);
        for (int64_t i = 0; i < ho; ++i) {
          float* row = pl + (oph + i) * ow_all;
          std::memset(row, 0, sizeof(float) * opw);
          std::memset(row + opw + wo, 0, sizeof(float) * opw);
        }
        std::memset(pl + (oph + ho) * ow_all, 0, sizeof(float) * (oh_all - oph - ho) * ow_all);
      }
    });
  }
  at::parallel_for(0, N * ntiles * nrb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(nb > 1 ? rb * 64 : 0);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it % nrb, t = (it / nrb) % ntiles, n = it / (nrb * ntiles);
      const int64_t r0 = b * rb, r1 = std::min<int64_t>(R, r0 + rb);
      Epilogue e{bp, rp ? rp + n * R * ho * wo : nullptr, clamp, (float)lo, (float)hi, wq, wo, ho,
                 ow_all, oplane, oph * ow_all + opw};
      const Segment& sg = segs[t];
      run_columns(Rows{rpp, R + 1, nb, scratch.data()}, Offsets{op}, vp, gp + n * gstride, sg.c0, sg.width, r0, r1,
                  yp + n * R * oplane, e, sg.d);
    }
  });
  return Y;
}

// one column of X (batch 1): four scalar accumulators per row (gathers are slower here)
template <typename I>
static void rows_vec(const int64_t* __restrict rowptr, const I* __restrict col, const float* __restrict val,
                     const float* __restrict x, float* __restrict y, int64_t r0, int64_t r1,
                     const float* __restrict bias) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (; k + 4 <= e; k += 4) {
      s0 += val[k] * x[col[k]];
      s1 += val[k + 1] * x[col[k + 1]];
      s2 += val[k + 2] * x[col[k + 2]];
      s3 += val[k + 3] * x[col[k + 3]];
    }
    for (; k < e; ++k) s0 += val[k] * x[col[k]];
    y[r] = ((s0 + s1) + (s2 + s3)) + (bias ? bias[r] : 0.f);
  }
}

template <typename I>
static void spmm_impl(const torch::Tensor& rowptr, const I* col, const torch::Tensor& val, const torch::Tensor& X,
                      torch::Tensor& Y, const float* bias) {
  const int64_t N = X.size(0), K = X.size(1), M = X.size(2), R = rowptr.size(0) - 1;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* vp = val.data_ptr<float>();
  const float* xp = X.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  const int64_t nnz = val.numel();
  if (M == 1) {  // matrix times vector
    const int64_t rb = std::max<int64_t>(64, 65536 / std::max<int64_t>(1, nnz / std::max<int64_t>(1, R)));
    at::parallel_for(0, N * ((R + rb - 1) / rb), 1, [&](int64_t begin, int64_t end) {
      const int64_t nrb = (R + rb - 1) / rb;
      for (int64_t it = begin; it < end; ++it) {
        const int64_t n = it / nrb, r0 = (it % nrb) * rb, r1 = std::min<int64_t>(R, r0 + rb);
        rows_vec<I>(rp, col, vp, xp + n * K, yp + n * R, r0, r1, bias);
      }
    });
    return;
  }
  const int64_t TILE = 64, ntiles = (M + TILE - 1) / TILE;
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(1, R)) * std::min<int64_t>(M, TILE);
  const int64_t rb = std::min<int64_t>(R, std::max<int64_t>(4, 32768 / per_row));
  const int64_t nrb = (R + rb - 1) / rb;
  at::parallel_for(0, N * ntiles * nrb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it % nrb, t = (it / nrb) % ntiles, n = it / (nrb * ntiles);
      const int64_t c0 = t * TILE, w = std::min<int64_t>(TILE, M - c0);
      const int64_t r0 = b * rb, r1 = std::min<int64_t>(R, r0 + rb);
      Epilogue e{bias, nullptr, false, 0.f, 0.f, M, M, 1, M, M, 0};
      run_columns(Rows{rp, R + 1, 1, nullptr}, Columns<I>{col, M}, vp, xp + n * K * M, c0, w, r0, r1, yp + n * R * M,
                  e, Dest{true, c0, c0});
    }
  });
}

// Y[n] = W @ X[n] (+ bias) for CSR W (rowptr int64, col uint16 stored as int16 or int32, val fp32), X [N, K, M]
torch::Tensor spmm(torch::Tensor rowptr, torch::Tensor col, torch::Tensor val, torch::Tensor X,
                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(X.dim() == 3 && X.scalar_type() == at::kFloat && X.is_contiguous(), "X must be contiguous fp32 [N,K,M]");
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && val.scalar_type() == at::kFloat, "rowptr int64, values fp32");
  const int64_t R = rowptr.size(0) - 1;
  auto Y = torch::empty({X.size(0), R, X.size(2)}, X.options());
  const float* bp = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) { bc = bias->contiguous(); bp = bc.data_ptr<float>(); }
  if (col.scalar_type() == at::kShort) {
    spmm_impl<uint16_t>(rowptr, reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>()), val, X, Y, bp);
  } else {
    TORCH_CHECK(col.scalar_type() == at::kInt, "col must be int16 (as uint16) or int32");
    spmm_impl<int32_t>(rowptr, col.data_ptr<int32_t>(), val, X, Y, bp);
  }
  return Y;
}

// y = x @ W.T (+ bias) for x [B, K]: batch 1 needs no transpose, larger batches go through X = x.T
torch::Tensor linear(torch::Tensor rowptr, torch::Tensor col, torch::Tensor val, torch::Tensor x,
                     c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2, "x must be [B, K]");
  const int64_t B = x.size(0), K = x.size(1), R = rowptr.size(0) - 1;
  if (B == 1) return spmm(rowptr, col, val, x.contiguous().view({1, K, 1}), bias).view({1, R});
  auto Y = spmm(rowptr, col, val, x.t().contiguous().unsqueeze(0), bias);
  return Y.squeeze(0).t().contiguous();
}

// max pooling of NCHW x (floor mode, dilation 1, implicit -inf padding): the column max of kh input rows,
// then the max of kw strided columns of it
torch::Tensor maxpool(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be fp32 [N, C, H, W]");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = (H + 2 * ph - kh) / sh + 1, wo = (W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "pooling window larger than the input");
  auto Y = torch::empty({N, C, ho, wo}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t wp = W + 2 * pw + sw;  // padded row, with slack for the last window
  at::parallel_for(0, N * C, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> row(wp, ninf);
    for (int64_t nc = begin; nc < end; ++nc) {
      const float* src = xp + nc * H * W;
      float* dst = yp + nc * ho * wo;
      for (int64_t i = 0; i < ho; ++i) {
        float* r = row.data() + pw;
        std::fill(r, r + W, ninf);
        const int64_t a0 = std::max<int64_t>(0, i * sh - ph), a1 = std::min<int64_t>(H, i * sh - ph + kh);
        for (int64_t a = a0; a < a1; ++a) {
          const float* s = src + a * W;
          for (int64_t j = 0; j < W; ++j) r[j] = r[j] > s[j] ? r[j] : s[j];
        }
        const float* q = row.data();
        for (int64_t j = 0; j < wo; ++j) {
          float m = q[j * sw];
          for (int64_t b = 1; b < kw; ++b) m = m > q[j * sw + b] ? m : q[j * sw + b];
          dst[i * wo + j] = m;
        }
      }
    }
  });
  return Y;
}
"""

KERNELS = CppExtension(
    "sparsifx_kernels", CONV_SOURCE + BLOCK_SOURCE, ["conv", "maxpool", "spmm", "linear", "block"], "sparse CPU kernels"
)


def available() -> bool:
    """Whether the kernels are built or a C++ compiler exists to build them."""
    return KERNELS.available()


def load():
    """Compile (once, cached on disk) and return the extension module; ``BackendError`` if that is impossible."""
    return KERNELS.load()


def build_name() -> str:
    return KERNELS.build_name()
