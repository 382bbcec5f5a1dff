"""Fused cross-entropy (loss and gradient in one row pass) and the joint target/source objective
L = target_weight * CE(target head) + source_weight * CE(source head).

Hard labels follow F.cross_entropy (ignore_index; the weighted mean divides by the summed weight of the
rows that count; an all-ignored batch gives nan loss and zero gradients). Per-sample weights generalise
F.cross_entropy's class weights: `sample_weight = class_weight[labels]` reproduces them exactly. Soft
labels (a probability matrix) serve distillation toward a frozen source model; no gradient flows to them.
"""
import torch
import torch.nn.functional as F

from tlkernels._extension import use_reference
from tlkernels.ops._registry import TRITON, op, register_op
from tlkernels.ops._utils import check_tensor, compiled_checks, fail

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
    """Reference kernel of the op (CUDA tensors where Triton is missing). Analytic gradient: an op kernel runs
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


def _fake(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad):
    loss = logits.new_empty((logits.shape[0],) if reduction == 0 else ())
    return loss, (torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad
                  else logits.new_empty(0))


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


def _joint_fake(tl, ty, tw, sl, sy, sw, ignore_index, reduction, target_weight, source_weight, compute_grad):
    def grad(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad else x.new_empty(0)
    return tl.new_empty((), dtype=torch.promote_types(tl.dtype, sl.dtype)), grad(tl), grad(sl)


def _samples():
    """Hard labels with an ignored row (mean), per-row weights (none), soft labels (sum), no gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, -100, 4, 2, 3])
    soft = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    return [(x, y, None, -100, 1, 1.0, True), (x, y, w, -100, 0, 0.5, True), (x, soft, None, -100, 2, 2.0, True),
            (x.detach(), y, None, -100, 1, 1.0, False)]


def _joint_samples():
    """Two heads of different widths: hard labels (mean), per-row weights and soft source labels (sum)."""
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    yt, ys = torch.tensor([0, 1, -100, 4, 2, 3]), torch.tensor([8, 0, 2, 2])
    soft = torch.softmax(torch.randn(4, 9, generator=g, dtype=torch.float64), 1)
    return [(xt, yt, None, xs, ys, None, -100, 1, 0.5, 0.25, True),
            (xt, yt, torch.rand(6, generator=g, dtype=torch.float64), xs, soft, None, -100, 2, 1.0, 2.0, True)]


# CUDA tensors: the Triton kernels (the reference kernels where Triton is missing). Autograd: the compiled library
# registers both ops' in C++ (csrc/ops/cross_entropy_autograd.cpp).
register_op("cross_entropy", _ref_impl, cuda=TRITON, triton=_triton_impl, fake=_fake, samples=_samples)
register_op("joint_cross_entropy", _joint_impl(_ref_impl), cuda=TRITON, triton=_joint_impl(_triton_impl),
            fake=_joint_fake, samples=_joint_samples)


def _names(head):
    """The names of one head's arguments in error messages (logits, target, sample_weight, class weights):
    cross_entropy's (head "") or one head of joint_cross_entropy's ("target", "source"); the compiled checks name
    them alike (HeadNames, csrc/ops/cross_entropy.h)."""
    if not head:
        return "logits", "target", "sample_weight", "weight"
    return f"{head}_logits", f"{head}_labels", f"{head}_sample_weight", f"{head}_class_weight"


