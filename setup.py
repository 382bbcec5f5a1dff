"""Build tlkernels and its compiled op library `tlkernels._C`.

C++ CPU kernels are always built. CUDA sources are added when a CUDA toolkit is found (or
TLKERNELS_FORCE_CUDA=1) and skipped with TLKERNELS_NO_CUDA=1. We look for the toolkit ourselves:
torch derives CUDA_HOME from `which nvcc`, and on machines where nvcc is a wrapper script outside
the toolkit (e.g. /usr/local/bin/nvcc) that guess is wrong and linking fails.
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


sys.path.insert(0, os.path.join(ROOT, "tools"))
from find_cuda import default_arch_list, find_cuda_home  # noqa: E402
from sources import extension_sources  # noqa: E402
from pch import use_precompiled_header  # noqa: E402


def decide_cuda():
    if os.environ.get("TLKERNELS_NO_CUDA", "0") == "1":
        return None, "TLKERNELS_NO_CUDA=1"
    home = find_cuda_home()
    force = os.environ.get("TLKERNELS_FORCE_CUDA", "0") == "1"
    if home is None:
        if force:
            sys.exit("tlkernels setup: TLKERNELS_FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc + include/) "
                     "was found; set CUDA_HOME to the toolkit root")
        return None, "no CUDA toolkit found"
    return home, "toolkit at " + home + (" (forced)" if force else "")


CUDA_HOME, REASON = decide_cuda()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402


if CUDA_HOME:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(torch))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

# The oldest CPython the extension supports: the Py_LIMITED_API value torch compiles it with
# (py_limited_api=True), which python_requires and the wheel's abi3 tag then state.
_hex = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
MIN_PYTHON = (_hex >> 24, (_hex >> 16) & 0xFF)

# csrc/pch.h parsed once per build rather than once per source (tools/pch.py; GCC only)
use_precompiled_header(cpp_extension, os.path.join(ROOT, "csrc", "pch.h"), stamp_extra=torch.__version__)

if CUDA_HOME and torch.version.cuda is None:
    CUDA_HOME, REASON = None, "installed torch is a CPU-only build"


def get_extensions():
    sources = extension_sources("csrc", cuda=bool(CUDA_HOME))
    # (py_limited_api=True makes torch define Py_LIMITED_API itself.) OpenMP: at::parallel_for is a header
    # template that runs serially unless the including library is itself compiled with OpenMP; libgomp
    # is the one torch already loads (same soname), so no second runtime appears.
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if CUDA_HOME:
        ext = CUDAExtension("tlkernels._C", sources, include_dirs=include_dirs,
                            define_macros=[("TLKERNELS_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                            extra_link_args=link, py_limited_api=True)
    else:
        ext = CppExtension("tlkernels._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True)
    print(f"tlkernels setup: CUDA kernels {'ON' if CUDA_HOME else 'OFF'} ({REASON}); "
          f"{len(sources)} source files", flush=True)
    return [ext]


setup(
    name="tlkernels",
    version="0.1.0",
    description="Fused CPU/Triton/CUDA kernels for adaptive fine-tuning of CNNs",
    packages=find_packages(include=["tlkernels", "tlkernels.*"]),
    package_data={"tlkernels.triton": ["fitting_configs.json"],  # the autotune configs that fit (data)
                  "tlkernels.train": ["configs/*.json"]},  # the trainer's shipped recipes (--config NAME)
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    python_requires=f">={MIN_PYTHON[0]}.{MIN_PYTHON[1]}",
    # (requirements.txt pins the tested torch 2.14.1, the default install; a build from source takes the torch
    # already installed from 2.11 on, e.g. a GPU machine's own CUDA build: tools/gpu_check.sh)
    install_requires=["torch>=2.11", "torchvision>=0.26", "numpy", "threadpoolctl", "tqdm"],
    # the trainer's plots and demo data sets, and its --tensorboard log: pip install "tlkernels[train]"
    extras_require={"train": ["matplotlib", "scikit-learn", "mlxtend", "pillow", "tensorboard"],
                    "timm": ["timm", "safetensors"]},
    entry_points={"console_scripts": ["tlkernels-train=tlkernels.train:main"]},
    # one stable-ABI wheel for every CPython from MIN_PYTHON on: the tag names the limited API it was built with
    options={"bdist_wheel": {"py_limited_api": f"cp{MIN_PYTHON[0]}{MIN_PYTHON[1]}"}},
)
