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

from tlkernels import _choices
from tlkernels._io import CheckpointError, atomic_save, atomic_write_text, load
from tlkernels.train import compare, data, export, plots
from tlkernels.train.config import parse_args
from tlkernels.train.recipes import recipe


# ----------------------------------------------------------------------------- devices and processes
def choice_cache(cfg):
    """The job's measured strategy choices (tlkernels/_choices.py): TLKERNELS_CHOICE_CACHE, else
    cache_dir/choices.json. Loaded at start and saved with every checkpoint, so that a resumed or repeated run
    on this host takes the strategies the first one measured: their rounding differs, and with them a resumed
    run in a new process matches the uninterrupted one."""
    return os.environ.get(_choices.ENV) or os.path.join(cfg.cache_dir, "choices.json")


def setup_processes(cfg):
    """(rank, world, device). Under torchrun each process takes cuda:LOCAL_RANK (NCCL) or the CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
CHECKPOINT_KEYS = {"method", "model", "optimizer", "scheduler", "scaler", "objective", "recipe", "rng", "step",
                   "best", "history", "config", "buffers"}


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


def load_resume_checkpoint(path, cfg, method):
    """last.pt of an earlier run of the same method and configuration (loaded without unpickling code)."""
    try:
        ck = load(path, "--resume checkpoint")
    except CheckpointError as e:
        raise SystemExit(f"tlkernels-train: {e}; delete it to start over")
    if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= set(ck):
        got = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise SystemExit(f"tlkernels-train: --resume checkpoint {path} is not a tlkernels training checkpoint "
                         f"(expected the keys {sorted(CHECKPOINT_KEYS)}, got {got})")
    if ck["method"] != method:
        raise SystemExit(f"tlkernels-train: --resume: {path} is a checkpoint of method {ck['method']!r}, and this run "
                         f"trains {method!r}; resume it with --method {ck['method']}, or delete it to start over")
    now = dataclasses.asdict(cfg)
    changed = [f"--{k}: checkpoint {v!r}, now {now.get(k)!r}" for k, v in sorted(ck["config"].items())
               if k not in RESUME_FREE and now.get(k) != v]
    if changed:
        raise SystemExit(f"tlkernels-train: --resume: {path} was written by a run with other options, so resuming "
                         f"would not continue that run; " + "; ".join(changed))
    return ck


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


# ----------------------------------------------------------------------------- one method
def train_method(run, method, base, with_l2sp, out):
    """Train one method (its recipe) from the pre-trained backbone; writes its files into `out`.
    Returns (summary dict, history: one record per step)."""
    from tqdm.auto import tqdm
    from tlkernels.train import optimize
    cfg, device = run.cfg, run.device
    if is_main():
        os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rec_ = recipe(cfg, base, with_l2sp)
    if rec_.uses_source and run.source is None:
        raise SystemExit(f"tlkernels-train: method {base!r} needs a source set (--source DIR)")
    net = rec_.build(run.backbone, len(run.target.classes), run.source.classes if run.source else None,
                     run.pretrained_classes)
    if cfg.sync_bn and run.world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # (same parameters, new BN modules)
    frozen_bns = optimize.freeze_batchnorm(net, rec_.new) if cfg.freeze_bn else []
    net.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    l2sp = rec_.l2sp(net, run)
    run.net = net
    plan = data.StepPlan(len(run.target.train), cfg.batch_size, cfg.seed, run.rank, run.world, rec_.draw_sources,
                         rec_.sample_weights)
    spe = plan.steps_per_epoch()
    total, warmup, accum = cfg.epochs * spe, cfg.warmup_epochs * spe, cfg.grad_accum
    objective = rec_.objective(total, target_loss_options(cfg, run.target, device))
    # (SGD: the L2-SP penalty is the regulariser, no L2 beside it; AdamW exempts what L2-SP penalises itself)
    wd = 0.0 if l2sp is not None and cfg.opt == "sgd" else cfg.weight_decay
    groups = optimize.scaled_groups(rec_.param_groups(net, wd), optimize.lr_scales(cfg, net, rec_.units, rec_.new),
                                    cfg.lr)
    opt = optimize.make_optimizer(cfg, groups, l2sp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: optimize.lr_factor(s, total, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = optimize.ModelEMA(net, cfg.model_ema) if cfg.model_ema else None
    rec_.setup(run)
    model = net
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    start, best, history = 0, -1.0, []
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if cfg.resume and os.path.exists(last_path):
        ck = load_resume_checkpoint(last_path, cfg, method)
        try:
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            objective.load_state_dict(ck["objective"])
            rec_.load_state(ck["recipe"])
            for name, buf in net.named_buffers():  # also the non-persistent ones (SpotTune's gate-usage counters)
                if name in ck["buffers"]:
                    buf.copy_(ck["buffers"][name])
            for name, p in net.named_parameters():  # gradients accumulated before the interruption
                if name in ck.get("grads", {}):
                    p.grad = ck["grads"][name].to(p.device)
            if ema is not None:
                ema.load_state_dict(ck["ema"])
            restore_rng(ck["rng"], device, run.rank)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise SystemExit(f"tlkernels-train: --resume checkpoint {last_path} does not fit this run "
                             f"({type(e).__name__}: {e})")
        start, best, history = ck["step"], ck["best"], ck["history"]
        log(f"{method}: resumed at step {start}/{total}")
    metrics = tb = None
    if is_main():  # a fresh run starts the file anew; a resumed one continues the history it resumed
        atomic_write_text("".join(json.dumps(h) + "\n" for h in history), os.path.join(out, "metrics.jsonl"))
        metrics = open(os.path.join(out, "metrics.jsonl"), "a")
        tb = tensorboard_writer(cfg, out)
    loader = data.train_loader(run.target, run.source, plan, run.workers, device)
    bar = tqdm(total=total, initial=start, desc=method, disable=cfg.quiet or not is_main())
    progress = Progress(run.world)
    t0, status, step, skipped, val_skipped, unread, warned = time.time(), "done", start, 0, 0, set(), set()
    pending = StepValues()
    have_grads = any(p.grad is not None for p in net.parameters())
    for epoch in range(start // spe, cfg.epochs):
        plan.set_epoch(epoch, skip=step - epoch * spe)
        for xt, yt, xs, ys, bad in loader:
            skipped += bad.count
            unread.update(bad.target)
            model.train()
            optimize.keep_frozen(frozen_bns)
            # an optimizer step every --grad_accum batches, counted from the epoch's start, and at its end
            boundary = (step + 1 - epoch * spe) % accum == 0 or (step + 1) % spe == 0
            if xt is not None:
                xt, yt = run.batch(xt), yt.to(device, non_blocking=True)
                xs, ys = rec_.source_batch(run, xt, xs, ys)
                # (DDP all-reduces the gradients only on the batch that completes an accumulation)
                sync = model.no_sync() if run.world > 1 and not boundary else contextlib.nullcontext()
                with sync:
                    with run.amp(), one_image_batches_explained(method, step, len(xt)):
                        if ys is not None:  # with source images, or (distillation) source targets of the targets
                            x_in = xt if xs is None else torch.cat([xt, run.batch(xs)])
                            logits, s_logits = model(x_in, len(xt))
                            loss, lt, ls = objective.parts(logits, yt, s_logits, ys.to(device, non_blocking=True))
                        else:
                            logits = model(xt)
                            loss, lt, ls = objective.parts(logits, yt)
                    scaler.scale(loss / accum if accum > 1 else loss).backward()
                have_grads = True
                progress.seen(len(xt))
            if boundary and have_grads:
                optimize.clip_gradients(cfg, opt, scaler)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                have_grads = False
                if ema is not None:
                    ema.update(net)
            with warnings.catch_warnings():  # (the schedule runs per batch: with --grad_accum before a first step)
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                sched.step()
            objective.step()
            step += 1
            stop = cfg.stop_after and step - start >= cfg.stop_after
            rec = {"step": step, "epoch": epoch, "lambda": objective.lam(),
                   "lr": cfg.lr * optimize.lr_factor(step, total, warmup)}
            read = step % cfg.log_every == 0 or step % spe == 0 or step == total or stop
            values = {}
            if xt is not None:
                values = dict(loss=loss, target_ce=lt, source_ce=ls, train_acc=(logits.argmax(1) == yt).float().mean())
            if l2sp is not None and read:  # (a pass over every parameter: only where the losses are read)
                values["l2sp"] = l2sp.value()
            pending.add(rec, values)
            if step % spe == 0:
                rec.update(rec_.epoch_end(run, epoch))
                if unread:
                    warned |= warn_unreadable_classes(run.target.train, unread, "training", warned)
            if (step % spe == 0 and (epoch + 1) % cfg.eval_every == 0) or step == total:
                ev = run.evaluate(run.target.val)
                acc, val_skipped = ev["acc"], ev["skipped"]
                rec.update(val_acc=acc, val_loss=ev["loss"], val_top5=ev["top5"])
                if val_skipped:
                    rec["val_skipped_images"] = val_skipped
                if ema is not None:
                    ev = run.evaluate(run.target.val, net=ema.module)
                    rec.update(ema_val_acc=ev["acc"], ema_val_loss=ev["loss"], ema_val_top5=ev["top5"])
                gates = rec_.gates(net)
                if gates is not None:
                    rec["gates"] = gates
            if skipped:
                rec["skipped_images"] = skipped
            if read:
                got = pending.read()
                for r in got:
                    check_finite(r, method, r["step"], r["epoch"])
                    history.append(r)
                    if metrics:
                        metrics.write(json.dumps(r) + "\n")
                    if tb:
                        for k, v in r.items():
                            if isinstance(v, (int, float)) and k != "step":
                                tb.add_scalar(k, v, r["step"])
                if metrics:
                    metrics.flush()
                bar.set_postfix(progress.postfix(history, len(got)))
            if "val_acc" in rec and acc > best:
                best = acc
                if is_main():
                    atomic_save({"method": method, "model": net.state_dict(), "step": step, "val_acc": acc}, best_path)
            bar.update()
            save_last = step % spe == 0 or step == total or stop
            if save_last:
                rng = rng_states(device, run.world)  # (every rank: a collective)
            if save_last and is_main():
                _choices.save(choice_cache(cfg))
                write_summary_csv(history, os.path.join(out, "summary.csv"))
                atomic_save({"method": method, "model": net.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                             "objective": objective.state_dict(), "recipe": rec_.state(), "rng": rng, "step": step,
                             "buffers": {k: b.detach().cpu().clone() for k, b in net.named_buffers()},
                             "grads": {k: p.grad.detach().cpu().clone() for k, p in net.named_parameters()
                                       if p.grad is not None},
                             "ema": ema.state_dict() if ema is not None else None,
                             "best": best, "history": history, "config": dataclasses.asdict(cfg)}, last_path)
            if stop:
                status = "interrupted"
                break
        if status == "interrupted":
            break
    bar.close()
    if metrics:
        metrics.close()
    if tb:
        tb.close()
    if skipped or val_skipped:
        log(f"{method}: skipped {skipped} unreadable training and {val_skipped} validation image(s) per pass "
            f"(--skip_bad_images)")
    final = [h for h in history if "val_acc" in h]
    summary = {"method": method, "status": status, "steps": step, "final_val_acc": final[-1]["val_acc"] if final else None,
               "best_val_acc": best, "seconds": round(time.time() - t0, 1), "seed": cfg.seed,
               "skipped_images": skipped, "val_skipped_images": val_skipped}
    if ema is not None:
        summary["ema_final_val_acc"] = final[-1].get("ema_val_acc") if final else None
    if is_main():
        if cfg.export and status == "done":
            summary["export"] = export.write(net, rec_, run, out)
            if ema is not None:
                os.makedirs(os.path.join(out, "ema"), exist_ok=True)
                summary["export_ema"] = export.write(ema.module, rec_, run, os.path.join(out, "ema"))
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(out, "summary.json"))
        plots.curves(history, os.path.join(out, "curves.png"), method)
        if final and "gates" in final[-1]:
            plots.gates(final[-1]["gates"], os.path.join(out, "gates.png"), method)
        rec_.plots(run, out)
    return summary, history


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
    if not os.environ.get(_choices.ENV):  # (set: tlkernels' import has loaded that file)
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