def _check(opname, logits, target, sample_weight, reduction, ignore_index, head=""):
    """One head's (N, C) rows: the Python types and the reduction's name here, then the op's checks
    (csrc/ops/cross_entropy.cpp, through _cross_entropy_check, before the dispatcher picks a kernel by the tensors'
    devices; hard labels outside [0, C) included): TypeError/ValueError naming `opname` and the argument (head
    "": logits, target, sample_weight; "source": source_logits, source_labels, source_sample_weight)."""
    names = _names(head)[:3]
    for name, t in zip(names, (logits, target, sample_weight)):
        if t is not None or name != names[2]:
            check_tensor(opname, name, t)
    if reduction not in REDUCTIONS:
        fail(opname, f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    compiled_checks("_cross_entropy_check", opname, head, logits, target, sample_weight, int(ignore_index))


def _to_rows(opname, logits, target, sample_weight, head=""):
    """Logits of shape (C,), (N, C) or (N, C, d1, ..., dk) and their targets as the (rows, C) matrix the kernels
    take (class dimension last), plus the shape of the per-element loss (for reduction="none")."""
    name, tname = _names(head)[:2]
    check_tensor(opname, name, logits)
    if not isinstance(target, torch.Tensor):
        fail(opname, f"{tname} must be a torch.Tensor, got {type(target).__name__}", TypeError)
    if logits.dim() == 0:
        fail(opname, f"{name} must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    soft = target.is_floating_point()
    if logits.dim() == 1:  # one unbatched example, as F.cross_entropy
        want = tuple(logits.shape) if soft else ()
        if tuple(target.shape) != want:
            fail(opname, f"{tname} must have shape {want} for unbatched {name} of shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
        if sample_weight is not None and sample_weight.numel() != 1:
            fail(opname, f"sample_weight must have one value for unbatched {name}, got shape {tuple(sample_weight.shape)}")
        return (logits.unsqueeze(0), target.unsqueeze(0),
                None if sample_weight is None else sample_weight.reshape(1), ())
    shape = (logits.shape[0],) + tuple(logits.shape[2:])
    if logits.dim() == 2:
        return logits, target, sample_weight, shape
    want = tuple(logits.shape) if soft else shape
    if tuple(target.shape) != want:
        fail(opname, f"{tname} must have shape {want} for {name} of shape {tuple(logits.shape)}"
                     f"{' (soft labels)' if soft else ''}, got {tuple(target.shape)}")
    if sample_weight is not None and tuple(sample_weight.shape) != shape:
        fail(opname, f"sample_weight must have shape {shape} (one value per loss element), got "
                     f"{tuple(sample_weight.shape)}")
    C = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, C)
    target = target.movedim(1, -1).reshape(-1, C) if soft else target.reshape(-1)
    return rows, target, None if sample_weight is None else sample_weight.reshape(-1), shape


def _ce_rows(logits, target, sample_weight, ignore_index, reduction, scale):
    """The fused op on (N, C) rows: hard labels or a (possibly unnormalised) target matrix, per-row weights."""
    if use_reference():
        return cross_entropy_reference(logits, target, sample_weight, ignore_index, reduction, scale)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, _ = op("cross_entropy")(logits, target.detach(), None if sample_weight is None else sample_weight.detach(),
                                  int(ignore_index), REDUCTIONS[reduction], float(scale), compute_grad)
    return loss


def _check_options(opname, logits, weight, label_smoothing, name="weight"):
    if weight is not None:
        check_tensor(opname, name, weight, dim=1, device=logits.device, floating=True)
        if weight.shape[0] != logits.shape[1]:
            fail(opname, f"{name} (class weights) must have shape ({logits.shape[1]},), got {tuple(weight.shape)}")
    if (not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool)
            or not 0.0 <= label_smoothing <= 1.0):
        fail(opname, f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")


def _smoothed_rows(logits, target, weight, sample_weight, ignore_index, eps):
    """Class weights and label smoothing as one target matrix q per row, so that the fused soft-label pass
    computes F.cross_entropy's rows: loss_i = -sum_c q_ic log p_ic. Returns (q, mean's denominator):
    hard labels  q_i = (1 - eps) w_{y_i} onehot(y_i) + eps / C * w   (0 for ignored rows); denominator
                 sum_i w_{y_i} over the rows that count (PyTorch's weighted mean, smoothing term included)
    soft labels  q_i = w * ((1 - eps) t_i + eps / C); denominator the number of rows."""
    n, C = logits.shape
    dt = torch.promote_types(logits.dtype, torch.float32)
    w = weight.to(dt) if weight is not None else torch.ones(C, dtype=dt, device=logits.device)
    sw = None if sample_weight is None else sample_weight.to(dt)
    if target.is_floating_point():
        q = (target.to(dt) * (1 - eps) + eps / C) * w
        denom = sw.sum() if sw is not None else torch.tensor(float(n), dtype=dt, device=logits.device)
        return q, denom
    counted = target != ignore_index
    tc = torch.where(counted, target, 0)
    wy = w[tc] * counted
    q = ((1 - eps) * wy)[:, None] * F.one_hot(tc, C).to(dt) + (eps / C) * w[None, :] * counted[:, None].to(dt)
    return q, (wy if sw is None else wy * sw).sum()


def cross_entropy(logits, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0, *, sample_weight=None, scale=1.0):
    """scale * F.cross_entropy(logits, target, weight, ignore_index=..., reduction=..., label_smoothing=...).

    Accepts what F.cross_entropy accepts, with the same values and gradients: logits (C,), (N, C) or
    (N, C, d1, ..., dk) in any floating dtype on any device; target int64 class indices of shape (), (N) or
    (N, d1, ..., dk), or class probabilities of the logits' shape (no gradient flows to them); weight (C,) class
    weights (hard labels: PyTorch's weighted mean divides by the summed weight of the rows that count);
    label_smoothing in [0, 1] for both target kinds; the deprecated size_average/reduce. Extensions:
    sample_weight (one weight per loss element, multiplying its loss and, for hard labels, the mean's
    denominator) and scale (a number, or a tensor that receives a gradient). (N, C) without weight and smoothing
    is one fused row pass (loss and gradient together); the other forms build the equivalent per-row target
    matrix first and run the same pass. Raises ValueError/TypeError for bad shapes, dtypes or options and
    RuntimeError for a label outside [0, C) that is not ignore_index.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return _cross_entropy("cross_entropy", logits, target, weight, ignore_index, reduction, label_smoothing,
                          sample_weight, scale)


def _cross_entropy(name, logits, target, weight, ignore_index, reduction, label_smoothing, sample_weight, scale,
                   head=""):
    """cross_entropy of one head; `name` and `head` ("": cross_entropy's arguments; "target" or "source": one head
    of joint_cross_entropy's) go into error messages."""
    if isinstance(scale, torch.Tensor):  # a tensor weight (maybe learned) multiplies the loss: autograd sees it
        if scale.numel() != 1:
            fail(name, f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        return _cross_entropy(name, logits, target, weight, ignore_index, reduction, label_smoothing, sample_weight,
                              1.0, head) * scale.reshape(())
    x, t, sw, shape = _to_rows(name, logits, target, sample_weight, head)
    _check(name, x, t, sw, reduction, ignore_index, head)
    _check_options(name, x, weight, label_smoothing, _names(head)[3])
    if label_smoothing == 0 and (weight is None or not t.is_floating_point()):
        if weight is None:
            loss = _ce_rows(x, t, sw, ignore_index, reduction, scale)
        else:  # class weights of hard labels are per-row weights: the same fused pass
            wy = weight.detach().to(x.dtype)[torch.where((t >= 0) & (t < x.shape[1]), t, 0)]
            sw = wy if sw is None else wy * sw
            if reduction != "mean":
                loss = _ce_rows(x, t, sw, ignore_index, reduction, scale)
            else:  # F's weighted mean, its degenerate cases included (_WeightedMean)
                counted = t != ignore_index
                rows = _ce_rows(x, t, sw, ignore_index, "none", scale)
                loss = _WeightedMean.apply(rows, (sw * counted).sum().to(rows.dtype), counted)
    else:
        q, denom = _smoothed_rows(x, t.detach(), None if weight is None else weight.detach(),
                                  None if sw is None else sw.detach(), ignore_index, float(label_smoothing))
        rows = _ce_rows(x, q, sw, ignore_index, "none", scale)
        counted = torch.ones_like(rows, dtype=torch.bool) if t.is_floating_point() else t != ignore_index
        loss = (rows if reduction == "none" else rows.sum() if reduction == "sum"
                else _WeightedMean.apply(rows, denom.to(rows.dtype), counted))
    return loss.reshape(shape) if reduction == "none" else loss


class _WeightedMean(torch.autograd.Function):
    """rows.sum() / denom with F.cross_entropy's gradients in its degenerate cases: an uncounted (ignored) row
    gets a zero gradient whatever the denominator; with denom == 0 (every counted row weighs 0) the loss is
    NaN and every counted row's gradient NaN, as F's 0/0. Tensor ops only: no host sync."""

    @staticmethod
    def forward(ctx, rows, denom, counted):
        ctx.save_for_backward(denom, counted)
        nan = torch.full_like(denom, float("nan"))
        return torch.where(denom == 0, nan, rows.sum() / denom)

    @staticmethod
    def backward(ctx, grad):
        denom, counted = ctx.saved_tensors
        per = torch.where(denom == 0, torch.full_like(denom, float("nan")), grad / denom)
        return torch.where(counted, per, torch.zeros_like(per)).to(grad.dtype), None, None


def joint_cross_entropy(target_logits, target_labels, source_logits=None, source_labels=None, source_weight=1.0,
                        target_weight=1.0, target_sample_weight=None, source_sample_weight=None, ignore_index=-100,
                        reduction="mean", *, target_class_weight=None, source_class_weight=None,
                        target_label_smoothing=0.0, source_label_smoothing=0.0):
    """target_weight * CE(target_logits, target_labels) + source_weight * CE(source_logits, source_labels).

    Each head takes the options of `cross_entropy` (shapes, class weights, label smoothing, sample weights).
    Each head is one fused row pass (its weight folded into the gradient, no extra pass); with both heads in
    (N, C) form, number weights, no class weights or smoothing and a mean/sum reduction the two passes are one
    op (one autograd node). With reduction="none" returns the weighted per-element losses: a tensor for the
    target head alone, or the tuple (target_rows, source_rows) when a source head is given (the heads have
    different batch sizes). A source_weight of 0 skips the source head entirely (soft fine-tuning at the end
    of its schedule). A tensor weight receives its gradient.
    """
    op_name = "joint_cross_entropy"

    def head(logits, labels, sw, w, cw, ls, which="target"):
        return _cross_entropy(op_name, logits, labels, cw, ignore_index, reduction, ls, sw, w, which)

    if (source_logits is None) != (source_labels is None):
        fail(op_name, "source_logits and source_labels must be given together")
    if source_logits is None:
        return head(target_logits, target_labels, target_sample_weight, target_weight, target_class_weight,
                    target_label_smoothing)
    if isinstance(source_weight, (int, float)) and source_weight == 0 and reduction != "none":
        lt = head(target_logits, target_labels, target_sample_weight, target_weight, target_class_weight,
                  target_label_smoothing)
        check_tensor(op_name, "source_logits", source_logits, floating=True)
        return lt + 0.0 * source_logits.sum()  # keeps the source head in the graph (DDP) at no real cost
    plain = (reduction != "none" and not use_reference() and isinstance(source_weight, (int, float))
             and isinstance(target_weight, (int, float)) and target_logits.dim() == 2 and source_logits.dim() == 2
             and target_class_weight is None and source_class_weight is None
             and target_label_smoothing == 0 and source_label_smoothing == 0)
    if plain:
        _check(op_name, target_logits, target_labels, target_sample_weight, reduction, ignore_index, "target")
        _check(op_name, source_logits, source_labels, source_sample_weight, reduction, ignore_index, "source")
        compute_grad = torch.is_grad_enabled() and (target_logits.requires_grad or source_logits.requires_grad)
        loss, _, _ = op("joint_cross_entropy")(
            target_logits, target_labels.detach(), _detach(target_sample_weight), source_logits,
            source_labels.detach(), _detach(source_sample_weight), int(ignore_index), REDUCTIONS[reduction],
            float(target_weight), float(source_weight), compute_grad)
        return loss
    lt = head(target_logits, target_labels, target_sample_weight, target_weight, target_class_weight,
              target_label_smoothing)
    ls = head(source_logits, source_labels, source_sample_weight, source_weight, source_class_weight,
              source_label_smoothing, "source")
    return (lt, ls) if reduction == "none" else lt + ls


def _detach(t):
    return None if t is None else t.detach()
