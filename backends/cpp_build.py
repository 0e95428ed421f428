"""Lazy, cached builds of the C++ kernels (``torch.utils.cpp_extension.load_inline``).

Nothing is compiled at import. The first use of a kernel builds it into ``$SPARSIFX_CACHE_DIR/torch_extensions/
<name>_<hash>`` (default ``~/.cache/sparsifx``) with ``-march=native``: the binary uses the vector units of the machine
it runs on (AVX2, AVX-512, NEON), which is this library's runtime dispatch. The hash covers the source, the flags, the
CPU, torch and Python, so a cache shared between machines never loads a binary built for another CPU. Without a C++
compiler a build raises ``BackendError``.
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

# -fopenmp: at::parallel_for is an OpenMP region in torch's CPU builds; compiled without it the region runs on
# one thread whatever torch.set_num_threads says
# tuples: torch's load_inline appends to the flag lists it is given, which changed build_name() (and with it the
# calibration cache key) once the kernels were loaded
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
LDFLAGS = ("-fopenmp",)


def cache_dir() -> Path:
    """Where sparsifx caches compiled kernels and calibrations (``$SPARSIFX_CACHE_DIR`` or ``~/.cache/sparsifx``)."""
    return Path(os.environ.get("SPARSIFX_CACHE_DIR", Path.home() / ".cache" / "sparsifx"))


def cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


class CppExtension:
    """One C++ source exposing ``functions``; ``load()`` compiles it once per process (and once per machine)."""

    def __init__(self, prefix: str, source: str, functions: list[str], what: str):
        self.prefix, self.source, self.functions, self.what = prefix, source, functions, what
        self._module = None
        self._lock = threading.Lock()

    def build_name(self) -> str:
        import torch

        key = "\n".join(
            [self.source, " ".join(CFLAGS + LDFLAGS), cpu_signature(), torch.__version__, platform.python_version()]
        )
        return f"{self.prefix}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def available(self) -> bool:
        """Whether the extension is built or a C++ compiler exists to build it."""
        return self._module is not None or compiler_available()

    def load(self):
        """Compile (once, cached on disk) and return the extension module; ``BackendError`` if that is impossible."""
        if self._module is not None:
            return self._module
        with self._lock:
            if self._module is not None:
                return self._module
            if not compiler_available():
                raise BackendError(
                    f"the {self.what} needs a C++ compiler (set CXX or install g++); "
                    "use backend 'csr' or 'dense' instead"
                )
            from torch.utils.cpp_extension import load_inline

            name = self.build_name()
            build = cache_dir() / "torch_extensions" / name
            build.mkdir(parents=True, exist_ok=True)
            log.info("building %s %s in %s", self.what, name, build)
            try:
                self._module = load_inline(
                    name=name,
                    cpp_sources=[self.source],
                    functions=self.functions,
                    extra_cflags=list(CFLAGS),
                    extra_ldflags=list(LDFLAGS),
                    build_directory=str(build),
                    verbose=False,
                )
            except Exception as exc:  # compiler/linker failures surface as RuntimeError/CalledProcessError
                raise BackendError(f"building the {self.what} failed in {build}: {exc}") from exc
        return self._module
