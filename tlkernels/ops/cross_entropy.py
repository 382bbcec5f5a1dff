"""Fused cross-entropy (loss and gradient in one row pass) and the joint target/source objective
L = target_weight * CE(target head) + source_weight * CE(source head).

Hard labels follow F.cross_entropy (ignore_index; the weighted mean divides by the summed weight of the
rows that count; an all-ignored batch gives nan loss and zero gradients). Per-sample weights generalise
F.cross_entropy's class weights: `sample_weight = class_weight[labels]` reproduces them exactly. Soft
labels (a probability matrix) serve distillation toward a frozen source model; no gradient flows to them.
"""
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from tlkernels._extension import use_reference
from tlkernels.ops._registry import ensure_op, op, register_gpu
from tlkernels.ops._utils import check_tensor, fail

SCHEMA = ("cross_entropy(Tensor logits, Tensor target, Tensor? sample_weight, int ignore_index, int reduction, "
          "float scale, bool compute_grad) -> (Tensor, Tensor)")
JOINT_SCHEMA = ("joint_cross_entropy(Tensor target_logits, Tensor target_labels, Tensor? target_sample_weight, "
                "Tensor source_logits, Tensor source_labels, Tensor? source_sample_weight, int ignore_index, "
                "int reduction, float target_weight, float source_weight, bool compute_grad) -> (Tensor, Tensor, Tensor)")
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def cross_entropy_reference(logits, target, sample_weight=None, ignore_index=-100, reduction="mean", scale=1.0):
    """Plain PyTorch (differentiable), the oracle."""
    if target.is_floating_point():
        rows = -(target * F.log_softmax(logits, dim=1)).sum(1)
        counted = torch.ones_like(rows)
    else:
        rows = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
        counted = (target != ignore_index).to(rows.dtype)
    w = counted if sample_weight is None else counted * sample_weight.to(rows.dtype)
    rows = rows * w
    if reduction == "none":
        return rows * scale
    if reduction == "sum":
        return rows.sum() * scale
    return rows.sum() / w.sum() * scale


def _ref_impl(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad):
    """Reference kernel of the op (used without the compiled library). Analytic gradient: an op kernel runs
    below the autograd dispatch keys, where torch.autograd cannot record."""
    red = {v: k for k, v in REDUCTIONS.items()}[reduction]
    with torch.no_grad():
        loss = cross_entropy_reference(logits, target, sample_weight, ignore_index, red, scale)
        if not compute_grad:
            return loss, logits.new_empty(0)
        p = torch.softmax(logits.double(), dim=1)
        if target.is_floating_point():
            q = target.double()
            w = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
        else:
            w = (target != ignore_index).double()
            q = F.one_hot(target.clamp(min=0), logits.shape[1]).double() * w[:, None]
        if sample_weight is not None:
            w = w * sample_weight.double()
        coef = w * scale / (w.sum() if reduction == 1 else 1.0)
        coef = torch.where(w == 0, torch.zeros_like(coef), coef)  # ignored rows: exact zeros, as torch
        g = coef[:, None] * (p * q.sum(1, keepdim=True) - q)
    return loss, g.to(logits.dtype)


def _triton_impl(*args):
    from tlkernels.triton.cross_entropy import cross_entropy_forward
    return cross_entropy_forward(*args)


ensure_op("cross_entropy", SCHEMA, _ref_impl)
register_gpu("cross_entropy", _triton_impl, _ref_impl)


