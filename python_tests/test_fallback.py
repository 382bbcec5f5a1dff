"""`import tlkernels` survives a missing compiled library: a warning says what to do, and every front end calls
its pure-PyTorch reference (no op is defined from Python then)."""
import subprocess
import sys

import pytest

CODE = r"""
import sys, warnings
sys.modules["tlkernels._C"] = None  # as if the extension had not been built
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import tlkernels
assert not tlkernels.HAS_C
assert any("tlkernels._C could not be loaded" in str(x.message) and "pip install" in str(x.message) for x in w)
assert "MISSING" in tlkernels.extension_status()
import torch, torch.nn.functional as F
torch.manual_seed(0)
x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
wp, wf = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64)
g = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
y = tlkernels.ops.gated_conv2d(x, wp, wf, g, padding=1)
ref = tlkernels.ops.gated_conv2d_reference(x, wp, wf, g, padding=1)
assert torch.allclose(y, ref)
gx, gg = torch.autograd.grad(y.sum(), [x, g])
rx, rg = torch.autograd.grad(ref.sum(), [x, g])
assert torch.allclose(gx, rx) and torch.allclose(gg, rg)
logits = torch.randn(5, 7, requires_grad=True); labels = torch.tensor([0, 6, -100, 3, 2])
assert torch.allclose(tlkernels.ops.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
p = [torch.randn(3, requires_grad=True)]; r = [torch.zeros(3)]
v = tlkernels.ops.l2sp_penalty(p, r, 0.2); v.backward()
assert torch.allclose(p[0].grad, 0.2 * p[0].detach())
xt, xs = torch.randn(5, 7, requires_grad=True), torch.randn(4, 9, requires_grad=True)
yt, ys = torch.tensor([0, 1, -100, 3, 6]), torch.tensor([8, 0, 1, 2])
j = tlkernels.ops.joint_cross_entropy(xt, yt, xs, ys, source_weight=0.3, target_weight=0.7)
jr = 0.7 * F.cross_entropy(xt, yt) + 0.3 * F.cross_entropy(xs, ys)
assert torch.allclose(j, jr)
assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(torch.autograd.grad(3 * j, [xt, xs]),
                                                          torch.autograd.grad(3 * jr, [xt, xs])))
h = tlkernels.ops.filterbank_histogram(torch.rand(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.linspace(-1, 1, 6).repeat(4, 1))
assert torch.allclose(h.sum(-1), torch.ones(2, 4))
q = torch.rand(3, 5, dtype=torch.float64); db = torch.rand(20, 5, dtype=torch.float64)
assert torch.equal(tlkernels.ops.knn_search(q, db, 4)[1], tlkernels.ops.knn_search_reference(q, db, 4)[1])
m = torch.nn.Linear(3, 2); opt = tlkernels.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
m(torch.randn(4, 3)).sum().backward(); opt.step()
print("FALLBACK OK")
"""


def test_import_and_ops_without_compiled_library():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FALLBACK OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_cpu_kernels_use_all_intra_op_threads():
    """at::parallel_for is a header template: a library built without OpenMP runs it on one thread and
    nothing else notices (results are identical, only slower). This failed before setup.py passed -fopenmp."""
    import torch
    import tlkernels
    if not tlkernels.HAS_C:
        raise AssertionError("tlkernels._C is not built; " + tlkernels.extension_status())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.tlkernels._intra_op_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.tlkernels._intra_op_threads() == 1
    finally:
        torch.set_num_threads(before)


# Internal CPU-only helpers of the CPU kernels' Python drivers; on CUDA the drivers use torch expressions.
CPU_ONLY = {"tlkernels::knn_select_chunk", "tlkernels::knn_expand_skl_", "tlkernels::_intra_op_threads"}


