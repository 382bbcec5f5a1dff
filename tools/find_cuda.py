"""Find a real CUDA toolkit root (bin/nvcc + include/cuda_runtime.h).

torch derives CUDA_HOME from `which nvcc`; where nvcc is a wrapper script outside the toolkit
(e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc) that guess is wrong and linking
fails. Used by setup.py and by the CMake build test.
"""
import glob
import os
import shutil


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isdir(
        os.path.join(path, "include")
    ) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """Return a CUDA toolkit root that really contains bin/nvcc and include/, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Resolve symlinks; a wrapper script is not a toolkit, so read the exec line it forwards to.
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "r", errors="ignore") as fh:
                for tok in fh.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def default_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST when the user set none: the visible GPUs' architectures, the highest with PTX (a build
    made on an A100 then runs on an H100: the driver compiles the PTX), else Ampere + Hopper with PTX, which the
    driver compiles for any newer GPU (older GPUs, T4 or V100, need TORCH_CUDA_ARCH_LIST)."""
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    except RuntimeError:  # a driver problem: build for the defaults
        pass
    return "8.0;9.0+PTX"
