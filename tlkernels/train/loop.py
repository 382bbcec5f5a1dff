"""The training loop: devices and processes, the pre-trained backbone, one method's run (via its recipe),
checkpoints that resume exactly, and the comparison over methods and seeds."""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tlkernels import _choices, config
from tlkernels._io import CheckpointError, atomic_save, atomic_write_text, load
from tlkernels.train import compare, data, export, plots
from tlkernels.train.config import parse_args, world_size
from tlkernels.train.recipes import recipe


# ----------------------------------------------------------------------------- devices and processes
def choice_cache(cfg):
    """The job's measured strategy choices (tlkernels/_choices.py): TLKERNELS_CHOICE_CACHE, else
    cache_dir/choices.json. Loaded at start and saved with every checkpoint, so that a resumed or repeated run
    on this host takes the strategies the first one measured: their rounding differs, and with them a resumed
    run in a new process matches the uninterrupted one."""
    return config.get("choice_cache") or os.path.join(cfg.cache_dir, "choices.json")


def setup_processes(cfg):
    """(rank, world, device). Under torchrun each process takes cuda:LOCAL_RANK (NCCL) or the CPU (gloo)."""
    world = world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"tlkernels-train: --device {cfg.device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        index = int(want[5:]) if want.startswith("cuda:") else (local_rank if world > 1 else torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise SystemExit(f"tlkernels-train: --device cuda:{index}: only {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise SystemExit(f"tlkernels-train: --sync_bn needs GPUs (torch.nn.SyncBatchNorm runs on CUDA devices), "
                         f"and this run's processes are on {device}; drop --sync_bn or use --device cuda")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def is_main():
    """True in the process that writes files and logs (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    """Wait for every process (no-op without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


def log(msg):
    """Print to stderr from the main process."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """What one method's training sees: options, data, device, ranks, and the model being trained."""
    cfg: object
    target: object
    source: object
    device: torch.device
    rank: int
    world: int
    workers: int
    backbone: nn.Module = None  # pre-trained, with its classifier (backbones.classifier_name)
    pretrained_classes: list = None  # what that classifier predicts (None: unknown)
    net: nn.Module = None
    amp: object = None

    def given(self):
        """What a recipe is given of the run (recipes.Given): data, not the loop's state."""
        from tlkernels.train.recipes import Given
        return Given(self.target, self.source, self.backbone, self.pretrained_classes, self.device, self.world,
                     self.workers, self.amp)

    def batch(self, x):
        """Images moved to the run's device, in channels_last with --channels_last."""
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return x.to(self.device, non_blocking=True, memory_format=fmt)

    @torch.no_grad()
    def predict(self, ds, shard=False, net=None):
        """(loss sum, correct count, logits, labels, unreadable images skipped) of the eval model (`net`, default
        the model being trained) on `ds` (this rank's share if shard)."""
        net = net or self.net
        net.eval()
        loss, correct, logits, labels, skipped = 0.0, 0, [], [], 0
        loader = data.eval_loader(ds, 2 * self.cfg.batch_size, self.workers, self.device,
                                  *((self.rank, self.world) if shard else (0, 1)))
        for x, y, bad in loader:
            skipped += bad
            if x is None:
                continue
            with self.amp():
                out = net(self.batch(x)).float()
            y = y.to(self.device)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            logits.append(out.cpu())
            labels.append(y.cpu())
        n_classes = len(self.target.classes)
        return (loss, correct, torch.cat(logits) if logits else torch.zeros(0, n_classes),
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), skipped)

    def evaluate(self, ds, net=None):
        """{"acc", "loss", "top5", "skipped"}: top-1 accuracy, mean loss, top-5 accuracy and unreadable images
        skipped over `ds` by `net` (default the model being trained), each rank evaluating its share."""
        loss, correct, logits, labels, skipped = self.predict(ds, shard=True, net=net)
        top5 = int((logits.topk(min(5, logits.shape[1]), 1).indices == labels[:, None]).any(1).sum())
        sums = torch.tensor([loss, correct, len(logits), skipped, top5], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        if sums[2] == 0:
            raise SystemExit(f"tlkernels-train: no validation image could be read ({int(sums[3])} unreadable, "
                             f"skipped by --skip_bad_images)")
        n = float(sums[2])
        return {"acc": float(sums[1]) / n, "loss": float(sums[0]) / n, "top5": float(sums[4]) / n,
                "skipped": int(sums[3])}


# ----------------------------------------------------------------------------- the pre-trained backbone
def demo_backbone():
    """torchvision ResNet-18 with a 1-channel stem and 10 classes (the demo's grey-level digits)."""
    import torchvision
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey-level digits
    return m


def pretrained_backbone(cfg, source):
    """(backbone with its source classifier, the classes that classifier predicts or None): the cached demo
    pre-training, --checkpoint, or the weights of --arch from torchvision or the model hub."""
    from tlkernels.train import backbones
    if cfg.target and not cfg.checkpoint:
        model = backbones.create(cfg.arch, pretrained=True)
        return model, backbones.pretrained_classes(cfg.arch)
    if cfg.checkpoint:
        model = demo_backbone() if not cfg.target else backbones.create(cfg.arch, pretrained=False)
        backbones.load_checkpoint(model, cfg.checkpoint)
        return model, None  # a state_dict records no class names: soft/selective get a fresh source head
    path = os.path.join(cfg.cache_dir, f"pretrained-demo-e{cfg.pretrain_epochs}-n{len(source.train)}.pt")
    torch.manual_seed(1234)  # before construction: the initial weights must not depend on earlier RNG use
    model = demo_backbone()
    if os.path.exists(path):
        try:
            model.load_state_dict(load(path, "cached pre-trained model"))
            return model, source.classes
        except Exception as e:
            log(f"cached pre-trained model {path} unusable ({e}); pre-training again")
    if is_main():  # one rank pre-trains; the others wait and load the cache
        from tqdm.auto import tqdm
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        n, bs = len(source.train), 64
        bar = tqdm(total=cfg.pretrain_epochs * math.ceil(n / bs), desc="pre-train on source", disable=cfg.quiet)
        for ep in range(cfg.pretrain_epochs):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(ep))
            for i in range(0, n, bs):
                x, y = data.take(source.train, perm[i:i + bs])
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
    return model, source.classes


def memory_bytes(device):
    """The memory of `device`: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_batch_memory(cfg, backbone, device):
    """SystemExit naming --image_size and --batch_size when a training batch cannot fit in the device's memory:
    a lower bound (the float32 images and the first convolution's output, which training keeps) against the
    memory there is, checked before anything that size is allocated."""
    if not cfg.target:
        return
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    s = cfg.image_size
    px = 3 * s * s
    if conv is not None:  # its output shape on a meta tensor: no memory, conv2d's own formula
        x = torch.empty(1, conv.in_channels, s, s, device="meta")
        px += conv._conv_forward(x, conv.weight.to("meta"), None).numel()
    need, have = cfg.batch_size * px * 4, memory_bytes(device)
    if need > have:
        raise SystemExit(f"tlkernels-train: --image_size {s} with --batch_size {cfg.batch_size}: one training batch "
                         f"needs more than {need / 2**30:.1f} GiB (its images and first feature map alone), and "
                         f"{device} has {have / 2**30:.1f} GiB; use a smaller --image_size (e.g. 224) or --batch_size")


# ----------------------------------------------------------------------------- checkpoints
# Options that do not change what a run computes: a resumed run may differ from its checkpoint in these alone.
RESUME_FREE = {"compare", "method", "seeds", "resume", "stop_after", "quiet", "config", "threads", "out_dir",
               "cache_dir", "workers", "device", "export", "tensorboard", "log_every"}



def rng_states(device, world):
    """Every process's RNG states for last.pt: {"cpu": [state per rank], "cuda": [state per rank] (empty without
    a GPU)}: SpotTune's Gumbel noise and dropout draw from the GPU's generator, one per process. A collective
    under torch.distributed: every rank calls it."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    got = [mine]
    if world > 1:
        got = [None] * world
        dist.all_gather_object(got, mine)
    return {"cpu": [g["cpu"] for g in got], "cuda": [g["cuda"] for g in got if g["cuda"] is not None]}


