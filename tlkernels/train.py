"""tlkernels reference trainer: every method through our kernels, short enough to read in one sitting.

    python -m tlkernels.train --compare finetune,l2sp,soft,selective,adafilter,spottune   # the demo
    python -m tlkernels.train --method adafilter+l2sp --target data/birds --source data/imagenet_subset
    torchrun --nproc_per_node=2 -m tlkernels.train --method selective                      # DDP (gloo on CPU)

Every option is a field of Config below (flags --name value, or a JSON --config file; flags win).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tlkernels._io import CheckpointError, atomic_save, atomic_write_text, load

METHODS = ("finetune", "l2sp", "soft", "selective", "adafilter", "spottune")


@dataclass
class Config:
    method: str = "finetune"       # one of METHODS; "+l2sp" adds the L2-SP penalty (e.g. adafilter+l2sp)
    compare: str = ""              # comma-separated methods trained on the same split and seed, then compared
    target: str = ""               # ImageFolder root with train/ and val/ (empty: the embedded demo's digits)
    source: str = ""               # ImageFolder root of the source set (empty: the demo's MNIST sample)
    arch: str = "resnet18"         # torchvision architecture (real data)
    checkpoint: str = ""           # pre-trained state_dict for arch, instead of torchvision's weights
    image_size: int = 224          # real data: resize + center crop (the demo is 32x32)
    out_dir: str = "runs/demo"     # metrics, checkpoints and plots go to out_dir/<method>/
    cache_dir: str = ""            # pre-trained demo model and descriptor caches (default: out_dir/cache)
    seed: int = 0                  # same seed, same numbers
    epochs: int = 30               # passes over the target training set
    eval_every: int = 5            # validate every N epochs (and after the last)
    batch_size: int = 32
    lr: float = 0.02               # SGD, cosine decay to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4     # plain L2 on the weights (0 for the tensors L2-SP penalises)
    l2sp_alpha: float = 0.1        # L2-SP: pull of pre-trained weights toward their start (paper: 0.1)
    l2sp_beta: float = 0.01        # L2-SP: plain L2 on the new head (paper: 0.01)
    label_smoothing: float = 0.0   # target loss: label smoothing (F.cross_entropy's; timm's recipes use 0.1)
    class_weights: str = "none"    # target loss: none | balanced (n / (classes * count) per class, imbalanced sets)
    soft_schedule: str = "cosine"  # soft fine-tuning lambda(t): linear | cosine | exponential | step
    soft_lambda0: float = 1.0      # soft fine-tuning: source-loss weight at the start
    selective_k: int = 50          # selective: source neighbours per target image
    selective_levels: int = 2      # selective: hard (misclassified) target images get k * levels neighbours
    selective_bins: int = 32       # selective: histogram bins per filter channel
    adafilter_hidden: int = 32     # AdaFilter: LSTM width
    spottune_tau: float = 5.0      # SpotTune: Gumbel-softmax temperature
    policy_lr: float = 0.01        # SpotTune: policy network learning rate
    pretrain_epochs: int = 2       # demo: epochs of source pre-training (cached)
    target_per_class: int = 10     # demo: training images per class of the target set
    source_limit: int = 0          # use only the first N source images (0: all)
    resume: bool = False           # continue out_dir/<method>/last.pt exactly where it stopped
    stop_after: int = 0            # stop after this many steps (checkpoint saved), as an interruption would
    quiet: bool = False            # no progress bars
    config: str = ""               # JSON file with any of these fields
    threads: int = 0               # torch threads (0: leave torch's default)


# ----------------------------------------------------------------------------- options
def parse_args(argv=None):
    fields = dataclasses.fields(Config)
    ap = argparse.ArgumentParser(prog="tlkernels-train", description=__doc__.split("\n")[0])
    for f in fields:
        if f.type is bool or f.type == "bool":
            ap.add_argument(f"--{f.name}", action="store_true", default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            ap.add_argument(f"--{f.name}", type=typ, default=None)
    ns = ap.parse_args(argv)
    values = {}
    if ns.config:
        try:
            with open(ns.config) as fh:
                values = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"--config {ns.config}: {e}")
        if not isinstance(values, dict):
            ap.error(f"--config {ns.config}: expected a JSON object of options (e.g. {{\"epochs\": 10}}), "
                     f"got a JSON {type(values).__name__}")
        names = {f.name: f for f in fields}
        for k, v in values.items():
            if k not in names:
                ap.error(f"--config {ns.config}: unknown option {k!r}")
            tname = names[k].type if isinstance(names[k].type, str) else names[k].type.__name__
            want = {"int": int, "float": (int, float), "str": str, "bool": bool}[tname]
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                ap.error(f"--config {ns.config}: option {k!r} must be {tname}, got {v!r}")
    values.update({k: v for k, v in vars(ns).items() if v is not None})
    cfg = Config(**values)
    for m in ([cfg.method] + [m for m in cfg.compare.split(",") if m]):
        base, _, extra = m.partition("+")
        if base not in METHODS or extra not in ("", "l2sp"):
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)} (optionally with +l2sp)")
    if cfg.class_weights not in ("none", "balanced"):
        ap.error(f"--class_weights must be none or balanced, got {cfg.class_weights!r}")
    if not 0.0 <= cfg.label_smoothing <= 1.0:
        ap.error(f"--label_smoothing must be in [0, 1], got {cfg.label_smoothing}")
    if cfg.soft_schedule not in ("linear", "cosine", "exponential", "step"):
        ap.error(f"--soft_schedule must be linear, cosine, exponential or step, got {cfg.soft_schedule!r}")
    for name in ("epochs", "eval_every", "batch_size", "selective_k", "selective_bins", "target_per_class", "pretrain_epochs"):
        if getattr(cfg, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("source_limit", "stop_after", "threads"):
        if getattr(cfg, name) < 0:
            ap.error(f"--{name} must be >= 0 (0: {'all' if name == 'source_limit' else 'off'}), got {getattr(cfg, name)}")
    if bool(cfg.target) != bool(cfg.source) and not cfg.target:
        ap.error("--source needs --target")
    return cfg


# ----------------------------------------------------------------------------- distributed
def dist_setup():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- data and models
def load_data(cfg):
    from tlkernels import data
    if cfg.target:
        target = data.image_folder(cfg.target, cfg.image_size, "target")
        source = data.image_folder(cfg.source, cfg.image_size, "source") if cfg.source else None
    else:
        target, source = data.demo_target(cfg.seed, cfg.target_per_class), data.demo_source()
    if source is not None and cfg.source_limit:
        source.train = torch.utils.data.Subset(source.train, range(min(cfg.source_limit, len(source.train))))
    return target, source


def take(ds, idx):
    """A batch (images, labels) of dataset items `idx` (fast path for TensorDataset)."""
    if isinstance(ds, torch.utils.data.TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx]
    if isinstance(ds, torch.utils.data.Subset) and isinstance(ds.dataset, torch.utils.data.TensorDataset):
        j = torch.as_tensor(ds.indices)[idx]
        return ds.dataset.tensors[0][j], ds.dataset.tensors[1][j]
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def demo_backbone():
    import torchvision
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey-level digits
    return m


def pretrained_backbone(cfg, source, log):
    """A backbone with its source classifier in .fc: the cached demo pre-training, --checkpoint, or torchvision's."""
    import torchvision
    if cfg.target and not cfg.checkpoint:
        try:
            return torchvision.models.get_model(cfg.arch, weights="DEFAULT")
        except Exception as e:  # no network: say what to do instead of hanging
            raise SystemExit(f"tlkernels-train: pre-trained weights for {cfg.arch!r} are not available offline ({e}); "
                             f"pass --checkpoint PATH with a state_dict of {cfg.arch}")
    if cfg.checkpoint:
        model = demo_backbone() if not cfg.target else torchvision.models.get_model(cfg.arch)
        try:
            state = load(cfg.checkpoint, "--checkpoint")
            if not isinstance(state, dict):
                raise CheckpointError(f"--checkpoint {cfg.checkpoint}: expected a state_dict (a dict of tensors), "
                                      f"got {type(state).__name__}")
            model.load_state_dict(state.get("model", state))
        except (CheckpointError, RuntimeError, KeyError) as e:
            raise SystemExit(f"tlkernels-train: {e}" if isinstance(e, CheckpointError)
                             else f"tlkernels-train: --checkpoint {cfg.checkpoint}: {e}")
        return model
    path = os.path.join(cfg.cache_dir, f"pretrained-demo-e{cfg.pretrain_epochs}-n{len(source.train)}.pt")
    torch.manual_seed(1234)  # before construction: the initial weights must not depend on earlier RNG use
    model = demo_backbone()
    if os.path.exists(path):
        try:
            model.load_state_dict(load(path, "cached pre-trained model"))
            return model
        except Exception as e:
            log(f"cached pre-trained model {path} unusable ({e}); pre-training again")
    if is_main():  # one rank pre-trains; the others wait and load the cache
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        n, bs = len(source.train), 64
        from tqdm.auto import tqdm
        steps = cfg.pretrain_epochs * math.ceil(n / bs)
        bar = tqdm(total=steps, desc="pre-train on source", disable=cfg.quiet)
        for ep in range(cfg.pretrain_epochs):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(ep))
            for i in range(0, n, bs):
                x, y = take(source.train, perm[i:i + bs])
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        atomic_save(model.state_dict(), path)
    barrier()
    model.load_state_dict(load(path, "cached pre-trained model"))
    return model


