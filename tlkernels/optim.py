"""SGD and AdamW with the L2-SP gradient folded into the step.

`tlkernels.optim.SGD(model.parameters(), lr=..., momentum=0.9, l2sp=L2SP(model, ...))` follows the
trajectory of torch.optim.SGD on `loss + l2sp()` (within float tolerance) while the penalty's gradient,
alpha*(p - p0) (alpha*F*(p - p0) with L2-SP-Fisher weights F, beta*p for the head), is added inside the one
multi-tensor step kernel that reads p, g, p0, F and the state once. Do not add the penalty to the loss as well: it would count twice. For logging,
`l2sp.value()` gives the penalty without a graph.
"""
import torch

from tlkernels._extension import use_reference
from tlkernels.ops import optim_step as _steps
from tlkernels.ops._registry import op


def _plan(optimizer, group):
    """Params with gradients in `group`, with their L2-SP reference (or None), per-element weights (L2-SP-Fisher,
    or None) and coefficient."""
    params, grads, refs, weights, coeffs = [], [], [], [], []
    l2sp = optimizer.l2sp
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__}: sparse gradients are not supported")
        params.append(p)
        grads.append(p.grad)
        ref, weight, coeff = l2sp.coefficient(p) if l2sp is not None else (None, None, 0.0)
        refs.append(ref)
        weights.append(weight)
        coeffs.append(float(coeff))
    return params, grads, refs, weights, coeffs


class _FusedL2SP(torch.optim.Optimizer):
    """Shared step(): closure, then one fused multi-tensor step per parameter group."""

    reference_step = None  # pure-PyTorch step used with TLKERNELS_BACKEND=reference
    op_name = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        impl = type(self).reference_step if use_reference() else op(self.op_name)
        for group in self.param_groups:
            params, grads, refs, weights, coeffs = _plan(self, group)
            if params:
                self._step_group(impl, group, params, grads, refs, weights, coeffs)
        return loss


class SGD(_FusedL2SP):
    """torch.optim.SGD (momentum, dampening, weight_decay, nesterov, maximize) plus an optional fused L2-SP term."""

    reference_step = staticmethod(_steps.sgd_l2sp_step_reference)
    op_name = "sgd_l2sp_step_"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, l2sp=None):
        if lr < 0:
            raise ValueError(f"SGD: lr must be >= 0, got {lr}")
        if momentum < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum requires momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))
        self.l2sp = l2sp

    def _step_group(self, impl, group, params, grads, refs, weights, coeffs):
        momentum = group["momentum"]
        hyper = (group["lr"], momentum, group["dampening"], group["weight_decay"], group["nesterov"],
                 group["maximize"])
        if momentum == 0:
            impl(params, grads, [], refs, weights, coeffs, *hyper, False)
            return
        # First-step params (buffer := gradient) and the others go in separate calls.
        fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
        for i in fresh:
            self.state[params[i]]["momentum_buffer"] = torch.empty_like(params[i])
        old = [i for i in range(len(params)) if i not in set(fresh)]
        for first, idx in ((True, fresh), (False, old)):
            if idx:
                impl([params[i] for i in idx], [grads[i] for i in idx],
                     [self.state[params[i]]["momentum_buffer"] for i in idx], [refs[i] for i in idx],
                     [weights[i] for i in idx], [coeffs[i] for i in idx], *hyper, first)


class AdamW(_FusedL2SP):
    """torch.optim.AdamW (amsgrad included) plus an optional fused L2-SP term added to the gradient before the moments.

    The tensors L2-SP penalises (toward their start, or with beta on the new head) get no decoupled weight
    decay: the penalty is their regulariser, as in the L2-SP paper; the others get `weight_decay`."""

    reference_step = staticmethod(_steps.adamw_l2sp_step_reference)
    op_name = "adamw_l2sp_step_"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, l2sp=None):
        if lr < 0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize))
        self.l2sp = l2sp

    def _step_group(self, impl, group, params, grads, refs, weights, coeffs):
        by_step = {}
        for i, p in enumerate(params):
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            # L2-SP's penalty is the regulariser of the tensors it penalises (pull toward w0, or beta on the
            # head), as in the paper: they get no decoupled weight decay on top
            penalised = refs[i] is not None or coeffs[i] != 0.0 or (self.l2sp is not None and self.l2sp.penalises(p))
            by_step.setdefault((st["step"], penalised), []).append(i)
        b1, b2 = group["betas"]
        for (step, penalised), idx in by_step.items():
            impl([params[i] for i in idx], [grads[i] for i in idx], [self.state[params[i]]["exp_avg"] for i in idx],
                 [self.state[params[i]]["exp_avg_sq"] for i in idx],
                 [self.state[params[i]]["max_exp_avg_sq"] for i in idx] if group["amsgrad"] else [],
                 [refs[i] for i in idx],
                 [weights[i] for i in idx], [coeffs[i] for i in idx], group["lr"], b1, b2, group["eps"],
                 0.0 if penalised else group["weight_decay"], int(step), group["maximize"])