def restore_rng(state, device, rank):
    """Sets this process's RNG states from rng_states()' record (a bare tensor: one process's CPU state). A
    checkpoint written without a GPU leaves the GPU's generator as seeded."""
    if torch.is_tensor(state):
        state = {"cpu": [state], "cuda": []}
    if rank >= len(state["cpu"]):
        raise ValueError(f"the checkpoint holds the RNG states of {len(state['cpu'])} process(es), and this is "
                         f"rank {rank}: resume with as many processes as wrote it")
    torch.set_rng_state(state["cpu"][rank])
    if device.type == "cuda" and rank < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][rank], device)


def make_deterministic():
    """--deterministic: cuDNN and cuBLAS take deterministic algorithms (slower), so that a resumed GPU run
    repeats the uninterrupted one; PyTorch warns where an op has no deterministic implementation. (The mode
    covers cuDNN's convolutions, whatever torch.backends.cudnn.benchmark says.)"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (read when cuBLAS starts)
    torch.use_deterministic_algorithms(True, warn_only=True)


def target_loss_options(cfg, target, device):
    """class_weight and label_smoothing of the target loss (--class_weights, --label_smoothing)."""
    cw = None
    if cfg.class_weights == "balanced":
        cw = data.balanced_class_weights(data.dataset_labels(target.train), len(target.classes)).to(device)
    return dict(class_weight=cw, label_smoothing=cfg.label_smoothing)


def tensorboard_writer(cfg, out):
    """A SummaryWriter in out/tensorboard with --tensorboard (main process), else None."""
    if not cfg.tensorboard or not is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(f"tlkernels-train: --tensorboard needs the tensorboard package (pip install tensorboard): {e}")
    return SummaryWriter(os.path.join(out, "tensorboard"))


def check_finite(rec, method, step, epoch):
    """SystemExit naming the step, the method and what to try when a loss of the step's record is not finite
    (a NaN or infinite loss would train on silently and end "done")."""
    bad = {k: rec[k] for k in ("loss", "target_ce", "source_ce", "l2sp", "val_loss") if k in rec
           and not math.isfinite(rec[k])}
    if bad:
        raise SystemExit(f"tlkernels-train: {method}: non-finite loss at step {step} (epoch {epoch}): "
                         + ", ".join(f"{k} = {v}" for k, v in bad.items())
                         + "; try a lower --lr, --amp off (or bf16 instead of fp16), --class_weights none, and check "
                           "--mean/--std and the images; the last checkpoint (last.pt) is from before this step")


@contextlib.contextmanager
def one_image_batches_explained(method, step, n):
    """BatchNorm's "Expected more than 1 value per channel" for a batch of one image, explained."""
    try:
        yield
    except ValueError as e:
        if n == 1 and "Expected more than 1 value per channel" in str(e):
            raise SystemExit(f"tlkernels-train: {method}: step {step + 1} has a batch of one image, and BatchNorm in "
                             f"training mode cannot normalise one image whose feature map is 1 x 1 ({e}); use a "
                             f"larger --batch_size, more training images or a larger --image_size") from None
        raise