def test_every_op_has_a_cpu_and_a_cuda_kernel():
    """A CUDA tensor must never hit "no kernel for CUDA": each public op has the compiled CUDA kernel, or a
    Triton / reference kernel registered from Python. Fails when an op gains a C++ CPU kernel but no GPU path.
    (Without the compiled library no op exists: the front ends call the references.)"""
    import torch

    import tlkernels  # noqa: F401  (registers the Python kernels)
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tlkernels::"))
    assert "tlkernels::gated_conv2d" in names and "tlkernels::filterbank_histogram" in names, names
    missing = [f"{n} on {key}" for n in names if n not in CPU_ONLY for key in ("CPU", "CUDA")
               if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(n, key)]
    assert not missing, "no kernel for " + ", ".join(missing)


def test_no_python_schema_for_a_compiled_op():
    """One home: the compiled library defines its ops; Python defines only its own (the Triton ops, their schema
    derived from the compiled op's) and writes no schema string of a compiled op."""
    import pathlib
    import re

    import torch

    import tlkernels
    from tlkernels.ops._registry import OPS
    assert tlkernels.HAS_C, tlkernels.extension_status()
    compiled = {n for n, i in OPS.items() if i.owner == "c++"}
    assert len(compiled) >= 10 and {n for n, i in OPS.items() if i.owner == "python"} == {
        "gated_conv2d_forward_triton", "gated_conv2d_backward_triton"}, sorted(OPS)
    root = pathlib.Path(tlkernels.__file__).parent
    schema = re.compile(r"\b(%s)\((Tensor|Tensor\(a!\)|Tensor\?)(\[\])? \w+[,)]" % "|".join(sorted(compiled)))
    found = [f"{p.relative_to(root)}: {m.group(0)}" for p in root.rglob("*.py") for m in schema.finditer(p.read_text())]
    assert not found, found
    # C++: every dispatcher handle takes its signature from the op's one declaration (csrc/ops/<op>.h)
    csrc = root.parent / "csrc"
    spelled = [f"{p.relative_to(csrc)}: {m.group(0)}" for p in csrc.rglob("*.c*")
               for m in re.finditer(r"\.typed<(?!decltype\(|F>\(\))[^>]*", p.read_text())]
    assert not spelled, spelled
    for name in ("gated_conv2d_forward", "gated_conv2d_backward"):  # the Triton ops' schemas are the compiled ops'
        ours, theirs = (getattr(torch.ops.tlkernels, n).default._schema for n in (name + "_triton", name))
        assert str(ours).replace(name + "_triton", name, 1) == str(theirs), name




@pytest.mark.parametrize("source,messages", [
    ("gated_conv2d.cpp", ["must have shape (N,) or (N, C_out)", "must be divisible by groups",
                          "is smaller than the dilated kernel", "must have the shape of weight_pre",
                          "at least one output filter", "must have C_in = "]),
    ("l2sp_checks.h", ["must have one entry per param (", "needs at least one tensor in params or",
                       " must have the dtype of ", "; it is updated in place), got strides",
                       "share memory (the same tensor listed twice?)"]),
    ("histogram.cpp", ["must have at least one channel", "are smaller than the filters",
                       "edges must have shape (F, bins + 1)", "strictly increasing along each row",
                       "is a meta tensor: binning needs"]),
    ("cross_entropy.cpp", [" (soft labels) must have the shape of ", " must be int64 labels or a float ",
                           " is out of range [0, ", " has a label out of range [0, "]),
])
def test_op_checks_live_in_cpp_only(source, messages):
    """One home: the argument checks of gated_conv2d, the L2-SP ops, filterbank_histogram and the cross-entropy
    ops are the compiled library's (csrc/ops/); Python converts arguments (tensor, list and int types, shapes
    other than (N, C) to rows) and writes none of their messages."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    cpp = (root / "csrc" / "ops" / source).read_text()
    assert all(m in cpp for m in messages)
    found = [f"{p.relative_to(root)}: {m}" for p in (root / "tlkernels").rglob("*.py") for m in messages
             if m in p.read_text()]
    assert not found, found

OUTPUT_SIZE_FORMULA = r"\)\s*//?\s*stride\w*(\[\w+\])?\s*\+\s*1\b"


def test_no_hand_written_convolution_output_size():
    """One home: a convolution's output size is PyTorch's (at::native::conv_output_size in C++, F.conv2d's shape
    function through ops/_utils.conv_output_hw in Python); no source spells `(... ) / stride + 1`."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    files = [p for d in ("tlkernels", "csrc") for p in (root / d).rglob("*") if p.suffix in (".py", ".h", ".cpp", ".cu")]
    found = [f"{p.relative_to(root)}: {m.group(0)}" for p in files
             for m in re.finditer(OUTPUT_SIZE_FORMULA, p.read_text())]
    assert not found, found
    # the pattern finds the formula as it was written before (so that this test can fail)
    old = "(input.shape[d + 2] + 2 * padding[d] - dilation[d] * (weight.shape[d + 2] - 1) - 1) // stride[d] + 1"
    assert re.search(OUTPUT_SIZE_FORMULA, old) and re.search(OUTPUT_SIZE_FORMULA, "(in + 2 * p - k) / stride + 1")


