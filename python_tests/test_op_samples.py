"""Every registered op on its own samples (OPS[name].samples, beside its registration): the kernel against the
op's reference (outputs and every argument it writes), torch.library.opcheck (schema, fake kernel, autograd
registration, AOT dispatch), and gradcheck for the ops with a derivative."""
import pytest
import torch

import tlkernels  # noqa: F401  (registers the ops)
from tlkernels.ops._registry import OPS, op

CASES = [(name, i) for name, info in OPS.items() for i in range(len(info.samples()))]
IDS = [f"{name}-{i}" for name, i in CASES]


def _detached(args):
    """A fresh copy of the arguments, every tensor (inside lists too) detached and cloned."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return a.detach().clone()
        if isinstance(a, (list, tuple)):
            return type(a)(one(x) for x in a)
        return a
    return [one(a) for a in args]


def _flat_tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat_tensors(v)]
    return []


def _tolerance(ts):
    return dict(rtol=1e-9, atol=1e-9) if all(t.dtype == torch.float64 for t in ts if t.is_floating_point()) else {}


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_opcheck(name, i):
    torch.library.opcheck(op(name), OPS[name].samples()[i])


@pytest.mark.parametrize("name,i", [c for c in CASES if OPS[c[0]].reference is not None],
                         ids=[f"{n}-{i}" for n, i in CASES if OPS[n].reference is not None])
def test_matches_the_reference(name, i):
    sample = OPS[name].samples()[i]
    ours, theirs = _detached(sample), _detached(sample)
    got, want = op(name)(*ours), OPS[name].reference(*theirs)
    got_t, want_t = _flat_tensors(got) + _flat_tensors(ours), _flat_tensors(want) + _flat_tensors(theirs)
    assert len(got_t) == len(want_t)
    for k, (a, b) in enumerate(zip(got_t, want_t)):
        if a.numel() == 0 and b.numel() == 0:  # (an output the kernel leaves empty where the reference may too)
            continue
        torch.testing.assert_close(a, b.to(a.dtype), **_tolerance([a]), msg=lambda m: f"{name} tensor {k}: {m}")


DIFFERENTIABLE = [(n, i) for n, i in CASES if OPS[n].autograd != "none"
                  and any(t.requires_grad for t in _flat_tensors(OPS[n].samples()[i]))]


@pytest.mark.parametrize("name,i", DIFFERENTIABLE, ids=[f"{n}-{i}" for n, i in DIFFERENTIABLE])
def test_gradcheck(name, i):
    sample = OPS[name].samples()[i]
    leaves = [t for t in _flat_tensors(sample) if t.requires_grad]

    def rebuild(a, it):
        if isinstance(a, torch.Tensor):
            return next(it) if a.requires_grad else a
        if isinstance(a, (list, tuple)):
            return type(a)(rebuild(x, it) for x in a)
        return a

    def f(*xs):
        it = iter(xs)
        return op(name)(*[rebuild(a, it) for a in sample])

    assert torch.autograd.gradcheck(f, tuple(leaves), fast_mode=True)


def test_every_op_has_samples_that_reach_its_argument_kinds():
    """Each op has at least one sample; the differentiable ones have a sample that asks for a gradient."""
    for name, info in OPS.items():
        samples = info.samples()
        assert samples, name
        if info.autograd != "none":
            assert any(t.requires_grad for s in samples for t in _flat_tensors(s)), name
