"""A small C++ sparse-times-dense kernel, compiled lazily with ``torch.utils.cpp_extension.load_inline``.

``spmm(rowptr, col, val, X, bias) -> Y``: ``Y[n] = W @ X[n] (+ bias)`` where ``W`` is CSR (``rowptr`` int64,
``col`` uint16 stored as int16 or int32, ``val`` fp32) and ``X`` is ``[N, K, M]`` fp32. Columns of ``X`` are
processed in tiles of 64/32/.../1 held in registers, so each non-zero costs one broadcast and ``tile/16`` FMAs;
work is split over ``at::parallel_for`` (torch's own thread pool, so ``torch.set_num_threads`` applies).

``linear(rowptr, col, val, x, bias)`` is ``x @ W.T (+ bias)`` for ``x`` ``[B, K]`` (transposes done in C++).

Nothing is compiled at import. The first call builds into ``$SPARSIFX_CACHE_DIR/torch_extensions/<hash>`` (default
``~/.cache/sparsifx``); the hash covers the source, the flags and the CPU, so a cache shared between different
machines never loads a binary built for another CPU. Without a C++ compiler the call raises ``BackendError``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

from sparsifx.errors import BackendError

log = logging.getLogger(__name__)

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

// rows r0..r1 times a tile of VL * NV columns of X; U independent accumulator sets (non-zeros k, k+1, ...)
// keep U * NV FMA chains in flight; the accumulators stay in vector registers
template <typename I, typename V, int VL, int NV, int U>
static inline void rows_tile(const int64_t* __restrict rowptr, const I* __restrict col, const float* __restrict val,
                             const float* __restrict X, int64_t ldx, float* __restrict Y, int64_t ldy,
                             int64_t r0, int64_t r1, const float* __restrict bias) {
  for (int64_t r = r0; r < r1; ++r) {
    V acc[U][NV];
    const float b = bias ? bias[r] : 0.f;
    for (int u = 0; u < U; ++u)
      for (int q = 0; q < NV; ++q) acc[u][q] = V{} + (u == 0 ? b : 0.f);
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; k + U <= e; k += U) {
      for (int u = 0; u < U; ++u) {
        const V v = V{} + val[k + u];
        const float* __restrict xr = X + (int64_t)col[k + u] * ldx;
        for (int q = 0; q < NV; ++q) { V x; __builtin_memcpy(&x, xr + q * VL, sizeof(V)); acc[u][q] += v * x; }
      }
    }
    for (; k < e; ++k) {
      const V v = V{} + val[k];
      const float* __restrict xr = X + (int64_t)col[k] * ldx;
      for (int q = 0; q < NV; ++q) { V x; __builtin_memcpy(&x, xr + q * VL, sizeof(V)); acc[0][q] += v * x; }
    }
    for (int u = 1; u < U; ++u)
      for (int q = 0; q < NV; ++q) acc[0][q] += acc[u][q];
    float* __restrict yr = Y + r * ldy;
    for (int q = 0; q < NV; ++q) __builtin_memcpy(yr + q * VL, &acc[0][q], sizeof(V));
  }
}

// rows times a narrow tile (fewer than 8 columns), scalar
template <typename I, int BT>
static inline void rows_narrow(const int64_t* __restrict rowptr, const I* __restrict col, const float* __restrict val,
                               const float* __restrict X, int64_t ldx, float* __restrict Y, int64_t ldy,
                               int64_t r0, int64_t r1, const float* __restrict bias) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[BT];
    const float b = bias ? bias[r] : 0.f;
    for (int j = 0; j < BT; ++j) acc[j] = b;
    const int64_t e = rowptr[r + 1];
    for (int64_t k = rowptr[r]; k < e; ++k) {
      const float v = val[k];
      const float* __restrict xr = X + (int64_t)col[k] * ldx;
      for (int j = 0; j < BT; ++j) acc[j] += v * xr[j];
    }
    for (int j = 0; j < BT; ++j) Y[r * ldy + j] = acc[j];
  }
}

// one column of X (batch 1): four scalar accumulators per row (gathers are slower here)
template <typename I>
static inline void rows_vec(const int64_t* __restrict rowptr, const I* __restrict col, const float* __restrict val,
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
static void run_tile(const int64_t* rowptr, const I* col, const float* val, const float* X, int64_t ldx,
                     float* Y, int64_t ldy, int64_t r0, int64_t r1, const float* bias, int64_t width) {
  int64_t c = 0;
  while (c < width) {
    const int64_t left = width - c;
    const float* Xc = X + c;
    float* Yc = Y + c;
    if (left >= 64) { rows_tile<I, v16, 16, 4, 1>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 64; }
    else if (left >= 32) { rows_tile<I, v16, 16, 2, 2>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 32; }
    else if (left >= 16) { rows_tile<I, v16, 16, 1, 4>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 16; }
    else if (left >= 8) { rows_tile<I, v8, 8, 1, 4>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 8; }
    else if (left >= 4) { rows_narrow<I, 4>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 4; }
    else if (left >= 2) { rows_narrow<I, 2>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 2; }
    else if (ldx == 1 && ldy == 1) { rows_vec<I>(rowptr, col, val, Xc, Yc, r0, r1, bias); c += 1; }
    else { rows_narrow<I, 1>(rowptr, col, val, Xc, ldx, Yc, ldy, r0, r1, bias); c += 1; }
  }
}

template <typename I>
static void spmm_impl(const torch::Tensor& rowptr, const I* col, const torch::Tensor& val, const torch::Tensor& X,
                      torch::Tensor& Y, const float* bias) {
  const int64_t N = X.size(0), K = X.size(1), M = X.size(2), R = rowptr.size(0) - 1;
  // columns per work item: 64, or 32/16 so that a K x TILE block of X stays in a 512 KiB share of L2
  const int64_t TILE = 64;  // columns per work item (register tiles of 64/32/16/8/... inside)
  const int64_t ntiles = (M + TILE - 1) / TILE;
  const int64_t nnz = val.numel();
  // rows per work item: about 64k multiply-adds per item, at least 8 rows
  const int64_t avg = std::max<int64_t>(1, nnz / std::max<int64_t>(1, R)) * std::min<int64_t>(M, TILE);
  const int64_t rb = std::min<int64_t>(R, std::max<int64_t>(8, 65536 / std::max<int64_t>(1, avg)));
  const int64_t nrb = (R + rb - 1) / rb;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* v = val.data_ptr<float>();
  const float* xp = X.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  at::parallel_for(0, N * ntiles * nrb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it % nrb, t = (it / nrb) % ntiles, n = it / (nrb * ntiles);
      const int64_t c0 = t * TILE, w = std::min<int64_t>(TILE, M - c0);
      const int64_t r0 = b * rb, r1 = std::min<int64_t>(R, r0 + rb);
      run_tile<I>(rp, col, v, xp + n * K * M + c0, M, yp + n * R * M + c0, M, r0, r1, bias, w);
    }
  });
}

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
"""

CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast"]
_LOCK = threading.Lock()
_MODULE = None


def cache_dir() -> Path:
    """Where sparsifx caches compiled kernels and calibrations (``$SPARSIFX_CACHE_DIR`` or ``~/.cache/sparsifx``)."""
    return Path(os.environ.get("SPARSIFX_CACHE_DIR", Path.home() / ".cache" / "sparsifx"))


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build_name() -> str:
    import torch
    key = "\n".join([CPP_SOURCE, " ".join(CFLAGS), _cpu_signature(), torch.__version__, platform.python_version()])
    return "sparsifx_spmm_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def available() -> bool:
    """Whether the kernel is built or a C++ compiler exists to build it."""
    return _MODULE is not None or shutil.which(os.environ.get("CXX", "c++")) is not None


def load():
    """Compile (once, cached on disk) and return the extension module; ``BackendError`` if that is impossible."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise BackendError("the 'csr_tiled' sparse kernel needs a C++ compiler (set CXX or install g++); "
                               "use backend 'csr' or 'dense' instead")
        from torch.utils.cpp_extension import load_inline
        name = _build_name()
        build = cache_dir() / "torch_extensions" / name
        build.mkdir(parents=True, exist_ok=True)
        log.info("building sparse kernel %s in %s", name, build)
        try:
            _MODULE = load_inline(name=name, cpp_sources=[CPP_SOURCE], functions=["spmm", "linear"], extra_cflags=CFLAGS,
                                  build_directory=str(build), verbose=False)
        except Exception as exc:  # compiler/linker failures surface as RuntimeError/CalledProcessError
            raise BackendError(f"building the sparse kernel failed in {build}: {exc}") from exc
    return _MODULE
