"""The fused optimizer-step ops (sgd_l2sp_step_, adamw_l2sp_step_; defined in csrc/ops/l2sp.cpp): references, fakes.

The steps are mutating multi-tensor ops used by tlkernels.optim; they carry no autograd.
"""
import math

import torch

from tlkernels.ops._registry import COMPILED, register_op

def _penalty_grad(p, ref, weight, coeff):
    d = p if ref is None else p - ref
    return coeff * (d if weight is None else weight * d)


def _weight(weights, i):
    return weights[i] if weights else None


@torch.no_grad()
def sgd_l2sp_step_reference(params, grads, momentum_buffers, refs, weights, coeffs, lr, momentum, dampening,
                            weight_decay, nesterov, maximize, first_step):
    """torch.optim.SGD's update of each params[i] in place, with the L2-SP gradient coeffs[i] * w * (p - refs[i])
    (refs[i] None: coeffs[i] * w * p; w = weights[i], or 1 when weights is empty or weights[i] None) added to
    grads[i] first: the oracle of tlkernels::sgd_l2sp_step_."""
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        g = g + _penalty_grad(p, refs[i], _weight(weights, i), coeffs[i])
        if weight_decay:
            g = g + weight_decay * p
        if momentum:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g + momentum * buf if nesterov else buf
        p.add_(g, alpha=-lr)


@torch.no_grad()
def adamw_l2sp_step_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, refs, weights, coeffs, lr, beta1,
                              beta2, eps, weight_decay, step, maximize):
    """torch.optim.AdamW's update (decoupled weight decay; amsgrad when max_exp_avg_sqs is not empty) of each
    params[i] in place, with the L2-SP gradient added to grads[i] first: the oracle of tlkernels::adamw_l2sp_step_."""
    bc1 = 1 - beta1 ** step
    bc2s = math.sqrt(1 - beta2 ** step)
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        g = g + _penalty_grad(p, refs[i], _weight(weights, i), coeffs[i])
        p.mul_(1 - lr * weight_decay)
        exp_avgs[i].mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = exp_avg_sqs[i]
        if max_exp_avg_sqs:
            second = torch.maximum(max_exp_avg_sqs[i], exp_avg_sqs[i], out=max_exp_avg_sqs[i])
        p.addcdiv_(exp_avgs[i], second.sqrt() / bc2s + eps, value=-lr / bc1)


def _fake_step(*args):
    return None


def _state(seed):
    """Two params (a matrix and a vector, float32), their gradients, an L2-SP reference and Fisher weight for the
    first only, and a state-like tensor maker."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    gs = [torch.randn(p.shape, generator=g) for p in ps]
    refs, weights = [ps[0] + 0.1, None], [torch.rand(5, 3, generator=g), None]
    return ps, gs, refs, weights, lambda: [torch.rand(p.shape, generator=g) for p in ps]


def _sgd_samples():
    """Momentum with weight decay (first step and a later one), Nesterov, maximize."""
    out = []
    for momentum, nesterov, maximize, first in ((0.9, False, False, True), (0.9, False, False, False),
                                                (0.9, True, False, False), (0.0, False, True, False)):
        ps, gs, refs, weights, state = _state(0)
        out.append((ps, gs, state(), refs, weights, [0.2, 0.05], 0.1, momentum, 0.0, 0.01,
                    nesterov, maximize, first))
    return out


def _adamw_samples():
    """AdamW without and with amsgrad's state list, and maximize."""
    out = []
    for amsgrad, maximize in ((False, False), (True, False), (False, True)):
        ps, gs, refs, weights, state = _state(0)
        out.append((ps, gs, state(), state(), state() if amsgrad else [], refs, weights, [0.2, 0.05], 0.01, 0.9,
                    0.99, 1e-8, 0.01, 2, maximize))
    return out


# CUDA tensors: the compiled multi-tensor kernels, else the reference kernels. They write params and optimizer
# state.
register_op("sgd_l2sp_step_", sgd_l2sp_step_reference, cuda=COMPILED, fake=_fake_step, mutates=True,
            samples=_sgd_samples)
register_op("adamw_l2sp_step_", adamw_l2sp_step_reference, cuda=COMPILED, fake=_fake_step, mutates=True,
            samples=_adamw_samples)
