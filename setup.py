"""Install rcka-kernels. The pure-Python package always installs; two optional
compiled parts are built when their tools are there:
- the CUDA library in csrc/ (rcka_kernels._rcka_cuda), by CMake when nvcc is
  found (see CMakeLists.txt);
- the native linear op in rcka_kernels/csrc/ (rcka_kernels._rcka_native, C++ on ATen, any
  device), prebuilt with PyTorch's extension flags when torch is importable while building
  (``pip install --no-build-isolation``). A plain ``pip install`` builds in isolation, without
  torch: the package then compiles the same source (shipped inside it) against the installed
  torch on first use (rcka_kernels/_native.py).

Environment switches:
  RCKA_SKIP_NATIVE=1   do not prebuild the native op (it is built on first use instead)
  RCKA_FORCE_NATIVE=1  a failed native prebuild is an error (default: a warning)
  RCKA_SKIP_CUDA=1     do not build the CUDA library
  RCKA_FORCE_CUDA=1    a failed CUDA build is an error (default: a warning, and
                       the package installs without the cuda backend)
  RCKA_CUDA_ARCHS      CMake architecture list, default "80;90" (sm_80, sm_90)
  RCKA_BUILD_JOBS      parallel compile jobs (default: CPU count)
  CUDA_HOME / CUDACXX  where nvcc lives when it is not on PATH

CMake keeps its build tree in build/cuda-<python>-<archs>/ so that rebuilds
(including pip's isolated builds) only recompile what changed.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _torch_extension():
    """(the native op's Extension, PyTorch's build_ext) or (None, why not)."""
    if _flag("RCKA_SKIP_NATIVE"):
        return None, "RCKA_SKIP_NATIVE=1"
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001 - an isolated build env has no torch
        return None, f"PyTorch is not importable in the build environment ({type(e).__name__}); pip install --no-build-isolation prebuilds"
    ext = CppExtension(
        "rcka_kernels._rcka_native",
        ["rcka_kernels/csrc/native.cpp"],
        extra_compile_args=["-O3"],
        optional=not _flag("RCKA_FORCE_NATIVE"),
    )
    return ext, BuildExtension


NATIVE, NATIVE_BUILD = _torch_extension()
if NATIVE is None:
    print(f"rcka-kernels: not prebuilding the native op ({NATIVE_BUILD}); it will be built on first use", file=sys.stderr)
    NATIVE_BUILD = build_ext


def _find_nvcc():
    cand = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand.append(os.path.join(home, "bin", "nvcc"))
    cand.append(shutil.which("nvcc"))
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=not _flag("RCKA_FORCE_CUDA"))


class CMakeBuild(NATIVE_BUILD):
    """Builds CMakeExtensions with CMake (a failure is a warning unless RCKA_FORCE_CUDA=1),
    the native op with PyTorch's BuildExtension."""

    def run(self):
        if NATIVE is None and not self.inplace:
            # a native library left in build/lib by an earlier prebuild (perhaps against another torch,
            # from older sources) would be packed into this wheel and loaded instead of the first-use build
            stale = self.get_ext_fullpath("rcka_kernels._rcka_native")
            if os.path.exists(stale):
                os.remove(stale)
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if _flag("RCKA_SKIP_CUDA"):
            print("rcka-kernels: RCKA_SKIP_CUDA=1, not building the CUDA library")
            return
        try:
            self._cmake_build(ext)
        except Exception as e:  # noqa: BLE001 - any failure falls back to the pure-Python package
            if _flag("RCKA_FORCE_CUDA"):
                raise
            msg = (f"rcka-kernels: the CUDA library was not built ({e}); the 'cuda' backend will be unavailable. "
                   "Set RCKA_FORCE_CUDA=1 to make this an error.")
            print("WARNING: " + msg, file=sys.stderr)

    def _cmake_build(self, ext):
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        try:
            import pybind11

            pybind11_dir = pybind11.get_cmake_dir()
        except Exception:  # noqa: BLE001 - ask the interpreter instead (the CMake-documented way)
            try:
                pybind11_dir = subprocess.check_output([sys.executable, "-m", "pybind11", "--cmakedir"], text=True).strip()
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"pybind11 is not installed in the build environment ({e})") from e
        archs = os.environ.get("RCKA_CUDA_ARCHS", "80;90").replace(",", ";")
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{archs.replace(';', '_')}"
        build_dir = os.path.join(ROOT, "build", f"cuda-{tag}")
        out_dir = os.path.join(build_dir, "out")
        os.makedirs(build_dir, exist_ok=True)
        args = [
            cmake,
            "-S",
            ROOT,
            "-B",
            build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DRCKA_CUDA_ARCHS={archs}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DRCKA_OUTPUT_DIR={out_dir}",
        ]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "Makefile")):
            args += ["-G", "Ninja"]
        try:
            subprocess.check_call(args)
        except subprocess.CalledProcessError:
            # a stale cache (another generator, a vanished isolated build env): start over once
            shutil.rmtree(build_dir, ignore_errors=True)
            os.makedirs(build_dir, exist_ok=True)
            subprocess.check_call(args)
        jobs = os.environ.get("RCKA_BUILD_JOBS") or str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", jobs])
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = os.path.join(out_dir, "_rcka_cuda" + suffix)
        if not os.path.isfile(built):
            raise RuntimeError(f"CMake did not produce {built}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built, dest)
        os.chmod(dest, 0o755)


setup(
    ext_modules=[CMakeExtension("rcka_kernels._rcka_cuda")] + ([NATIVE] if NATIVE is not None else []),
    cmdclass={"build_ext": CMakeBuild.with_options(use_ninja=False) if NATIVE is not None else CMakeBuild},
)
