"""Transfer-learning objectives: L2SP penalty, SoftJointLoss (lambda(t) schedules) and TransferLoss."""
import math

import torch
import torch.nn as nn

from tlkernels.ops.cross_entropy import cross_entropy
from tlkernels.ops.l2sp import l2sp_penalty

_KERNEL_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _kernel_param_names(model):
    """Names of conv/linear kernels ('weight' of such modules, GatedConv2d's fine-tuned weight included)."""
    from tlkernels.nn.gated_conv import GatedConv2d
    names = set()
    for mname, m in model.named_modules():
        if isinstance(m, _KERNEL_MODULES + (GatedConv2d,)) and getattr(m, "weight", None) is not None:
            names.add(f"{mname}.weight" if mname else "weight")
    return names



def under(name, prefixes):
    """Whether parameter `name` belongs to one of the modules named in `prefixes` (itself, or "prefix.*")."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)

class L2SP:
    """alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_new||^2 for a model (Li et al., ICML 2018).

    model      the network being fine-tuned
    reference  a state_dict of the pre-trained weights; default: a snapshot of `model` now (copies)
    head       name prefix(es) of the new layers (e.g. "fc"): penalised toward 0 with beta
    scope      "kernels": conv/linear weights only (the paper's code); "all": every trainable parameter
               (Transfer-Learning-Library's convention, BN and biases included)
    fisher     L2-SP-Fisher (the paper's second penalty): {parameter name: per-element weights F >= 0 of its
               shape} (e.g. from estimate_fisher on source data); those tensors get alpha/2 sum F (w - w0)^2,
               in the same fused multi-tensor pass (penalty and optimizer step) as the others.
    Calling it returns the penalty (differentiable, one fused multi-tensor pass).
    """

    def __init__(self, model, reference=None, alpha=0.1, beta=0.01, head=None, scope="kernels", fisher=None):
        if scope not in ("kernels", "all"):
            raise ValueError(f"L2SP: scope must be 'kernels' or 'all', got {scope!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"L2SP: model must be an nn.Module, got {type(model).__name__}")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"L2SP: {name} must be a number, got {type(v).__name__}")
        if not (0 <= alpha < math.inf and 0 <= beta < math.inf):  # (NaN fails both comparisons)
            raise ValueError(f"L2SP: alpha and beta must be finite and >= 0, got alpha={alpha}, beta={beta}")
        heads = () if head is None else ((head,) if isinstance(head, str) else tuple(head))
        self.alpha, self.beta, self.scope, self.head = float(alpha), float(beta), scope, heads
        kernels = _kernel_param_names(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for h in heads:
            if not any(under(n, (h,)) for n, _ in named):
                raise ValueError(f"L2SP: head {h!r} matches no trainable parameter of the model")
        ref_sd = reference if reference is not None else {n: p.detach() for n, p in model.named_parameters()}
        self.names, self.params, self.refs, self.new_names, self.new_params = [], [], [], [], []
        for n, p in named:
            if scope == "kernels" and n not in kernels:
                continue
            if under(n, heads):
                self.new_names.append(n)
                self.new_params.append(p)
                continue
            if n not in ref_sd:
                raise KeyError(f"L2SP: reference has no entry for {n!r}; name its layer in head= if it is new")
            r = ref_sd[n]
            if tuple(r.shape) != tuple(p.shape):
                raise ValueError(f"L2SP: reference[{n!r}] has shape {tuple(r.shape)}, the parameter {tuple(p.shape)}")
            self.names.append(n)
            self.params.append(p)
            self.refs.append(r.detach().to(device=p.device, dtype=p.dtype, copy=True))
        self.set_fisher(fisher or {})

    def set_fisher(self, fisher):
        """Make this L2-SP-Fisher with `fisher` ({parameter name: per-element weights}; {} for plain L2-SP):
        checked as the constructor's argument, used by the next penalty and optimizer step."""
        self.fisher = self._check_fisher(fisher)
        self._set_coefficients()

    def _check_fisher(self, fisher):
        """{index into self.params: weights} from {name: weights}; ValueError/TypeError naming the entry."""
        if not isinstance(fisher, dict):
            raise TypeError(f"L2SP: fisher must be a dict of parameter name -> tensor, got {type(fisher).__name__}")
        index = {n: i for i, n in enumerate(self.names)}
        out = {}
        for n, f in fisher.items():
            if n not in index:
                raise ValueError(f"L2SP: fisher[{n!r}]: not a tensor this penalty pulls toward its start "
                                 f"(penalised: {self.names[:3]}{'...' if len(self.names) > 3 else ''})")
            p = self.params[index[n]]
            if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(p.shape):
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"L2SP: fisher[{n!r}] must be a tensor of the parameter's shape {tuple(p.shape)}, "
                                 f"got {got}")
            if not f.is_floating_point():
                raise TypeError(f"L2SP: fisher[{n!r}] must be a floating-point tensor (a Fisher diagonal), got {f.dtype}")
            if f.device.type == "meta":
                raise ValueError(f"L2SP: fisher[{n!r}] is a meta tensor (no values); expected it on {p.device}")
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValueError(f"L2SP: fisher[{n!r}] must hold finite values >= 0 (a Fisher diagonal)")
            out[index[n]] = f.detach().to(device=p.device, dtype=p.dtype, copy=True)
        return out

    def penalises(self, param):
        """True for every tensor the penalty covers (pulled toward w0, Fisher-weighted or not, or a new head
        tensor)."""
        return id(param) in self._coeff

    def _set_coefficients(self):
        """(reference, weights, coefficient) per penalised tensor, by identity: what the fused optimizer step
        reads; the per-param weights list of the fused penalty (None where a tensor has no Fisher weights)."""
        self.weights = [self.fisher.get(i) for i in range(len(self.params))]
        self._coeff = {id(p): (r, w, self.alpha) for p, r, w in zip(self.params, self.refs, self.weights)}
        self._coeff.update({id(q): (None, None, self.beta) for q in self.new_params})

    def __call__(self):
        weights = self.weights if self.fisher else None
        return l2sp_penalty(self.params, self.refs, self.alpha, self.new_params, self.beta, weights=weights)

    @torch.no_grad()
    def value(self):
        """The penalty without an autograd graph (for logging when the optimizer applies its gradient)."""
        return self()

    def coefficient(self, param):
        """(reference tensor or None, Fisher weights or None, coefficient) of the L2-SP gradient
        coefficient * weights * (param - reference) for `param`; (None, None, 0) if not penalised."""
        return self._coeff.get(id(param), (None, None, 0.0))

    def state_dict(self):
        """{"alpha", "beta", "scope", "head", "refs": the reference tensors by parameter name} (tensors,
        numbers, strings: loads with weights_only=True)."""
        return {"alpha": self.alpha, "beta": self.beta, "scope": self.scope, "head": list(self.head),
                "refs": {n: r for n, r in zip(self.names, self.refs)},
                "fisher": {self.names[i]: f for i, f in self.fisher.items()}}

    def load_state_dict(self, sd):
        """Restore what state_dict saved; KeyError when a penalised parameter has no reference in it."""
        missing = [n for n in self.names if n not in sd["refs"]]
        if missing:
            raise KeyError(f"L2SP.load_state_dict: refs missing for {missing[:5]}")
        for i, n in enumerate(self.names):
            self.refs[i].copy_(sd["refs"][n])
        self.alpha, self.beta = float(sd["alpha"]), float(sd["beta"])
        self.set_fisher(sd.get("fisher", {}))


def estimate_fisher(model, batches, names=None, max_samples=None):
    """Diagonal empirical Fisher information of `model` on labelled data (L2-SP-Fisher's weights): per parameter,
    the mean over samples of the squared gradient of the per-sample cross-entropy (log-likelihood of the
    label), the model in eval mode. batches: iterable of (images, labels); names: parameter names to keep
    (default: every trainable one); max_samples: stop after that many samples. One backward per sample."""
    op = "estimate_fisher"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    if max_samples is not None and (not isinstance(max_samples, int) or isinstance(max_samples, bool)
                                    or max_samples < 1):
        raise ValueError(f"{op}: max_samples must be an int >= 1 or None (every sample), got {max_samples!r}")
    params = dict(model.named_parameters())
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{op}: names must be a collection of parameter names (str), got {names!r}")
        names = set(names)
        unknown = sorted(names - set(params))
        if unknown:
            raise ValueError(f"{op}: names {unknown[:5]} are not parameters of the model (its parameters: "
                             f"{', '.join(list(params)[:5])}{', ...' if len(params) > 5 else ''})")
        frozen = sorted(n for n in names if not params[n].requires_grad)
        if frozen:
            raise ValueError(f"{op}: names {frozen[:5]} are frozen (requires_grad=False): they get no gradient, "
                             f"so no Fisher information")
    named = [(n, p) for n, p in params.items() if p.requires_grad and (names is None or n in names)]
    if not named:
        raise ValueError(f"{op}: the model has no trainable parameter")
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    count = 0
    was = model.training
    model.eval()
    try:
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{op}: batches must yield (images, labels) pairs, got "
                                f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            x, y = batch
            for i in range(len(x)):
                if max_samples is not None and count >= max_samples:
                    break
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
                for n, p in named:
                    if p.grad is not None:
                        total[n] += p.grad.double().square()
                count += 1
            if max_samples is not None and count >= max_samples:
                break  # (before the next batch is read: it may be costly to produce)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    if count == 0:
        raise ValueError(f"{op}: the batches held no sample (an empty iterable, or only empty batches)")
    return {n: (t / count).to(p.dtype) for (n, p), t in zip(named, total.values())}


SCHEDULES = ("constant", "linear", "cosine", "exponential", "step")


class SoftJointLoss(nn.Module):
    """L(t) = target_weight * CE_target + lambda(t) * CE_source, lambda(0) = lambda0 decaying to 0 by total_steps.

    schedule   constant (selective joint fine-tuning: lambda0 = target_weight = 0.5), linear, cosine,
               exponential (lambda0 * exp(-rate t), rate = ln(1/final_fraction)/T, then 0 at T),
               step (lambda0 * gamma^k after the k-th milestone, 0 at T)
    class_weight, label_smoothing: options of the target loss (F.cross_entropy's weight and label_smoothing).
    `.step()` advances t; t is in the state_dict, so a resumed run continues the schedule.
    """

    def __init__(self, schedule="cosine", lambda0=1.0, total_steps=None, target_weight=1.0, final_fraction=0.01,
                 milestones=None, gamma=0.1, ignore_index=-100, class_weight=None, label_smoothing=0.0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"SoftJointLoss: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant" and (not isinstance(total_steps, int) or total_steps <= 0):
            raise ValueError(f"SoftJointLoss: schedule {schedule!r} needs total_steps > 0, got {total_steps!r}")
        if lambda0 < 0 or target_weight < 0:
            raise ValueError("SoftJointLoss: lambda0 and target_weight must be >= 0")
        if not 0 < final_fraction < 1:
            raise ValueError(f"SoftJointLoss: final_fraction must be in (0, 1), got {final_fraction}")
        self.schedule, self.lambda0, self.total_steps = schedule, float(lambda0), total_steps
        self.target_weight, self.final_fraction, self.gamma = float(target_weight), final_fraction, gamma
        self.milestones = sorted(milestones) if milestones is not None else (
            [total_steps // 3, 2 * total_steps // 3] if total_steps else [])
        self.ignore_index = ignore_index
        self.class_weight, self.label_smoothing = class_weight, float(label_smoothing)  # of the target loss
        self.t = 0

    def lam(self, t=None):
        """lambda(t) of the schedule (t defaults to the current step count)."""
        t = self.t if t is None else t
        T = self.total_steps
        if self.schedule == "constant":
            return self.lambda0
        if t >= T:
            return 0.0
        if self.schedule == "linear":
            return self.lambda0 * (1 - t / T)
        if self.schedule == "cosine":
            return self.lambda0 * 0.5 * (1 + math.cos(math.pi * t / T))
        if self.schedule == "exponential":
            return self.lambda0 * math.exp(math.log(self.final_fraction) * t / T)
        return self.lambda0 * self.gamma ** sum(t >= m for m in self.milestones)

    def step(self):
        """Advance the schedule by one training step."""
        self.t += 1

    def parts(self, target_logits, target_labels, source_logits=None, source_labels=None):
        """(total, target term, source term) with the weights applied; the source term is 0 without a source batch."""
        lt = cross_entropy(target_logits, target_labels, self.class_weight, ignore_index=self.ignore_index,
                           label_smoothing=self.label_smoothing, scale=self.target_weight)
        lam = self.lam()
        if source_logits is None or lam == 0:
            ls = (0.0 * source_logits.sum()) if source_logits is not None else target_logits.new_zeros(())
        else:
            ls = cross_entropy(source_logits, source_labels, ignore_index=self.ignore_index, scale=lam)
        return lt + ls, lt, ls

    def forward(self, target_logits, target_labels, source_logits=None, source_labels=None):
        return self.parts(target_logits, target_labels, source_logits, source_labels)[0]

    def get_extra_state(self):
        return {"t": self.t}

    def set_extra_state(self, state):
        self.t = int(state["t"])

    def extra_repr(self):
        return f"schedule={self.schedule}, lambda0={self.lambda0}, total_steps={self.total_steps}, t={self.t}"


class TransferLoss(nn.Module):
    """target CE + lambda(t) source CE + L2-SP in one call: returns (total, parts) with parts for logging.

    joint: a SoftJointLoss (default: plain target CE); l2sp: an L2SP or None. With include_penalty=False
    the penalty is left to a tlkernels.optim optimizer (it is still reported, computed without a graph).
    """

    def __init__(self, joint=None, l2sp=None, include_penalty=True):
        super().__init__()
        self.joint = joint if joint is not None else SoftJointLoss("constant", lambda0=0.0)
        self.l2sp = l2sp
        self.include_penalty = include_penalty

    def forward(self, target_logits, target_labels, source_logits=None, source_labels=None):
        total, lt, ls = self.joint.parts(target_logits, target_labels, source_logits, source_labels)
        parts = {"target_ce": lt.detach(), "source_ce": ls.detach(), "lambda": self.joint.lam()}
        if self.l2sp is not None:
            if self.include_penalty:
                pen = self.l2sp()
                total = total + pen
                parts["l2sp"] = pen.detach()
            else:
                parts["l2sp"] = self.l2sp.value()
        return total, parts
