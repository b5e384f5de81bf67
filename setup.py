"""Build and install fastlab (distribution name ``fastlab-torch``, import name ``fastlab``).

The C++ extension ``fastlab._C`` is built from csrc/: the C++ sources always, the CUDA
sources (``*.cu``) too when the installed torch has CUDA and nvcc is found.
``FASTLAB_CUDA=1`` forces the CUDA build (failing loudly if it cannot), ``FASTLAB_CUDA=0``
skips it. ``kernels/`` is installed as the subpackage ``fastlab.kernels``.

Install with ``pip install --no-build-isolation -e .`` so the torch already installed is
the one the extension is built against; this file never asks pip for another torch.
"""
import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "fastlab", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def want_cuda():
    """Whether to compile the .cu sources: forced by FASTLAB_CUDA, else detected."""
    forced = os.environ.get("FASTLAB_CUDA")
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"FASTLAB_CUDA must be 0 or 1, got {forced!r}")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "1" and not available:
        raise RuntimeError(
            "FASTLAB_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return available if forced in (None, "") else forced == "1"


def extensions():
    """The fastlab._C extension, or nothing when csrc/ has no sources yet."""
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not cpp and not cu:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # the C++ standard is left to torch.utils.cpp_extension: it must match the one torch
    # was built with (C++20 from torch 2.10 on); a mismatch breaks exceptions across the ABI
    cxx = ["-O3"]
    if want_cuda():
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "fastlab._C",
            cpp + cu,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("FASTLAB_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        ext = CppExtension(
            "fastlab._C",
            cpp,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fastlab-torch",
    version=read_version(),
    description="Fast, numerically exact Triton/CUDA kernels and a lean trainer for "
    "small and medium transformer experiments",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["fastlab", "fastlab.*"]) + ["fastlab.kernels"],
    package_dir={"fastlab.kernels": "kernels"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "gpu": ["nvidia-ml-py"],
        "report": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "mpmath"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastlab-train=fastlab.train.__main__:main"]},
)