def warn_unreadable_classes(ds, unreadable, what, warned=()):
    """Warn when a class keeps no readable image (--skip_bad_images skipped them all), once per class; returns
    the classes warned of."""
    gone = [c for c in data.classes_without_images(ds, unreadable) if c not in warned]
    if gone:
        warnings.warn(f"tlkernels-train: every {what} image of class(es) {', '.join(map(repr, gone))} is unreadable "
                      f"(skipped by --skip_bad_images): the model learns nothing of them", UserWarning, stacklevel=2)
    return set(gone)


class StepValues:
    """The steps' losses kept on the device and read in one transfer every --log_every steps (and wherever the
    loop needs them: epoch ends, evaluations, checkpoints): each read of a device value waits for the GPU's
    queued work, so a read per step would stall every step. Records come back complete, one per step."""

    def __init__(self):
        self.records, self.values = [], []

    def add(self, rec, values):
        """Holds `rec` until the next read; `values` ({key: 0-d tensor or number}) are filled in then."""
        for k, v in values.items():
            rec[k] = None  # (the key's place in the record)
            self.values.append((rec, k, v))
        self.records.append(rec)

    def read(self):
        """The records held since the last read, their values filled in (one device-to-host copy)."""
        ts = [v.detach().reshape(()).to(torch.float64) for _, _, v in self.values if torch.is_tensor(v)]
        got = iter(torch.stack(ts).cpu().tolist() if ts else [])
        for rec, k, v in self.values:
            rec[k] = next(got) if torch.is_tensor(v) else float(v)
        out, self.records, self.values = self.records, [], []
        return out


