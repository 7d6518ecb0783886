"""Build script: the pure-Python package plus the native extension ``dpo_kernels._C`` (csrc/).

The extension holds the C++ CPU kernels (always) and the CUDA fallback kernels (when torch has CUDA
and nvcc is found). It needs torch at build time, so install with ``--no-build-isolation`` into an
environment that already has torch (see README.md).

Environment switches:
  DPO_KERNELS_NO_NATIVE=1    build no native code (the package then uses its Triton/PyTorch backends)
  DPO_KERNELS_NO_CUDA=1      build the CPU kernels only
  DPO_KERNELS_STRICT_BUILD=1 a failing native build fails the install (CI sets it); by default the
                             install goes on without the extension and the library says so, in one
                             line, the first time a native kernel is asked for
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0")
  CUDA_HOME                  the CUDA toolkit (default: found from the real path of nvcc on PATH)
"""

import os
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The CPU kernel file is compiled once per instruction set, as ATen compiles its own CPU kernels:
# csrc/cpu/logprobs.cpp picks the copy that the running CPU supports.
CPU_KERNEL = "csrc/cpu/logprobs_kernel.cpp"
X86_CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
}


def flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def find_cuda_home():
    """CUDA_HOME, or the toolkit that holds nvcc and libcudart.

    The nvcc on PATH may be a link or a wrapper script outside the toolkit (here /usr/local/bin/nvcc
    execs /usr/local/cuda-13.0/bin/nvcc); torch's own guess, the folder above it, then fails to link
    (-lcudart), so a candidate counts only where the runtime library is found beside nvcc.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        candidates.insert(1, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        if has_nvcc and any(os.path.exists(os.path.join(home, lib, "libcudart.so")) for lib in ("lib64", "lib")):
            return home
    return None


def cuda_include_dirs():
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) ship in the nvidia-*
    wheels, not in the toolkit, for CUDA 13 builds of torch."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [os.path.join(r, sub, "include") for r in roots for sub in ("cu13", "cu12") if os.path.isdir(os.path.join(r, sub, "include"))]


def native_extension():
    """(ext_modules, cmdclass) for dpo_kernels._C, or ([], {}) when no native build is possible."""
    if flag("DPO_KERNELS_NO_NATIVE"):
        return [], {}
    cuda_home = None if flag("DPO_KERNELS_NO_CUDA") else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        if flag("DPO_KERNELS_STRICT_BUILD"):
            raise
        warnings.warn(f"dpo_kernels: no native kernels ({error}); install torch first and use --no-build-isolation")
        return [], {}

    with_cuda = bool(cuda_home and torch.version.cuda and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    x86 = os.uname().machine in ("x86_64", "AMD64") and sys.platform != "win32"
    capabilities = X86_CAPABILITIES if x86 else {"DEFAULT": []}
    cxx = ["-O3", "-fopenmp"] + [f"-DDPO_KERNELS_HAVE_{cap}" for cap in capabilities if cap != "DEFAULT"]
    sources = ["csrc/ops.cpp", "csrc/cpu/logprobs.cpp"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += ["csrc/cuda/logprobs.cu", "csrc/cuda/register.cpp"]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        kwargs["include_dirs"] = cuda_include_dirs()
        extension = CUDAExtension("dpo_kernels._C", sources, **kwargs)
    else:
        extension = CppExtension("dpo_kernels._C", sources, **kwargs)

    class BuildNative(BuildExtension):
        """Adds the per-capability kernel objects; a failed build is a warning unless strict."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # the compiler is missing or fails: install the rest
                if flag("DPO_KERNELS_STRICT_BUILD"):
                    raise
                self.warn(f"dpo_kernels: native build failed, installing without it: {error}")

        def build_extension(self, ext):
            # The per-capability objects compile while the extension's own sources do (nvcc is the long pole),
            # not before them, and join its link.
            compile_sources = self.compiler.compile

            def compile_with_capabilities(sources, **kwargs):
                with ThreadPoolExecutor(len(capabilities)) as pool:
                    futures = [pool.submit(self.capability_object, compile_sources, ext, cap, cap_flags)
                               for cap, cap_flags in capabilities.items()]  # fmt: skip
                    objects = compile_sources(sources, **kwargs)
                    return objects + [obj for future in futures for obj in future.result()]

            self.compiler.compile = compile_with_capabilities
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_sources

        def capability_object(self, compile_sources, ext, cap, cap_flags):
            post = list(ext.extra_compile_args["cxx"]) + cap_flags + [f"-DCPU_CAPABILITY={cap}"]
            return compile_sources(
                [CPU_KERNEL],
                output_dir=os.path.join(self.build_temp, cap.lower()),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": post, "nvcc": []},
            )

    return [extension], {"build_ext": BuildNative.with_options(use_ninja=True)}


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    ext_modules, cmdclass = native_extension()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
