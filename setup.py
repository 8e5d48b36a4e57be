"""Builds vivit_kernels._C, the C++/CUDA extension in csrc/ (install torch first, then
``pip install --no-build-isolation -e .``).

- With nvcc found (CUDA_HOME, else /usr/local/cuda, else nvcc on PATH): a CUDAExtension with the CPU and CUDA
  implementations, for
  the architectures in VIVIT_KERNELS_CUDA_ARCHS (default "8.0;9.0", i.e. sm_80 and sm_90), plus PTX of the newest
  one (a newer GPU JIT-compiles it; an older one gets an error naming its architecture and this variable).
- Without nvcc, or with VIVIT_KERNELS_SKIP_CUDA_BUILD=1: a CppExtension with the CPU implementations only.
- VIVIT_KERNELS_SKIP_EXTENSION=1: no extension at all (the package then uses its PyTorch fallbacks).
- MAX_JOBS limits parallel compile jobs (torch's BuildExtension reads it).

Nothing here looks at the machine's GPU or downloads anything: the architectures come from the environment.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_includes() -> list:
    """Header folders of the nvidia-* wheels torch's CUDA build depends on (cuSPARSE, cuBLAS, ... headers
    that ATen's CUDA headers include but a bare CUDA toolkit may lack)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def cuda_arch_list(archs: str) -> str:
    """TORCH_CUDA_ARCH_LIST for ``archs`` ("8.0;9.0"): machine code for each, plus PTX of the newest one, so a
    GPU newer than all of them JIT-compiles that PTX instead of failing."""
    items = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not items:
        raise ValueError("VIVIT_KERNELS_CUDA_ARCHS is empty; give compute capabilities, e.g. '8.0;9.0'")
    if any(a.endswith("+PTX") for a in items):
        return ";".join(items)
    newest = max(items, key=lambda a: tuple(int(p) for p in a.rstrip("a").split(".")))
    return ";".join(a + "+PTX" if a == newest else a for a in items)


def extensions():
    if _flag("VIVIT_KERNELS_SKIP_EXTENSION"):
        return [], {}
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # The toolkit's standard location, before torch guesses it from an nvcc wrapper elsewhere on PATH
        # (whose parent directory need not hold the CUDA libraries).
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, f) for f in ("vivit_kernels.cpp", "preprocess_cpu.cpp", "gelu_cpu.cpp")]
    # -ffp-contract=off / --fmad=false: no fused multiply-adds, so the shared host/device arithmetic
    # (csrc/preprocess.h, csrc/gelu.h) rounds the same way on the CPU and the GPU.
    cxx = ["-O3", "-ffp-contract=off"]  # torch adds its C++ standard (C++20)
    nvcc_path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    with_cuda = not _flag("VIVIT_KERNELS_SKIP_CUDA_BUILD") and nvcc_path is not None and os.path.exists(nvcc_path)
    if with_cuda:
        archs = cuda_arch_list(os.environ.get("VIVIT_KERNELS_CUDA_ARCHS", "8.0;9.0"))
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns this into -gencode flags (no GPU probing)
        # the list, without ';' (a shell separator) or ',' (nvcc splits -D values on commas), for error messages
        archs_macro = archs.replace(";", "/")
        ext = CUDAExtension(
            "vivit_kernels._C",
            sources
            + sorted(f for f in glob.glob(os.path.join(csrc, "cuda", "*.cu")) if not f.endswith("instantiate.cu")),
            include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "--fmad=false", "-lineinfo", f"-DVIVIT_KERNELS_CUDA_ARCHS={archs_macro}"],
            },
        )
    else:
        if _flag("VIVIT_KERNELS_SKIP_CUDA_BUILD"):
            cxx = cxx + ["-DVIVIT_KERNELS_CUDA_SKIPPED"]  # vivit_kernels._C.cuda_skipped_on_request == 1
        ext = CppExtension("vivit_kernels._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