def summary_rows(history):
    """summary.csv's rows (timm's columns): per epoch, the mean training loss over its steps, the evaluation's
    loss, top-1 and top-5 (empty in an epoch without one), the backbone's learning rate at its end, and with
    --model_ema the average's top-1."""
    epochs = {}
    for h in history:
        epochs.setdefault(h["epoch"], []).append(h)
    rows = []
    for epoch, recs in sorted(epochs.items()):
        losses = [h["loss"] for h in recs if h.get("loss") is not None]
        ev = next((h for h in reversed(recs) if "val_acc" in h), {})
        fmt = (lambda v: "" if v is None else f"{v:.6g}")
        rows.append({"epoch": epoch, "train_loss": fmt(sum(losses) / len(losses) if losses else None),
                     "eval_loss": fmt(ev.get("val_loss")), "eval_top1": fmt(ev.get("val_acc")),
                     "eval_top5": fmt(ev.get("val_top5")), "lr": fmt(recs[-1]["lr"]),
                     **({"ema_eval_top1": fmt(ev.get("ema_val_acc"))} if "ema_val_acc" in ev else {})})
    return rows


def write_summary_csv(history, path):
    """summary.csv from the history (rewritten whole, atomically)."""
    import csv
    import io
    rows = summary_rows(history)
    cols = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    if any("ema_eval_top1" in r for r in rows):
        cols.append("ema_eval_top1")
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


class Progress:
    """The progress bar's figures: loss, running training accuracy over the epoch, the last validation accuracy
    and images per second (all processes)."""

    def __init__(self, world):
        self.world, self.t0, self.images, self.epoch, self.acc = world, time.time(), 0, None, []

    def seen(self, n):
        self.images += n * self.world

    def postfix(self, history, new):
        """The figures after `new` more records of `history` were read."""
        last = history[-1]
        if last["epoch"] != self.epoch:
            self.epoch, self.acc = last["epoch"], []
        self.acc += [h["train_acc"] for h in history[len(history) - new:] if h["epoch"] == self.epoch
                     and h.get("train_acc") is not None]
        val = next((h["val_acc"] for h in reversed(history) if "val_acc" in h), None)
        return {"loss": f"{last.get('loss') if last.get('loss') is not None else float('nan'):.3f}",
                "train_acc": f"{sum(self.acc) / len(self.acc):.3f}" if self.acc else "-",
                "val_acc": f"{val:.3f}" if val is not None else "-",
                "img/s": f"{self.images / max(time.time() - self.t0, 1e-9):.0f}"}


# ----------------------------------------------------------------------------- one method: build
@dataclasses.dataclass
class Training:
    """One method's training state: its recipe, the model (`net`; `model` is what runs the batches: DDP and/or
    torch.compile around it), the penalty, the step plan, the loss, the optimizer side, and the loop's progress."""
    recipe: object
    net: nn.Module
    model: nn.Module
    l2sp: object
    plan: object
    objective: object
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    ema: object
    frozen_bns: list
    steps_per_epoch: int
    total: int
    warmup: int
    step: int = 0
    best: float = -1.0
    accumulated: bool = False  # gradients wait for the next optimizer step (--grad_accum)
    history: list = dataclasses.field(default_factory=list)


