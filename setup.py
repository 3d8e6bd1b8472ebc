"""Builds shardinfer's one optional compiled part: the GGUF block matmul kernels.

Everything else about the package is declared in pyproject.toml. The kernels,
shardinfer/kernels/gguf_matmul.cc, are an XLA FFI library loaded with ctypes (no Python C API):
they need only a C++17 compiler and jaxlib's FFI headers (jaxlib is in [build-system] requires
on x86-64, so pip's isolated build environment has them). They are built on x86-64 POSIX
machines only; the file compiles without -march flags and picks AVX2 / AVX-VNNI / AVX-512 VNNI
code at run time. If the compiler is missing or fails, the install goes on with a warning and
`shardinfer.kernels.available()` is False (the XLA path is used). `pip install -e .` builds it in
place, next to the sources (git-ignored).

Wheels for users without a compiler (not built by this repository's CI yet):

- Linux x86-64: cibuildwheel with the manylinux_2_28 x86_64 image (its GCC builds the file;
  auditwheel repair bundles nothing beyond libstdc++/libgcc, which manylinux allows), e.g.
  ``CIBW_BUILD="cp311-* cp312-* cp313-*" CIBW_ARCHS_LINUX=x86_64 cibuildwheel --platform linux``;
  set SHARDINFER_REQUIRE_KERNELS=1 there so that a failed compile fails the wheel instead of
  shipping one without the kernel. One wheel serves every x86-64 CPU: the code for each
  instruction set is inside and chosen at run time (a CPU without AVX2 gets available() False).
- Every other platform (aarch64, macOS arm64, ...): the pure-Python wheel, ``py3-none-any``,
  built on a non-x86 machine or with SHARDINFER_NO_KERNELS=1 (no extension, so no platform tag).

Environment: SHARDINFER_NO_KERNELS=1 skips the kernels; SHARDINFER_REQUIRE_KERNELS=1 makes a
failed build an error.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_DIR = os.path.join("shardinfer", "kernels")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    text = f"WARNING: shardinfer: {message}; the XLA path will be used (kernels.available() False)"
    print(text, file=sys.stderr)


def _jaxlib_include() -> str | None:
    """jaxlib's FFI headers (xla/ffi/api/ffi.h), without importing jax."""
    try:
        import jaxlib
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return include if os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")) else None


class OptionalBuildExt(build_ext):
    """build_ext whose failures are warnings (unless SHARDINFER_REQUIRE_KERNELS=1)."""

    def run(self):
        try:
            super().run()
        except Exception as e:
            self._failed(e)

    def build_extension(self, ext):
        include = _jaxlib_include()
        if include is None:
            self._failed(RuntimeError("jaxlib's FFI headers (xla/ffi/api/ffi.h) not found"))
            return
        ext.include_dirs.append(include)
        try:
            super().build_extension(ext)
        except Exception as e:  # CompileError, LinkError, a missing compiler (OSError, ...)
            # A library left from an earlier build no longer matches the sources: gone, so
            # the package says it has no kernels rather than running old ones.
            for stale in {self.get_ext_fullpath(ext.name), os.path.join(
                    KERNEL_DIR, os.path.basename(self.get_ext_filename(ext.name)))}:  # fmt: skip
                if os.path.isfile(stale):
                    os.remove(stale)
            self._failed(e)

    def _failed(self, error: Exception) -> None:
        if _flag("SHARDINFER_REQUIRE_KERNELS"):
            raise error
        if not getattr(self, "_kernel_failed", False):  # not again for the in-place copy
            _warn(f"GGUF block kernels not built ({type(error).__name__}: {error})")
        self._kernel_failed = True


def _extensions() -> list[Extension]:
    machine = platform.machine().lower()
    if _flag("SHARDINFER_NO_KERNELS"):
        return []
    if machine not in ("x86_64", "amd64") or os.name != "posix":
        return []
    return [
        Extension(
            "shardinfer.kernels._gguf_matmul",
            sources=[os.path.join(KERNEL_DIR, f) for f in ("gguf_matmul.cc", "attention.cc")],
            depends=[
                os.path.join(KERNEL_DIR, f)
                for f in (
                    "gguf_matmul_isa.h",
                    "gguf_matmul_amx.h",
                    "gguf_matmul_amx_bf16.h",
                    "attention_isa.h",
                )
            ],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-g0"],
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
