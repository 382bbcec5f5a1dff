"""L2-SP penalty: alpha/2 * sum ||p - p0||^2 over pre-trained tensors + beta/2 * sum ||q||^2 over new ones.

One multi-tensor pass (C++ on the CPU, CUDA multi-tensor kernel on GPUs when built), deterministic,
any mix of float dtypes. `l2sp_penalty` is differentiable (its backward adds alpha*(p - p0) and beta*q);
`l2sp_value_and_grad` returns value and gradients from a single read of p and p0; with accumulate=True it
adds them into the parameters' .grad in place (the training use: after the task loss's backward), which
allocates nothing and is one pass over p, p0 and the gradient.
"""
import torch

from tlkernels._extension import use_reference
from tlkernels.ops._registry import COMPILED, op, register_op
from tlkernels.ops._utils import compiled_checks, fail

def _out_dtype(params, new_params):
    return torch.float64 if any(t.dtype == torch.float64 for t in (*params, *new_params)) else torch.float32


def _weight(weights, i):
    """The per-element weights of params[i] (float64), or None (weight 1)."""
    return weights[i].double() if weights and weights[i] is not None else None


def l2sp_penalty_reference(params, refs, alpha, new_params=(), beta=0.0, weights=None):
    """Plain PyTorch, accumulated in float64 (the oracle; differentiable):
    alpha/2 * sum w (p - p0)^2 + beta/2 * sum q^2, w = weights[i] (None or absent: 1)."""
    dev = (list(params) + list(new_params) + [torch.empty(0)])[0].device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i, (p, r) in enumerate(zip(params, refs)):
        sq = (p.double() - r.double()).pow(2)
        w = _weight(weights, i)
        total = total + 0.5 * alpha * (sq if w is None else w * sq).sum()
    for q in new_params:
        total = total + 0.5 * beta * q.double().pow(2).sum()
    return total.to(_out_dtype(params, new_params))


def _ref_penalty(params, refs, weights, alpha, new_params, beta):
    with torch.no_grad():
        return l2sp_penalty_reference(params, refs, alpha, new_params, beta, weights)


def _ref_backward(grad, params, refs, weights, alpha, new_params, beta):
    gp = []
    for i, (p, r) in enumerate(zip(params, refs)):
        w = _weight(weights, i)
        d = p.double() - r.double()
        gp.append((grad * alpha * (d if w is None else w * d)).to(p.dtype))
    gn = [(grad * beta * q.double()).to(q.dtype) for q in new_params]
    return gp, gn


def _ref_value_and_grad(params, refs, weights, alpha, new_params, beta):
    v = _ref_penalty(params, refs, weights, alpha, new_params, beta)
    gp, gn = _ref_backward(torch.ones((), dtype=torch.float64), params, refs, weights, alpha, new_params, beta)
    return v, gp, gn


def _ref_value_and_grad_inplace(params, refs, weights, alpha, new_params, beta, grads, new_grads):
    v, gp, gn = _ref_value_and_grad(params, refs, weights, alpha, new_params, beta)
    for g, d in zip(list(grads) + list(new_grads), gp + gn):
        g.add_(d)
    return v


def _fake_penalty(params, refs, weights, alpha, new_params, beta):
    dev = (list(params) + list(new_params))[0].device if (params or new_params) else torch.device("cpu")
    return torch.empty((), dtype=_out_dtype(params, new_params), device=dev)


def _fake_grads(params, new_params):
    # The kernels return gradients in the memory layout of their (dense) tensors, as empty_like does for those
    return [torch.empty_like(p) for p in params], [torch.empty_like(q) for q in new_params]


def _fake_backward(grad, params, refs, weights, alpha, new_params, beta):
    return _fake_grads(params, new_params)


def _fake_value_and_grad(params, refs, weights, alpha, new_params, beta):
    return (_fake_penalty(params, refs, weights, alpha, new_params, beta), *_fake_grads(params, new_params))


def _fake_value_and_grad_inplace(params, refs, weights, alpha, new_params, beta, grads, new_grads):
    return _fake_penalty(params, refs, weights, alpha, new_params, beta)


def _setup_context(ctx, inputs, output):
    params, refs, weights, alpha, new_params, beta = inputs
    ctx.n = (len(params), len(new_params))
    ctx.coeff = (alpha, beta)
    ctx.weighted = [w is not None for w in weights]
    ctx.save_for_backward(*params, *refs, *new_params, *[w for w in weights if w is not None])


def _backward(ctx, grad):
    n, m = ctx.n
    saved = ctx.saved_tensors
    params, refs, new_params, stored = saved[:n], saved[n:2 * n], saved[2 * n:2 * n + m], iter(saved[2 * n + m:])
    weights = [next(stored) if has else None for has in ctx.weighted]
    gp, gn = op("l2sp_penalty_backward")(grad, list(params), list(refs), weights, ctx.coeff[0], list(new_params),
                                         ctx.coeff[1])
    # (torch.library's structure check: a list holding None is one leaf, a list of tensors one entry per tensor)
    no_grad_weights = [None] * len(weights) if all(ctx.weighted) else None
    return list(gp), [None] * n, no_grad_weights, None, list(gn), None


