"""CMakeLists.txt builds the op library against libtorch and its C++ test passes (so it cannot rot).

The build (configure, compile, ctest) runs in one subprocess at the lowest CPU priority, started when the suite
is collected (its `background` marker): it compiles on the core the rest of the suite leaves idle
while that waits on subprocesses and files, and the test reads its result. It compiles without optimisation:
the test checks that CMake builds the library from the one source list and that the C++ tests pass; the
optimised library every other test runs is setup.py's."""
import os
import shutil
import subprocess
import sys

import pytest
import torch.utils
from conftest import background_result, start_background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(build):
    """The commands of the build and its environment, finding the CUDA toolkit as setup.py does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tlk_setup_probe", os.path.join(ROOT, "tools", "find_cuda.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cuda = probe.find_cuda_home()
    env = dict(os.environ)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", ROOT, "-B", build, *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=None", "-DCMAKE_CXX_FLAGS=-O0"]
    if cuda:
        # torch's CMake config looks for CUDA when torch is a CUDA build: point it at the real toolkit; without a
        # visible GPU it would try to detect one, so name a target (this build compiles no CUDA source).
        env["CUDA_HOME"] = cuda
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        configure += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda}", f"-DCUDAToolkit_ROOT={cuda}",
                      f"-DCMAKE_CUDA_COMPILER={cuda}/bin/nvcc"]
    steps = [("configure", configure), ("build", ["cmake", "--build", build, "-j2"]),
             ("ctest", ["ctest", "--test-dir", build, "--output-on-failure"])]
    return steps, env


def _build(build):
    """Run the steps in order; the first that fails ends the process with its name and output on stderr."""
    steps, env = _steps(build)
    for name, cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"{name} failed ({r.returncode}):\n{r.stdout[-4000:]}{r.stderr[-4000:]}")


def start_in_background():
    """Start the build at the lowest CPU priority (at collection: the test's `background` marker)."""
    if shutil.which("cmake") is not None:
        start_background("cmake", [sys.executable, os.path.abspath(__file__)], workdir=True)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.background.with_args(start_in_background)  # (with_args: the argument is a function)
def test_cmake_build_and_ctest():
    start_in_background()  # (run alone, the test starts it now)
    with background_result("cmake", timeout=1800) as (returncode, _, stderr, build):
        assert returncode == 0, stderr[-8000:]  # (configure, build and ctest each succeeded)
        # one source list (csrc/sources.txt): CMake built exactly setup.py's sources, less the Python module's
        import importlib.util
        spec = importlib.util.spec_from_file_location("tlk_sources", os.path.join(ROOT, "tools", "sources.py"))
        sources = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sources)
        built = (build / "tlkernels_sources.txt").read_text().split(";")
        assert built == sources.extension_sources(os.path.join(ROOT, "csrc"), cuda=False, python=False)
        assert any("/ops/autocast/" in s for s in built)


def test_cuda_arch_list_follows_the_visible_gpus():
    import sys
    import types
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from find_cuda import default_arch_list

    def fake(caps):
        cuda = types.SimpleNamespace(is_available=lambda: bool(caps), device_count=lambda: len(caps),
                                     get_device_capability=lambda i: caps[i])
        return types.SimpleNamespace(cuda=cuda)
    assert default_arch_list(fake([])) == "8.0;9.0+PTX"  # no GPU: PTX runs on GPUs newer than sm90 too
    assert default_arch_list(fake([(7, 5)])) == "7.5+PTX"  # a T4 (PTX: the build runs on newer GPUs too)
    assert default_arch_list(fake([(9, 0), (8, 0), (9, 0)])) == "8.0;9.0+PTX"
    assert default_arch_list(fake([(8, 0)])) == "8.0+PTX"  # built on an A100, runs on an H100


def test_cuda_kernels_take_floating_scalars_in_the_op_math_type():
    """A kernel templated on its tensors' dtype takes lr, betas, eps and coefficients as at::opmath_type<scalar_t>
    (double for float64 tensors): a `float` parameter rounds 1 - 0.999 by 1.3e-5 relative, beyond float64's
    budget. No GPU runs here, so the signatures are read; selfcheck's float64 optimizer and L2-SP rows measure it
    on a GPU (tools/gpu_check.sh)."""
    import re
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "ops", "cuda")
    found = 0
    for name in sorted(os.listdir(root)):
        src = open(os.path.join(root, name)).read()
        for m in re.finditer(r"template <typename scalar_t>\s*__global__ void (\w+)\(([^)]*)\)", src):
            found += 1
            floats = [p.strip() for p in m.group(2).split(",") if re.match(r"\s*(const\s+)?float\s+\w+\s*$", p)]
            assert not floats, f"{name}: {m.group(1)} takes {floats} as float"
            # (and the Meta coefficients the kernels read)
        if "struct Meta" in src:
            assert not re.search(r"\bfloat coeff\[", src), name
    assert found >= 3


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_precompiled_header_is_built_once_used_and_rebuilt_when_it_changes(tmp_path):
    """tools/pch.py: the header is compiled with the flags torch's ninja call receives, each source gets it
    through -include (GCC reports an unusable .gch under -Winvalid-pch: none here), an unchanged header is not
    compiled again and a changed one is."""
    import sys
    import types
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import pch
    header = tmp_path / "pch.h"
    header.write_text("constexpr int kAnswer = 42;\n#include <vector>\n")
    calls = []

    def write_and_compile(sources, objects, cflags, post_cflags, build_directory, verbose=False):
        calls.append(post_cflags)
        for src, obj in zip(sources, objects):  # what the ninja rule runs: $cxx $cflags -c $in -o $out $post_cflags
            r = subprocess.run(" ".join(["c++"] + cflags + ["-c", src, "-o", obj] + post_cflags), shell=True,
                               capture_output=True, text=True)
            assert r.returncode == 0 and "pch" not in r.stderr, r.stderr

    ext = types.SimpleNamespace(_write_ninja_file_and_compile_objects=write_and_compile, get_cxx_compiler=lambda: "c++")
    if not pch.use_precompiled_header(ext, str(header)):
        pytest.skip("the C++ compiler is not GCC")
    src = tmp_path / "a.cpp"
    src.write_text("std::vector<int> v{kAnswer};\n")  # compiles only with the header included
    build = tmp_path / "build"
    run = lambda: ext._write_ninja_file_and_compile_objects([str(src)], [str(tmp_path / "a.o")], ["-O1"],  # noqa: E731
                                                            ["-std=c++17"], str(build))
    run()
    gch = build / "pch" / "tlkernels_pch.h.gch"
    assert gch.exists() and "-include" in calls[-1]
    first = gch.stat().st_mtime_ns
    run()
    assert gch.stat().st_mtime_ns == first
    header.write_text("constexpr int kAnswer = 43;\n#include <vector>\n")
    run()
    assert gch.stat().st_mtime_ns != first


if __name__ == "__main__":  # the background build (start_in_background)
    _build(sys.argv[1])