def build(run, base, with_l2sp):
    """The method's model from the pre-trained backbone, on the run's device, with its optimizer (scaled groups),
    schedule, loss and the trainer's controls (--sync_bn, --freeze_bn, --model_ema)."""
    from tlkernels.train import optimize
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    rec = recipe(cfg, base, with_l2sp)
    if rec.uses_source and run.source is None:
        raise SystemExit(f"tlkernels-train: method {base!r} needs a source set (--source DIR)")
    net = rec.build(run.backbone, len(run.target.classes), run.source.classes if run.source else None,
                    run.pretrained_classes)
    if cfg.sync_bn and run.world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # (same parameters, new BN modules)
    frozen_bns = optimize.freeze_batchnorm(net, rec.new) if cfg.freeze_bn else []
    net.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    given = run.given()
    l2sp = rec.l2sp(net, given)
    run.net = net
    plan = data.StepPlan(len(run.target.train), cfg.batch_size, cfg.seed, run.rank, run.world, rec.draw_sources,
                         rec.sample_weights)
    spe = plan.steps_per_epoch()
    total, warmup = cfg.epochs * spe, cfg.warmup_epochs * spe
    objective = rec.objective(total, target_loss_options(cfg, run.target, device))
    # (SGD: the L2-SP penalty is the regulariser, no L2 beside it; AdamW exempts what L2-SP penalises itself)
    wd = 0.0 if l2sp is not None and cfg.opt == "sgd" else cfg.weight_decay
    groups = optimize.scaled_groups(rec.param_groups(net, wd), optimize.lr_scales(cfg, net, rec.units, rec.new),
                                    cfg.lr)
    opt = optimize.make_optimizer(cfg, groups, l2sp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: optimize.lr_factor(s, total, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = optimize.ModelEMA(net, cfg.model_ema) if cfg.model_ema else None
    rec.setup(given)
    model = net
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return Training(rec, net, model, l2sp, plan, objective, opt, sched, scaler, ema, frozen_bns, spe, total, warmup)


# ----------------------------------------------------------------------------- one method: checkpoints
def _set_buffers(t, saved):
    for name, buf in t.net.named_buffers():  # also the non-persistent ones (SpotTune's gate-usage counters)
        if name in saved:
            buf.copy_(saved[name])


def _set_grads(t, saved):
    for name, p in t.net.named_parameters():  # gradients accumulated before the interruption (--grad_accum)
        if name in saved:
            p.grad = saved[name].to(p.device)
    t.accumulated = bool(saved)


class Checkpoint:
    """last.pt: what a resumed run needs to continue exactly. FIELDS says, per key, what save() takes from the
    Training and how restore() puts it back: one list for both directions. Loaded with weights_only=True."""
    FIELDS = {
        "model": (lambda t: t.net.state_dict(), lambda t, v: t.net.load_state_dict(v)),
        "optimizer": (lambda t: t.opt.state_dict(), lambda t, v: t.opt.load_state_dict(v)),
        "scheduler": (lambda t: t.sched.state_dict(), lambda t, v: t.sched.load_state_dict(v)),
        "scaler": (lambda t: t.scaler.state_dict(), lambda t, v: t.scaler.load_state_dict(v)),
        "objective": (lambda t: t.objective.state_dict(), lambda t, v: t.objective.load_state_dict(v)),
        "recipe": (lambda t: t.recipe.state(), lambda t, v: t.recipe.load_state(v)),
        "buffers": (lambda t: {k: b.detach().cpu().clone() for k, b in t.net.named_buffers()}, _set_buffers),
        "grads": (lambda t: {k: p.grad.detach().cpu().clone() for k, p in t.net.named_parameters()
                             if p.grad is not None}, _set_grads),
        "ema": (lambda t: t.ema.state_dict() if t.ema is not None else None,
                lambda t, v: t.ema.load_state_dict(v) if t.ema is not None else None),
        "step": (lambda t: t.step, lambda t, v: setattr(t, "step", v)),
        "best": (lambda t: t.best, lambda t, v: setattr(t, "best", v)),
        "history": (lambda t: t.history, lambda t, v: setattr(t, "history", v)),
    }
    OPTIONAL = {"grads": {}, "ema": None}  # (absent from checkpoints of runs without them: their defaults)
    KEYS = (set(FIELDS) - set(OPTIONAL)) | {"method", "config", "rng"}  # (+ whose run, every process's RNGs)

    @classmethod
    def save(cls, path, t, method, cfg, rng):
        atomic_save({"method": method, "config": dataclasses.asdict(cfg), "rng": rng,
                     **{k: get(t) for k, (get, _) in cls.FIELDS.items()}}, path)

    @classmethod
    def load(cls, path, cfg, method):
        """last.pt of an earlier run of the same method and configuration (loaded without unpickling code)."""
        try:
            ck = load(path, "--resume checkpoint")
        except CheckpointError as e:
            raise SystemExit(f"tlkernels-train: {e}; delete it to start over")
        if not isinstance(ck, dict) or not cls.KEYS <= set(ck):
            got = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
            raise SystemExit(f"tlkernels-train: --resume checkpoint {path} is not a tlkernels training checkpoint "
                             f"(expected the keys {sorted(cls.KEYS)}, got {got})")
        if ck["method"] != method:
            raise SystemExit(f"tlkernels-train: --resume: {path} is a checkpoint of method {ck['method']!r}, and this "
                             f"run trains {method!r}; resume it with --method {ck['method']}, or delete it to start "
                             f"over")
        now = dataclasses.asdict(cfg)
        changed = [f"--{k}: checkpoint {v!r}, now {now.get(k)!r}" for k, v in sorted(ck["config"].items())
                   if k not in RESUME_FREE and now.get(k) != v]
        if changed:
            raise SystemExit(f"tlkernels-train: --resume: {path} was written by a run with other options, so "
                             f"resuming would not continue that run; " + "; ".join(changed))
        return ck

    @classmethod
    def restore(cls, ck, t, path, run):
        """Puts the checkpoint's state back into the Training and this process's RNGs."""
        try:
            for k, (_, put) in cls.FIELDS.items():
                put(t, ck.get(k, cls.OPTIONAL[k]) if k in cls.OPTIONAL else ck[k])
            restore_rng(ck["rng"], run.device, run.rank)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise SystemExit(f"tlkernels-train: --resume checkpoint {path} does not fit this run "
                             f"({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------- one method: a step
def train_step(t, run, method, batch, boundary):
    """One batch forward and backward (target images, and source images or targets where the method has them);
    at an accumulation `boundary` the optimizer step (clipped, scaled) and the EMA update. Returns the step's
    values for the metrics record ({} for a batch whose images were all unreadable)."""
    from tlkernels.train import optimize
    cfg, device = run.cfg, run.device
    xt, yt, xs, ys = batch
    values = {}
    if xt is not None:
        xt, yt = run.batch(xt), yt.to(device, non_blocking=True)
        xs, ys = t.recipe.source_batch(xt, xs, ys)
        # (DDP all-reduces the gradients only on the batch that completes an accumulation)
        sync = t.model.no_sync() if run.world > 1 and not boundary else contextlib.nullcontext()
        with sync:
            with run.amp(), one_image_batches_explained(method, t.step, len(xt)):
                if ys is not None:  # with source images, or (distillation) source targets of the target images
                    x_in = xt if xs is None else torch.cat([xt, run.batch(xs)])
                    logits, s_logits = t.model(x_in, len(xt))
                    loss, lt, ls = t.objective.parts(logits, yt, s_logits, ys.to(device, non_blocking=True))
                else:
                    logits = t.model(xt)
                    loss, lt, ls = t.objective.parts(logits, yt)
            t.scaler.scale(loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
        t.accumulated = True
        values = dict(loss=loss, target_ce=lt, source_ce=ls, train_acc=(logits.argmax(1) == yt).float().mean())
    if boundary and t.accumulated:
        optimize.clip_gradients(cfg, t.opt, t.scaler)
        t.scaler.step(t.opt)
        t.scaler.update()
        t.opt.zero_grad(set_to_none=True)
        t.accumulated = False
        if t.ema is not None:
            t.ema.update(t.net)
    with warnings.catch_warnings():  # (the schedule runs per batch: with --grad_accum before a first step)
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        t.sched.step()
    t.objective.step()
    t.step += 1
    return values


# ----------------------------------------------------------------------------- one method: evaluate and save
def evaluate(t, run):
    """The validation record entries: top-1, loss, top-5 (and the EMA's), unreadable images, gate usage."""
    ev = run.evaluate(run.target.val)
    rec = {"val_acc": ev["acc"], "val_loss": ev["loss"], "val_top5": ev["top5"]}
    if ev["skipped"]:
        rec["val_skipped_images"] = ev["skipped"]
    if t.ema is not None:
        ev = run.evaluate(run.target.val, net=t.ema.module)
        rec.update(ema_val_acc=ev["acc"], ema_val_loss=ev["loss"], ema_val_top5=ev["top5"])
    gates = t.recipe.gates(t.net)
    if gates is not None:
        rec["gates"] = gates
    return rec


def finish(t, run, method, out, status, seconds, skipped, val_skipped):
    """summary.json, the exports (model.pt2, plain.pt; the EMA's in ema/) and the plots; returns the summary."""
    final = [h for h in t.history if "val_acc" in h]
    summary = {"method": method, "status": status, "steps": t.step,
               "final_val_acc": final[-1]["val_acc"] if final else None, "best_val_acc": t.best,
               "seconds": round(seconds, 1), "seed": run.cfg.seed, "skipped_images": skipped,
               "val_skipped_images": val_skipped}
    if t.ema is not None:
        summary["ema_final_val_acc"] = final[-1].get("ema_val_acc") if final else None
    if is_main():
        if run.cfg.export and status == "done":
            summary["export"] = export.write(t.net, t.recipe, run, out)
            if t.ema is not None:
                os.makedirs(os.path.join(out, "ema"), exist_ok=True)
                summary["export_ema"] = export.write(t.ema.module, t.recipe, run, os.path.join(out, "ema"))
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(out, "summary.json"))
        plots.curves(t.history, os.path.join(out, "curves.png"), method)
        if final and "gates" in final[-1]:
            plots.gates(final[-1]["gates"], os.path.join(out, "gates.png"), method)
        t.recipe.plots(out)
    return summary


# ----------------------------------------------------------------------------- one method
class Outputs:
    """What one method's run writes as it goes (the main process): metrics.jsonl (one line per step),
    TensorBoard scalars, the progress bar; records arrive complete, at each read of the step values."""

    def __init__(self, run, t, method, out, start):
        from tqdm.auto import tqdm
        cfg = run.cfg
        self.metrics = self.tb = None
        if is_main():  # a fresh run starts the file anew; a resumed one continues the history it resumed
            atomic_write_text("".join(json.dumps(h) + "\n" for h in t.history), os.path.join(out, "metrics.jsonl"))
            self.metrics = open(os.path.join(out, "metrics.jsonl"), "a")
            self.tb = tensorboard_writer(cfg, out)
        self.bar = tqdm(total=t.total, initial=start, desc=method, disable=cfg.quiet or not is_main())
        self.progress = Progress(run.world)

    def write(self, t, method, got):
        for r in got:
            check_finite(r, method, r["step"], r["epoch"])
            t.history.append(r)
            if self.metrics:
                self.metrics.write(json.dumps(r) + "\n")
            if self.tb:
                for k, v in r.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.tb.add_scalar(k, v, r["step"])
        if self.metrics:
            self.metrics.flush()
        self.bar.set_postfix(self.progress.postfix(t.history, len(got)))

    def close(self):
        self.bar.close()
        for f in (self.metrics, self.tb):
            if f:
                f.close()


@dataclasses.dataclass
class Pass:
    """The counters of one method's pass over its steps."""
    start: int                 # the step it started (or resumed) at
    status: str = "done"       # or "interrupted" (--stop_after)
    skipped: int = 0           # unreadable training images (--skip_bad_images)
    val_skipped: int = 0       # unreadable validation images
    unread: set = dataclasses.field(default_factory=set)  # classes with unreadable training images
    warned: set = dataclasses.field(default_factory=set)  # classes already warned about


def one_batch(t, run, method, epoch, batch, p, outs, pending, out):
    """Train on one batch, then what falls on its step: read and write the held records, evaluate, keep the best
    model, save the last checkpoint. Returns True when --stop_after is reached."""
    from tlkernels.train import optimize
    cfg, spe = run.cfg, t.steps_per_epoch
    xt, yt, xs, ys, bad = batch
    p.skipped += bad.count
    p.unread.update(bad.target)
    t.model.train()
    optimize.keep_frozen(t.frozen_bns)
    # an optimizer step every --grad_accum batches, counted from the epoch's start, and at its end
    boundary = (t.step + 1 - epoch * spe) % cfg.grad_accum == 0 or (t.step + 1) % spe == 0
    values = train_step(t, run, method, (xt, yt, xs, ys), boundary)
    if xt is not None:
        outs.progress.seen(len(xt))
    step = t.step
    stop = bool(cfg.stop_after and step - p.start >= cfg.stop_after)
    rec = {"step": step, "epoch": epoch, "lambda": t.objective.lam(),
           "lr": cfg.lr * optimize.lr_factor(step, t.total, t.warmup)}
    read = step % cfg.log_every == 0 or step % spe == 0 or step == t.total or stop
    if t.l2sp is not None and read:  # (a pass over every parameter: only where the losses are read)
        values["l2sp"] = t.l2sp.value()
    pending.add(rec, values)
    epoch_records(t, run, epoch, rec, p)
    if read:  # the held records complete: checked, logged, shown
        outs.write(t, method, pending.read())
    save_points(t, run, method, rec, out, stop)
    outs.bar.update()
    return stop


def epoch_records(t, run, epoch, rec, p):
    """The record entries of an epoch's end and of an evaluation step."""
    step, spe = t.step, t.steps_per_epoch
    if step % spe == 0:
        # (the predictions: on every rank, over the whole target set)
        predictions = run.predict(run.target.train_eval)[2:4] if t.recipe.wants_predictions(epoch) else None
        rec.update(t.recipe.epoch_end(epoch, predictions))
        if p.unread:
            p.warned |= warn_unreadable_classes(run.target.train, p.unread, "training", p.warned)
    if (step % spe == 0 and (epoch + 1) % run.cfg.eval_every == 0) or step == t.total:
        rec.update(evaluate(t, run))
        p.val_skipped = rec.get("val_skipped_images", 0)
    if p.skipped:
        rec["skipped_images"] = p.skipped


def save_points(t, run, method, rec, out, stop):
    """best.pt at a better validation top-1; at an epoch's end, the last step or a stop: the measured choices,
    summary.csv and last.pt."""
    step = t.step
    if "val_acc" in rec and rec["val_acc"] > t.best:
        t.best = rec["val_acc"]
        if is_main():
            atomic_save({"method": method, "model": t.net.state_dict(), "step": step, "val_acc": t.best},
                        os.path.join(out, "best.pt"))
    if step % t.steps_per_epoch == 0 or step == t.total or stop:
        rng = rng_states(run.device, run.world)  # (every rank: a collective)
        if is_main():
            _choices.save(choice_cache(run.cfg))
            write_summary_csv(t.history, os.path.join(out, "summary.csv"))
            Checkpoint.save(os.path.join(out, "last.pt"), t, method, run.cfg, rng)


def train_method(run, method, base, with_l2sp, out):
    """Train one method (its recipe) from the pre-trained backbone; writes its files into `out`.
    Returns (summary dict, history: one record per step)."""
    cfg = run.cfg
    if is_main():
        os.makedirs(out, exist_ok=True)
    t = build(run, base, with_l2sp)
    last_path = os.path.join(out, "last.pt")
    if cfg.resume and os.path.exists(last_path):
        Checkpoint.restore(Checkpoint.load(last_path, cfg, method), t, last_path, run)
        log(f"{method}: resumed at step {t.step}/{t.total}")
    p, outs, pending = Pass(t.step), Outputs(run, t, method, out, t.step), StepValues()
    loader = data.train_loader(run.target, run.source, t.plan, run.workers, run.device)
    t0 = time.time()
    for epoch in range(p.start // t.steps_per_epoch, cfg.epochs):
        t.plan.set_epoch(epoch, skip=t.step - epoch * t.steps_per_epoch)
        if any(one_batch(t, run, method, epoch, batch, p, outs, pending, out) for batch in loader):
            p.status = "interrupted"
            break
    outs.close()
    if p.skipped or p.val_skipped:
        log(f"{method}: skipped {p.skipped} unreadable training and {p.val_skipped} validation image(s) per pass "
            f"(--skip_bad_images)")
    return finish(t, run, method, out, p.status, time.time() - t0, p.skipped, p.val_skipped), t.history


# ----------------------------------------------------------------------------- every method, every seed
def amp_context(cfg, device):
    """A factory of the --amp autocast context on `device` (disabled with --amp off)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def main(argv=None):
    """The trainer: every method of --method/--compare on every seed. Returns {method: {seed: (summary,
    history)}}."""
    cfg = parse_args(argv)
    if cfg.deterministic:
        make_deterministic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_processes(cfg)
    if is_main():
        os.makedirs(cfg.cache_dir, exist_ok=True)
    if not config.get("choice_cache"):  # (set: tlkernels' import has loaded that file)
        _choices.load(choice_cache(cfg))
    seeds, methods = cfg.seed_list(), cfg.methods()
    results = {m: {} for m, _, _ in methods}
    backbone = classes = None
    for seed in seeds:
        scfg = dataclasses.replace(cfg, seed=seed)
        target, source = data.load_data(scfg, seed)
        if backbone is None:
            backbone, classes = pretrained_backbone(scfg, source)
            check_batch_memory(cfg, backbone, device)
        run = Run(scfg, target, source, device, rank, world, data.default_workers(scfg, target), backbone, classes,
                  amp=amp_context(scfg, device))
        for m, base, with_l2sp in methods:
            out = os.path.join(cfg.out_dir, m.replace("+", "_"), *([f"seed{seed}"] if len(seeds) > 1 else []))
            summary, history = train_method(run, m, base, with_l2sp, out)
            results[m][seed] = (summary, history)
            log(f"{m} (seed {seed}): final val acc {summary['final_val_acc']:.4f}, best {summary['best_val_acc']:.4f}, "
                f"{summary['seconds']} s" if summary["final_val_acc"] is not None else f"{m}: {summary['status']}")
    done = all(s["final_val_acc"] is not None for runs in results.values() for s, _ in runs.values())
    if is_main() and (len(methods) > 1 or len(seeds) > 1) and done:
        print(compare.write(cfg, results, cfg.out_dir))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results