def _samples(grad=True):
    """Two params (a matrix in float64 and a vector past one chunk of the CPU kernel) and a new-head tensor,
    without weights, with a weight each (L2-SP-Fisher) and with one weight absent."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    p = [t(4, 3).requires_grad_(grad), t(70_000).requires_grad_(grad)]
    r, q = [t(4, 3), t(70_000)], [t(2).requires_grad_(grad)]
    w = [torch.rand(4, 3, generator=g, dtype=torch.float64), torch.rand(70_000, generator=g, dtype=torch.float64)]
    return [(p, r, [], 0.3, q, 0.05), (p, r, w, 0.3, q, 0.05), (p, r, [w[0], None], 0.3, [], 0.0)]


def _backward_samples():
    return [(torch.tensor(1.5, dtype=torch.float64), *args) for args in _samples(grad=False)]


def _inplace_samples():
    out = []
    for p, r, w, alpha, q, beta in _samples(grad=False):
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in p]
        out.append((p, r, w, alpha, q, beta, grads, [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in q]))
    return out


# CUDA tensors: the compiled multi-tensor kernels (csrc/ops/cuda/l2sp_cuda.cu), else the reference kernels.
register_op("l2sp_penalty", _ref_penalty, cuda=COMPILED, fake=_fake_penalty, autograd=(_backward, _setup_context),
            samples=_samples)
register_op("l2sp_penalty_backward", _ref_backward, cuda=COMPILED, fake=_fake_backward, samples=_backward_samples)
register_op("l2sp_value_and_grad", _ref_value_and_grad, cuda=COMPILED, fake=_fake_value_and_grad,
            samples=lambda: _samples(grad=False))
register_op("l2sp_value_and_grad_", _ref_value_and_grad_inplace, cuda=COMPILED,
            fake=_fake_value_and_grad_inplace, mutates=True, samples=_inplace_samples)


def _convert(opname, params, refs, new_params, weights):
    """What the dispatcher cannot say clearly: the Python types (lists or tuples of tensors; weights None or a list
    of tensors or None). Returns params, refs, new_params and the weights as the ops take them (lists; [] for no
    weights)."""
    for name, lst in (("params", params), ("refs", refs), ("new_params", new_params)):
        if not isinstance(lst, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in lst):
            fail(opname, f"{name} must be a list or tuple of tensors, got {type(lst).__name__}", TypeError)
    if weights is None:
        weights = []
    elif not isinstance(weights, (list, tuple)) or not all(w is None or isinstance(w, torch.Tensor) for w in weights):
        fail(opname, f"weights must be None or a list of tensors or None, got {type(weights).__name__}", TypeError)
    return list(params), list(refs), list(new_params), [None if w is None else w.detach() for w in weights]


def _check(opname, params, refs, weights, new_params, grads=None, new_grads=None):
    """The ops' argument checks (csrc/ops/l2sp_checks.h, through _l2sp_check), before the dispatcher picks a kernel
    by the tensors' devices and before a reference runs: TypeError/ValueError naming `opname`, the argument, what
    was expected and what came. grads/new_grads: the .grad tensors an accumulating call updates in place."""
    compiled_checks("_l2sp_check", opname, params, refs, weights, new_params, grads is not None, grads or [],
                    new_grads or [])


def l2sp_penalty(params, refs, alpha=0.1, new_params=(), beta=0.0, weights=None):
    """alpha/2 * sum w (p - p0)^2 + beta/2 * sum ||q||^2 as a scalar tensor (float32, float64 if any input is).

    weights: None (w = 1), or one entry per param: None (w = 1) or per-element weights of the param's shape and
    dtype (L2-SP-Fisher: the source task's Fisher diagonal), in the same fused pass.
    Differentiable: backward adds alpha*w*(p - p0) to each p's gradient and beta*q to each q's. refs and
    weights are constants (no gradient).
    """
    params, refs, new_params, weights = _convert("l2sp_penalty", params, refs, new_params, weights)
    _check("l2sp_penalty", params, refs, weights, new_params)
    if use_reference():
        return l2sp_penalty_reference(params, [r.detach() for r in refs], alpha, new_params, beta, weights)
    return op("l2sp_penalty")(params, [r.detach() for r in refs], weights, float(alpha), new_params, float(beta))


def _grads_to_fill(tensors):
    """The .grad of each tensor, created as zeros in the tensor's layout (as autograd makes it) where it is None."""
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    return [t.grad for t in tensors]


def l2sp_value_and_grad(params, refs, alpha=0.1, new_params=(), beta=0.0, accumulate=False, weights=None):
    """(value, grads of params, grads of new_params) from one pass; no autograd graph.

    params and refs: equal-length sequences of tensors of equal shapes, dtypes and devices; new_params:
    tensors penalised toward 0 with beta; weights: as in l2sp_penalty. Raises TypeError for non-tensors and
    non-floating or mismatched dtypes, ValueError for mismatched lengths, shapes or devices, and RuntimeError
    when a tensor written in place is listed twice (its gradient would race).

    accumulate=True adds the gradients into each tensor's .grad (created as zeros if None) in place and
    returns those .grad tensors: what `(task_loss + penalty).backward()` would leave there, without a
    second backward and without allocating anything.
    """
    opname = "l2sp_value_and_grad"
    params, refs, new_params, weights = _convert(opname, params, refs, new_params, weights)
    detached = ([p.detach() for p in params], [r.detach() for r in refs], weights, [q.detach() for q in new_params])
    if accumulate:
        grads, new_grads = _grads_to_fill(params), _grads_to_fill(new_params)
        _check(opname, *detached, grads, new_grads)
        with torch.no_grad():
            impl = _ref_value_and_grad_inplace if use_reference() else op("l2sp_value_and_grad_")
            v = impl(*detached[:3], float(alpha), detached[3], float(beta), grads, new_grads)
        return v, grads, new_grads
    _check(opname, *detached)
    impl = _ref_value_and_grad if use_reference() else op("l2sp_value_and_grad")
    v, gp, gn = impl(*detached[:3], float(alpha), detached[3], float(beta))
    return v, list(gp), list(gn)
