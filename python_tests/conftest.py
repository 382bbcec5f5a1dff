import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on the CPU in the interpreter (set before any kernel is decorated); with one,
# compiled on CUDA tensors (the tests marked `cuda` take DEVICE).
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One --cache_dir for the demo runs of the whole test run: the demo's pre-trained backbone, descriptors and
    measured choices are computed once (runs that must start cold make their own)."""
    return str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture
def settings():
    """settings(gated_conv="routed", ...): tlkernels.config changed for one test, restored after it."""
    from tlkernels import config
    saved = {s.name: config.get(s.name) for s in config.SETTINGS}
    yield config.set
    config.set(**saved)


def pytest_configure(config):
    config.addinivalue_line("markers", "background(start): start() runs when the suite is collected, the test "
                                       "waits for what it started (conftest.pytest_collection_modifyitems)")
    config.addinivalue_line("markers", "cuda: has CUDA cases: runs on the GPU when one is visible (tools/gpu_check.sh "
                                       "runs `-m cuda`), on the CPU or in Triton's interpreter otherwise")



@pytest.hookimpl(trylast=True)  # (after -k / -m deselection: only selected tests start their work)
def pytest_collection_modifyitems(config, items):
    """A test marked `background(start)` calls start() when it is selected, so that its work (a build in a
    low-priority subprocess) runs beside the rest of the suite; the test waits for the result."""
    started = set()
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None and marker.args[0] not in started:
            started.add(marker.args[0])
            marker.args[0]()
