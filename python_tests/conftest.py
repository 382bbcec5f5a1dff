import contextlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on the CPU in the interpreter (set before any kernel is decorated); with one,
# compiled on CUDA tensors (the tests marked `cuda` take DEVICE).
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The CPU's own flags (an oracle beside the library's detection, which the tests check).
_CPUINFO = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
CPU_AVX2, CPU_AVX512_BF16 = "avx2" in _CPUINFO, "avx512_bf16" in _CPUINFO


def engine_bf16():
    """Whether the small-map engine takes bfloat16 now: the CPU has AVX-512 BF16 and the cpu_isa setting
    (TLKERNELS_CPU_ISA) does not cap the hand-written paths below AVX-512."""
    from tlkernels import config
    return CPU_AVX512_BF16 and config.get("cpu_isa") in ("native", "avx512")


ENGINE_BF16 = engine_bf16()  # (at collection: the setting as the environment gives it)


def like_pretrained_bns(model, affine=True):
    """model with every BatchNorm's running statistics (and, with affine, its scale and shift) drawn away from
    their initial values, as a pre-trained net has them: a BN applied wrongly then shows. Returns model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)
    return model


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
                                       "waits for what it started (conftest.start_background)")
    config.addinivalue_line("markers", "cuda: has CUDA cases: runs on the GPU when one is visible (tools/gpu_check.sh "
                                       "runs `-m cuda`), on the CPU or in Triton's interpreter otherwise")


# ----------------------------------------------------------------------------- work started at collection
_BACKGROUND = {}  # key -> (process, stdout file, stderr file, work folder or None)


def start_background(key, argv, env=None, workdir=False):
    """Run `argv` from now on at the lowest CPU priority (once per key): work a test only waits for (a build, an
    ahead-of-time compile) runs beside the rest of the suite, on the core the suite leaves idle while it waits on
    subprocesses and files. workdir=True: a fresh temporary folder is passed as the last argument."""
    if key in _BACKGROUND:
        return
    folder = tempfile.mkdtemp(prefix=f"tlkernels-{key}-") if workdir else None
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv + ([folder] if folder else []), stdout=out, stderr=err, text=True, env=env,
                            preexec_fn=lambda: os.nice(19))
    _BACKGROUND[key] = (proc, out, err, folder)


@contextlib.contextmanager
def background_result(key, timeout):
    """(returncode, stdout, stderr, work folder) of the command started under `key`, once it has finished; the
    work folder is removed after the block."""
    proc, out, err, folder = _BACKGROUND.pop(key)
    try:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out.seek(0)
        err.seek(0)
        yield proc.returncode, out.read(), err.read(), folder and pathlib.Path(folder)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # (after -k / -m deselection: only selected tests start their work)
def pytest_collection_modifyitems(config, items):
    """A test marked `background(start)` has start() called when it is selected (start calls start_background)
    and runs last, when its work has had the whole suite's time; the test waits for the result."""
    started = set()
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None and marker.args[0] not in started:
            started.add(marker.args[0])
            marker.args[0]()
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # (a stable sort)


def pytest_sessionfinish(session, exitstatus):
    for proc, _, _, folder in _BACKGROUND.values():  # (started for tests that did not run: an interrupted session)
        proc.kill()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- gloo ranks in spawned processes
def _gloo_rank(rank, world, init, fn, args):
    import faulthandler
    import sys
    import torch.distributed as dist
    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints every thread's Python stack
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # (no rank tears its connections down while another still uses them)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # The rank's work is done and its results are on disk for the parent to check; the interpreter's own
    # teardown (static destructors beside gloo's and the intra-op pool's threads) is not under test.
    os._exit(0)


def gloo_ranks(fn, world, init, *args):
    """fn(rank, world, *args) in `world` spawned processes joined by one gloo process group (rendezvous in the file
    `init`); a rank that raises or dies fails the calling test with its traceback."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_rank, args=(world, init, fn, args), nprocs=world, join=True)
