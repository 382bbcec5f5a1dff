"""The GPU paths on a GPU: what the CPU can only emulate (tools/gpu_check.sh runs these with `-m cuda`).

Sync-freedom with torch.cuda.set_sync_debug_mode (a read of a device value raises), float64 optimizer steps at
float64's budget (the kernels' scalars in the op-math type), descriptors equal to the CPU's under TF32 defaults,
kNN neighbours under set_float32_matmul_precision("high") with a host database (pinned, double-buffered chunks),
the GPU generator in last.pt. Skipped without a GPU; the CPU-side emulations are in test_host_syncs.py,
test_select.py, test_cmake_build.py and test_train_reruns.py.
"""
import contextlib
import warnings

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@contextlib.contextmanager
def sync_debug(mode):
    was = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(was)


def _case(gate_shape, requires_grad=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    t = [torch.randn(8, 16, 14, 14, generator=gen), torch.randn(32, 16, 3, 3, generator=gen) * 0.1,
         torch.randn(32, 16, 3, 3, generator=gen) * 0.1, torch.rand(gate_shape, generator=gen)]
    return [x.to("cuda", dtype).requires_grad_(requires_grad) for x in t]


@pytest.mark.parametrize("gate_shape,hard", [((8, 32), True), ((8, 32), False), ((8,), False)])
def test_gated_conv_training_step_never_syncs(gate_shape, hard):
    from tlkernels.ops import gated_conv2d
    x, wp, wf, g = _case(gate_shape, requires_grad=True)
    gated_conv2d(x, wp, wf, g, padding=1, hard=hard)  # (warm-up: first-call allocations)
    torch.cuda.synchronize()
    with sync_debug("error"):
        y = gated_conv2d(x, wp, wf, g, padding=1, hard=hard)
        torch.autograd.grad(y.square().sum(), (x, wp, wf, g))


def test_routed_gates_sync_once_per_call():
    from tlkernels.ops import gated_conv2d
    x, wp, wf, g = _case((8,))
    g = (g > 0.5).float()
    gated_conv2d(x, wp, wf, g, padding=1, hard=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w, sync_debug("warn"):
        warnings.simplefilter("always")
        gated_conv2d(x, wp, wf, g, padding=1, hard=True)
    assert sum("synchroniz" in str(m.message) for m in w) == 1, [str(m.message) for m in w]


def test_adafilter_fused_eval_and_cross_entropy_never_sync():
    import torchvision
    from tlkernels.methods import AdaFilter
    from tlkernels.ops import cross_entropy
    m = AdaFilter(torchvision.models.resnet18(num_classes=10), hidden_size=16).cuda().eval()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    logits = torch.randn(64, 10, device="cuda", requires_grad=True)
    y = torch.randint(0, 10, (64,), device="cuda")
    with torch.no_grad():
        m(x)
    torch.cuda.synchronize()
    with sync_debug("error"):
        with torch.no_grad():
            m(x)
        cross_entropy(logits, y).backward()


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_float64_fused_steps_at_float64s_budget(name):
    """betas 0.999 and lr 0.01 as doubles: float scalars would be off by ~1e-6 relative after a few steps."""
    from tlkernels.nn import L2SP
    from tlkernels import optim
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 32).double().cuda()
    b = torch.nn.Linear(64, 32).double().cuda()
    b.load_state_dict(a.state_dict())
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.0)
    oa = getattr(optim, name)(a.parameters(), l2sp=L2SP(a, alpha=0.1, beta=0.0), **kw)
    ob = getattr(torch.optim, name)(b.parameters(), **kw)
    w0 = [p.detach().clone() for p in b.parameters()]
    x = torch.randn(16, 64, device="cuda", dtype=torch.float64)
    for _ in range(5):
        oa.zero_grad()
        ob.zero_grad()
        a(x).square().mean().backward()
        (b(x).square().mean() + sum(0.05 * (p - p0).square().sum() for p, p0 in zip(b.parameters(), w0)
                                    if p.dim() > 1)).backward()
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_histograms_on_the_gpu_equal_the_cpus_under_tf32_defaults():
    from tlkernels.filters import gabor_bank
    from tlkernels.ops import filterbank_histogram
    bank = gabor_bank(scales=1, orientations=4, size=7, in_channels=3)
    s = bank.stages[0]
    imgs = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    e = torch.linspace(-1.5, 1.5, 17).repeat(s["weight"].shape[0], 1)
    cpu = filterbank_histogram(imgs, s["weight"], e, 2, s["padding"])
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        gpu = filterbank_histogram(imgs.cuda(), s["weight"].cuda(), e.cuda(), 2, s["padding"])
    assert torch.equal(gpu.cpu(), cpu)


def test_knn_under_high_matmul_precision_with_a_host_database():
    from tlkernels.ops import knn_search, knn_search_reference
    gen = torch.Generator().manual_seed(4)
    q = torch.softmax(torch.randn(20, 64, generator=gen), 1)
    db = torch.softmax(torch.randn(5000, 64, generator=gen), 1)
    db[100] = db[7]  # an exact tie: the lower index first
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        d, i = knn_search(q.cuda(), db.numpy(), 10, "skl", chunk_size=700)
    finally:
        torch.set_float32_matmul_precision(was)
    dr, ir = knn_search_reference(q, db, 10, "skl")
    assert torch.equal(i.cpu(), ir)


def test_checkpoint_rng_restores_the_gpu_generator():
    from tlkernels.train import loop
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(3)
    state = loop.rng_states(dev, 1)
    a = torch.rand(5, device=dev)
    torch.rand(100, device=dev)
    loop.restore_rng(state, dev, 0)
    assert torch.equal(torch.rand(5, device=dev), a)
