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


# CUDA tensors: the compiled multi-tensor kernels, else the fallback. They write params and optimizer state.
for _name, _impl in (("sgd_l2sp_step_", sgd_l2sp_step_reference), ("adamw_l2sp_step_", adamw_l2sp_step_reference)):
    register_op(_name, _impl, cuda=COMPILED, fake=_fake_step, mutates=True)