class Net(nn.Module):
    """trunk (backbone without its classifier, maybe wrapped by SpotTune/AdaFilter) + target head
    (+ the pre-trained source head when the method keeps a source loss)."""

    def __init__(self, trunk, feat_dim, n_target, source_head=None):
        super().__init__()
        self.trunk, self.head, self.source_head = trunk, nn.Linear(feat_dim, n_target), source_head

    def forward(self, x, n_target=None):
        f = self.trunk(x)
        if n_target is None:
            return self.head(f)
        return self.head(f[:n_target]), self.source_head(f[n_target:])


def target_loss_options(cfg, target):
    """class_weight and label_smoothing of the target loss (--class_weights, --label_smoothing)."""
    from tlkernels.data import balanced_class_weights, dataset_labels
    cw = None
    if cfg.class_weights == "balanced":
        cw = balanced_class_weights(dataset_labels(target.train), len(target.classes))
    return dict(class_weight=cw, label_smoothing=cfg.label_smoothing)


def build(cfg, method, backbone, n_target, loss_options):
    import copy
    from tlkernels.methods import AdaFilter, SpotTune
    from tlkernels.nn import L2SP, SoftJointLoss
    base, _, extra = method.partition("+")
    backbone = copy.deepcopy(backbone)
    feat = backbone.fc.in_features
    source_head = backbone.fc if base in ("soft", "selective") else None
    backbone.fc = nn.Identity()
    new = ["head"]
    if base == "spottune":
        trunk = SpotTune(backbone, tau=cfg.spottune_tau)
        new.append("trunk.policy")
    elif base == "adafilter":
        trunk = AdaFilter(backbone, hidden_size=cfg.adafilter_hidden)
        new.append("trunk.controller")
    else:
        trunk = backbone
    net = Net(trunk, feat, n_target, source_head)
    l2sp = L2SP(net, alpha=cfg.l2sp_alpha, beta=cfg.l2sp_beta, head=new) if "l2sp" in (base, extra) else None
    if base == "soft":
        objective = SoftJointLoss(cfg.soft_schedule, lambda0=cfg.soft_lambda0, total_steps=1,  # steps set later
                                  **loss_options)
    elif base == "selective":  # L = 1/2 CE_t + 1/2 CE_s
        objective = SoftJointLoss("constant", lambda0=0.5, target_weight=0.5, **loss_options)
    else:
        objective = SoftJointLoss("constant", lambda0=0.0, **loss_options)
    return net, l2sp, objective