def test_every_op_is_registered_with_all_its_pieces():
    """Every tlkernels op the dispatcher knows went through register_op (schema, CUDA path, fake, autograd,
    mutation stated), and what it states holds in the dispatcher."""
    import torch

    import tlkernels  # noqa: F401
    from tlkernels.ops._registry import OPS
    # (internal, no tensors)
    diagnostics = {"_gated_conv2d_last_strategies", "_filterbank_histogram_last_path", "_intra_op_threads",
                   "_measured_choices", "_set_measured_choices", "_measured_choice_names", "_emulate_cuda",
                   "_config", "_set_config", "_config_choices", "_measured_choice_register_names",
                   "_measured_choice_recorded", "_measured_choice_record", "_measured_choice_rounds"}
    # (the CPU engine's registry of weights whose packed panels it keeps: no output, CPU only)
    diagnostics.add("_gated_conv2d_keep_packed")
    # (the ops' argument checks alone, for the front ends and references: one composite kernel each, no output)
    diagnostics |= {"_gated_conv2d_check", "_l2sp_check", "_filterbank_histogram_check", "_cross_entropy_check"}
    defined = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tlkernels::")}
    assert defined - diagnostics - set(OPS) == set(), "registered without register_op"
    for name, info in OPS.items():
        q = f"tlkernels::{name}"
        assert info.fake and torch._library.simple_registry.singleton.find(q).fake_impl.kernel is not None, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "CUDA") or info.cuda in ("one kernel", "cpu only"), name
        if info.autograd != "none":
            assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "Autograd"), name
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in
                     getattr(torch.ops.tlkernels, name).default._schema.arguments)
        assert writes == info.mutates, name
        if writes:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "ADInplaceOrView"), name


MEASURED_RULE = r"<\s*\w*clearly_faster\s*\*|\*\s*best\[\w+\]"


def test_measured_choice_rule_and_table_live_in_cpp_only():
    """One home: the measured choice's table of picks, timing rounds and rule (clearly faster, never slower than
    the naive-equivalent candidate) are csrc/ops/measured_choice.h's; the Python ops' measured choice
    (tlkernels/_timing.py) times its callables and hands the times over."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    assert re.search(MEASURED_RULE, (root / "csrc" / "ops" / "measured_choice.h").read_text())
    found = [f"{p.relative_to(root)}: {m.group(0)}" for p in (root / "tlkernels").rglob("*.py")
             for m in re.finditer(MEASURED_RULE, p.read_text())]
    assert not found, found
    assert re.search(MEASURED_RULE, "        if b < clearly_faster * best[pick]:")  # (the Python rule as it was)
    timing = (root / "tlkernels" / "_timing.py").read_text()
    assert "_CHOICES" not in timing and "range(4)" not in timing  # no second table, no second round count


def test_version_counters_of_written_arguments_are_bumped_in_cpp_only():
    """One home: the ADInplaceOrView kernel of every op that writes its arguments is the compiled library's
    (csrc/ops/inplace_versions.h, registered beside each schema); Python registers none on private APIs."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    found = [str(p.relative_to(root)) for p in (root / "tlkernels").rglob("*.py") if "ADInplaceOrView" in p.read_text()]
    assert not found, found  # (test_every_op_is_registered_with_all_its_pieces: every writer has the kernel)