@torch.library.register_fake("tlkernels::cross_entropy")
def _fake(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad):
    loss = logits.new_empty((logits.shape[0],) if reduction == 0 else ())
    return loss, (torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad
                  else logits.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.none = inputs[4] == 0
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


# ----------------------------------------------------------------------------- joint op (one autograd node)
def _joint_impl(single):
    """Kernel of joint_cross_entropy built from a single-head kernel (reference or Triton)."""
    def impl(tl, ty, tw, sl, sy, sw, ignore_index, reduction, target_weight, source_weight, compute_grad):
        if reduction not in (1, 2):
            fail("joint_cross_entropy", f"reduction must be 1 (mean) or 2 (sum), got {reduction}")
        lt, gt = single(tl, ty, tw, ignore_index, reduction, target_weight, compute_grad)
        ls, gs = single(sl, sy, sw, ignore_index, reduction, source_weight, compute_grad)
        return lt + ls, gt, gs
    return impl


ensure_op("joint_cross_entropy", JOINT_SCHEMA, _joint_impl(_ref_impl))
register_gpu("joint_cross_entropy", _joint_impl(_triton_impl), _joint_impl(_ref_impl))


@torch.library.register_fake("tlkernels::joint_cross_entropy")
def _joint_fake(tl, ty, tw, sl, sy, sw, ignore_index, reduction, target_weight, source_weight, compute_grad):
    def grad(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad else x.new_empty(0)
    return tl.new_empty((), dtype=torch.promote_types(tl.dtype, sl.dtype)), grad(tl), grad(sl)


def _joint_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _joint_backward(ctx, grad_loss, _g1, _g2):
    gt, gs = ctx.saved_tensors
    if (gt.numel() == 0 and ctx.needs_input_grad[0]) or (gs.numel() == 0 and ctx.needs_input_grad[3]):
        raise RuntimeError("joint_cross_entropy: the forward ran without compute_grad; call it with the logits "
                           "requiring grad and grad mode enabled")
    if not (_is_eager_cpu(grad_loss) and grad_loss.item() == 1.0):  # see _backward: the usual loss.backward()
        gt, gs = gt * grad_loss.to(gt.dtype), gs * grad_loss.to(gs.dtype)
    return (gt, None, None, gs) + (None,) * 7


def _is_eager_cpu(t):
    """A real CPU tensor outside any tracing (compile, fake or functional modes): reading it is free."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def _backward(ctx, grad_loss, _grad_grad):
    (g,) = ctx.saved_tensors
    if g.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("cross_entropy: the forward ran without compute_grad; call it with the logits "
                           "requiring grad and grad mode enabled")
    # The forward already wrote d(loss)/d(logits) for an upstream gradient of 1. In the usual
    # `loss.backward()` on the CPU that is the answer: return it without another N x C pass (autograd
    # copies it before accumulating, since ctx still holds it, so retain_graph stays correct).
    # Otherwise scale out of place. On GPUs no value is read back: that would synchronise.
    if not ctx.none and _is_eager_cpu(grad_loss) and grad_loss.item() == 1.0:
        return g, None, None, None, None, None, None
    scale = grad_loss[:, None] if ctx.none else grad_loss
    return g * scale.to(g.dtype), None, None, None, None, None, None


# The compiled library registers both ops' autograd in C++ (csrc/ops/cross_entropy_autograd.cpp: a Python
# autograd node cost as much as the kernels at typical sizes); these Python twins serve the fallback.
if not torch._C._dispatch_has_kernel_for_dispatch_key("tlkernels::cross_entropy", "Autograd"):
    torch.library.register_autograd("tlkernels::cross_entropy", _backward, setup_context=_setup_context)
if not torch._C._dispatch_has_kernel_for_dispatch_key("tlkernels::joint_cross_entropy", "Autograd"):
    torch.library.register_autograd("tlkernels::joint_cross_entropy", _joint_backward,
                                    setup_context=_joint_setup_context)


def _check(opname, logits, target, sample_weight, reduction, name="logits", tname="target"):
    check_tensor(opname, name, logits, dim=2, floating=True)
    if not isinstance(target, torch.Tensor):
        fail(opname, f"{tname} must be a torch.Tensor, got {type(target).__name__}", TypeError)
    if target.device != logits.device:
        fail(opname, f"{tname} must be on the device of {name} ({logits.device}), got {target.device}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            fail(opname, f"{tname} (soft labels) must have the shape of {name} {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    elif target.dtype != torch.int64:
        fail(opname, f"{tname} must be int64 labels or a float probability matrix, got {target.dtype}", TypeError)
    elif tuple(target.shape) != (logits.shape[0],):
        fail(opname, f"{tname} must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if sample_weight is not None:
        check_tensor(opname, f"{tname.split('_')[0]}_sample_weight" if "_" in tname else "sample_weight",
                     sample_weight, dim=1, device=logits.device, floating=True)
        if sample_weight.shape[0] != logits.shape[0]:
            fail(opname, f"sample_weight must have shape ({logits.shape[0]},), got {tuple(sample_weight.shape)}")
    if reduction not in REDUCTIONS:
        fail(opname, f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def cross_entropy(logits, target, sample_weight=None, ignore_index=-100, reduction="mean", scale=1.0):
    """scale * CE(logits, target) with F.cross_entropy semantics; see the module docstring."""
    _check("cross_entropy", logits, target, sample_weight, reduction)
    if use_reference():
        if not target.is_floating_point() and not torch.compiler.is_compiling():  # compiled kernels check it
            bad = ((target < 0) | (target >= logits.shape[1])) & (target != ignore_index)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                fail("cross_entropy", f"target[{i}] = {int(target[i])} is out of range [0, {logits.shape[1]}) "
                                      f"(and is not ignore_index = {ignore_index})")
        return cross_entropy_reference(logits, target, sample_weight, ignore_index, reduction, scale)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, _ = op("cross_entropy")(logits, target.detach(), None if sample_weight is None else sample_weight.detach(),
                                  int(ignore_index), REDUCTIONS[reduction], float(scale), compute_grad)
    return loss


def joint_cross_entropy(target_logits, target_labels, source_logits=None, source_labels=None, source_weight=1.0,
                        target_weight=1.0, target_sample_weight=None, source_sample_weight=None, ignore_index=-100,
                        reduction="mean"):
    """target_weight * CE(target_logits, target_labels) + source_weight * CE(source_logits, source_labels).

    Each head is one fused row pass (its weight folded into the gradient, no extra pass); with both heads,
    number weights and a mean/sum reduction the two passes are one op (one autograd node). With
    reduction="none" returns the weighted per-row losses: a tensor for the target head alone, or the
    tuple (target_rows, source_rows) when a source head is given (the heads have different batch sizes).
    A source_weight of 0 skips the source head entirely (soft fine-tuning at the end of its schedule).
    """
    op_name = "joint_cross_entropy"
    _check(op_name, target_logits, target_labels, target_sample_weight, reduction, "target_logits", "target_labels")
    if (source_logits is None) != (source_labels is None):
        fail(op_name, "source_logits and source_labels must be given together")
    if source_logits is None:
        return cross_entropy(target_logits, target_labels, target_sample_weight, ignore_index, reduction,
                             target_weight)
    _check(op_name, source_logits, source_labels, source_sample_weight, reduction, "source_logits", "source_labels")
    if isinstance(source_weight, (int, float)) and source_weight == 0 and reduction != "none":
        lt = cross_entropy(target_logits, target_labels, target_sample_weight, ignore_index, reduction, target_weight)
        return lt + 0.0 * source_logits.sum()  # keeps the source head in the graph (DDP) at no real cost
    if (reduction != "none" and not use_reference() and isinstance(source_weight, (int, float))
            and isinstance(target_weight, (int, float))):
        compute_grad = torch.is_grad_enabled() and (target_logits.requires_grad or source_logits.requires_grad)
        loss, _, _ = op("joint_cross_entropy")(
            target_logits, target_labels.detach(), _detach(target_sample_weight), source_logits,
            source_labels.detach(), _detach(source_sample_weight), int(ignore_index), REDUCTIONS[reduction],
            float(target_weight), float(source_weight), compute_grad)
        return loss
    lt = cross_entropy(target_logits, target_labels, target_sample_weight, ignore_index, reduction, target_weight)
    ls = cross_entropy(source_logits, source_labels, source_sample_weight, ignore_index, reduction, source_weight)
    return (lt, ls) if reduction == "none" else lt + ls


def _detach(t):
    return None if t is None else t.detach()