def make_optimizer(cfg, net, l2sp, method):
    from tlkernels.optim import SGD
    policy = [p for n, p in net.named_parameters() if p.requires_grad and n.startswith("trunk.policy.")]
    rest = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("trunk.policy.")]
    groups = [dict(params=rest, weight_decay=0.0 if l2sp is not None else cfg.weight_decay)]
    if policy:
        groups.append(dict(params=policy, lr=cfg.policy_lr, weight_decay=1e-3))  # the official policy settings
    return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, l2sp=l2sp)


# ----------------------------------------------------------------------------- selective joint fine-tuning
def build_selector(cfg, target, source, rank, world, log):
    from tlkernels.filters import gabor_bank
    from tlkernels.select import SourceSelector
    bank = gabor_bank(scales=2, orientations=4, size=7, in_channels=target.channels)
    sel = SourceSelector(bank, bins=cfg.selective_bins, fine_bins=16 * cfg.selective_bins,
                         cache_dir=os.path.join(cfg.cache_dir, f"selective-seed{cfg.seed}"), progress=not cfg.quiet)
    sel.fit(target.train)
    sel.describe(target.train, "target")
    if world > 1:  # each rank describes a contiguous shard of the source; the search is sharded too
        n = len(source.train)
        lo, hi = n * rank // world, n * (rank + 1) // world
        shard = torch.utils.data.Subset(source.train, range(lo, hi))
        sel.cache_dir = None
        d = sel.describe(shard, "source-shard")
        from tlkernels.ops import knn_search
        k = min(cfg.selective_k, n)
        idx = knn_search(sel.descriptors["target"].double(), d.double(), k, "skl",
                         channel_weights=bank.channel_weights().double(), sharded=True)[1]
        return sel, [row for row in idx]
    sel.describe(source.train, "source")
    sel.select(min(cfg.selective_k, len(source.train)))
    return sel, sel.neighbours()


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(net, ds, bs=256):
    net.eval()
    correct, loss, n = 0, 0.0, len(ds)
    for i in range(0, n, bs):
        x, y = take(ds, torch.arange(i, min(i + bs, n)))
        out = net(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    return correct / max(n, 1), loss / max(n, 1)


def gate_usage(net):
    trunk = net.trunk.module if hasattr(net.trunk, "module") else net.trunk
    if hasattr(trunk, "blocks"):  # SpotTune
        return {f"block{i}": float(u) for i, u in enumerate(trunk.gate_usage(reset=True))}
    if hasattr(trunk, "controller"):  # AdaFilter
        return trunk.gate_usage()
    return None


# Options that do not change what a run computes: a resumed run may differ from its checkpoint in these alone.
RESUME_FREE = {"compare", "method", "resume", "stop_after", "quiet", "config", "threads", "out_dir", "cache_dir"}


def load_resume_checkpoint(path, cfg):
    """last.pt of an earlier run of the same configuration (loaded without unpickling code)."""
    try:
        ck = load(path, "--resume checkpoint")
    except CheckpointError as e:
        raise SystemExit(f"tlkernels-train: {e}; delete it to start over")
    keys = {"model", "optimizer", "scheduler", "objective", "rng", "step", "best", "history", "config", "buffers"}
    if not isinstance(ck, dict) or not keys <= set(ck):
        got = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise SystemExit(f"tlkernels-train: --resume checkpoint {path} is not a tlkernels training checkpoint "
                         f"(expected the keys {sorted(keys)}, got {got})")
    now = dataclasses.asdict(cfg)
    changed = [f"--{k}: checkpoint {v!r}, now {now.get(k)!r}" for k, v in sorted(ck["config"].items())
               if k not in RESUME_FREE and now.get(k) != v]
    if changed:
        raise SystemExit(f"tlkernels-train: --resume: {path} was written by a run with other options, so resuming "
                         f"would not continue that run; " + "; ".join(changed))
    return ck


def train_method(cfg, method, target, source, backbone, rank, world, log):
    from tqdm.auto import tqdm
    out = os.path.join(cfg.out_dir, method.replace("+", "_"))
    if is_main():
        os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    net, l2sp, objective = build(cfg, method, backbone, len(target.classes), target_loss_options(cfg, target))
    base = method.partition("+")[0]
    uses_source = base in ("soft", "selective")
    if uses_source and source is None:
        raise SystemExit(f"tlkernels-train: method {base!r} needs a source set (--source DIR)")
    n = len(target.train)
    spe = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * spe
    if base == "soft":
        objective.total_steps = total
        objective.milestones = [total // 3, 2 * total // 3]
    opt = make_optimizer(cfg, net, l2sp, method)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    neighbours, selector = None, None
    if base == "selective":
        selector, neighbours = build_selector(cfg, target, source, rank, world, log)
    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net)
    start, best, history = 0, -1.0, []
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if cfg.resume and os.path.exists(last_path):
        ck = load_resume_checkpoint(last_path, cfg)
        try:
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            objective.load_state_dict(ck["objective"])
            for name, buf in net.named_buffers():  # also the non-persistent ones (SpotTune's gate-usage counters)
                if name in ck["buffers"]:
                    buf.copy_(ck["buffers"][name])
            torch.set_rng_state(ck["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise SystemExit(f"tlkernels-train: --resume checkpoint {last_path} does not fit this run "
                             f"({type(e).__name__}: {e})")
        start, best, history = ck["step"], ck["best"], ck["history"]
        neighbours = ck.get("neighbours", neighbours)
        log(f"{method}: resumed at step {start}/{total}")
    metrics = None
    if is_main():  # a fresh run starts the file anew; a resumed one continues the history it resumed
        atomic_write_text("".join(json.dumps(h) + "\n" for h in history), os.path.join(out, "metrics.jsonl"))
        metrics = open(os.path.join(out, "metrics.jsonl"), "a")
    bar = tqdm(total=total, initial=start, desc=method, disable=cfg.quiet or not is_main())
    t0 = time.time()
    status = "done"
    for step in range(start, total):
        epoch, i = divmod(step, spe)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size][rank::world]
        xt, yt = take(target.train, idx)
        model.train()
        if uses_source:
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            if base == "selective":
                sidx = torch.stack([nb[torch.randint(len(nb), (1,), generator=g)][0] for nb in
                                    (neighbours[int(j)] for j in idx)])
            else:
                sidx = torch.randint(len(source.train), (len(idx),), generator=g)
            xs, ys = take(source.train, sidx)
            lt_logits, ls_logits = model(torch.cat([xt, xs]), len(idx))
            loss, lt, ls = objective.parts(lt_logits, yt, ls_logits, ys)
        else:
            lt_logits = model(xt)
            loss, lt, ls = objective.parts(lt_logits, yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        objective.step()
        rec = {"step": step + 1, "epoch": epoch, "loss": float(loss.detach()), "target_ce": float(lt.detach()),
               "source_ce": float(ls.detach()) if torch.is_tensor(ls) else float(ls),
               "lambda": objective.lam(), "lr": sched.get_last_lr()[0],
               "train_acc": float((lt_logits.argmax(1) == yt).float().mean())}
        if l2sp is not None:
            rec["l2sp"] = float(l2sp.value())
        if ((step + 1) % spe == 0 and (epoch + 1) % cfg.eval_every == 0) or step + 1 == total:
            acc, vloss = evaluate(net, target.val)
            rec.update(val_acc=acc, val_loss=vloss)
            gates = gate_usage(net)
            if gates is not None:
                rec["gates"] = gates
            if acc > best:
                best = acc
                if is_main():
                    atomic_save({"model": net.state_dict(), "step": step + 1, "val_acc": acc}, best_path)
        if (step + 1) % spe == 0 and base == "selective" and epoch + 1 == max(1, cfg.epochs // 2) and world == 1:
            # hard target images (misclassified now) get more neighbours for the second half
            x_all, y_all = take(target.train, torch.arange(n))
            with torch.no_grad():
                net.eval()
                hard = (net(x_all).argmax(1) != y_all).nonzero().squeeze(1)
            neighbours = selector.grow(hard, cfg.selective_levels)
            rec["grown"] = int(hard.numel())
        history.append(rec)
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        bar.update()
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{history[-1].get('val_acc', float('nan')):.3f}")
        stop = cfg.stop_after and step + 1 - start >= cfg.stop_after
        if (step + 1) % spe == 0 or step + 1 == total or stop:
            if is_main():
                atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "objective": objective.state_dict(), "rng": torch.get_rng_state(), "step": step + 1,
                             "buffers": {k: b.detach().clone() for k, b in net.named_buffers()},
                             "best": best, "history": history, "neighbours": neighbours,
                             "config": dataclasses.asdict(cfg)}, last_path)
        if stop:
            status = "interrupted"
            break
    bar.close()
    if metrics:
        metrics.close()
    final = [h for h in history if "val_acc" in h]
    summary = {"method": method, "status": status, "steps": history[-1]["step"] if history else 0,
               "final_val_acc": final[-1]["val_acc"] if final else None, "best_val_acc": best,
               "seconds": round(time.time() - t0, 1), "seed": cfg.seed}
    if is_main():
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(out, "summary.json"))
        from tlkernels import plots
        plots.curves(history, os.path.join(out, "curves.png"), method)
        if final and "gates" in final[-1]:
            plots.gates(final[-1]["gates"], os.path.join(out, "gates.png"), method)
        if base == "selective":
            plots.retrieval_grid(target.train, source.train, neighbours, os.path.join(out, "retrieved.png"))
    return summary, history


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    rank, world = dist_setup()

    def log(msg):
        if is_main():
            print(msg, file=sys.stderr, flush=True)

    target, source = load_data(cfg)
    if is_main():
        os.makedirs(cfg.cache_dir, exist_ok=True)
    backbone = pretrained_backbone(cfg, source, log)
    methods = [m for m in cfg.compare.split(",") if m] or [cfg.method]
    results = {}
    for m in methods:
        summary, history = train_method(cfg, m, target, source, backbone, rank, world, log)
        results[m] = (summary, history)
        log(f"{m}: final val acc {summary['final_val_acc']:.4f}, best {summary['best_val_acc']:.4f}, "
            f"{summary['seconds']} s" if summary["final_val_acc"] is not None else f"{m}: {summary['status']}")
    if is_main() and len(methods) > 1:
        from tlkernels import plots
        rows = ["| method | final val acc | best val acc | train seconds |", "|---|---|---|---|"]
        for m, (s, _) in results.items():
            rows.append(f"| {m} | {s['final_val_acc']:.4f} | {s['best_val_acc']:.4f} | {s['seconds']} |")
        table = "\n".join(rows)
        atomic_write_text(f"Target: {'demo digits' if not cfg.target else cfg.target}, seed {cfg.seed}, "
                          f"{cfg.epochs} epochs.\n\n{table}\n", os.path.join(cfg.out_dir, "comparison.md"))
        plots.comparison({m: h for m, (_, h) in results.items()}, os.path.join(cfg.out_dir, "comparison.png"))
        print(table)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
