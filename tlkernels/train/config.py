"""The trainer's options: one dataclass field each (flag `--name value`, or a key of a JSON `--config` file;
flags win), with its help text and choices, and the checks that turn a bad value into a clear error."""
import argparse
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field

METHODS = {
    "finetune": "standard fine-tuning: every layer trained from the pre-trained weights, a new head",
    "l2sp": "fine-tuning + alpha/2 ||w - w0||^2 on pre-trained weights, beta/2 ||w||^2 on the new head (Li et al. 2018)",
    "soft": "fine-tuning + lambda(t) x source-task loss on source images, lambda decaying to 0",
    "selective": "joint training with the source images nearest to each target image by filter-bank histograms, "
                 "hard target images mined for more neighbours (Ge & Yu 2017)",
    "adafilter": "per image and filter, an LSTM gate picks the fine-tuned or the frozen filter (Guo et al. 2020)",
    "spottune": "per image and residual block, a policy net picks the fine-tuned or the frozen block (Guo et al. 2019)",
    "spottune_global": "SpotTune-Global: one learned fine-tuned/frozen choice per block for the data set "
                       "(optionally --spottune_budget blocks); trained, a plain network",
}


def option(default, help, choices=None, acts=None):
    """A Config field with its --help text, for string options its choices, and `acts`: the key in ACTS of
    the runs it acts in (None: every run). An option set away from its default in a run it does not act in
    draws a warning naming it."""
    return field(default=default, metadata={"help": help, "choices": choices, "acts": acts})


def world_size():
    """Processes of this run: torchrun's WORLD_SIZE (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# When an option acts: (test on the Config, what the option needs, said in the warning).
ACTS = {
    "target": (lambda c: bool(c.target), "--target image folders (the demo has its own data and backbone)"),
    "demo": (lambda c: not c.target, "the embedded demo (without --target)"),
    "pretrain": (lambda c: not c.target and not c.checkpoint, "the demo's own pre-training (without --target "
                                                               "or --checkpoint)"),
    "source_set": (lambda c: not c.target or uses_source_images(c), "the demo's pre-training or a run that reads "
                                                                     "source images"),
    "l2sp": (lambda c: any(l2 for _, _, l2 in c.methods()), "a method with the L2-SP penalty (l2sp or METHOD+l2sp)"),
    "soft": (lambda c: any(b == "soft" for _, b, _ in c.methods()), "--method soft"),
    "selective": (lambda c: any(b == "selective" for _, b, _ in c.methods()), "--method selective"),
    "entropy": (lambda c: any(b == "selective" for _, b, _ in c.methods()) and c.selective_hardness == "entropy",
                "--method selective with --selective_hardness entropy"),
    "adafilter": (lambda c: any(b == "adafilter" for _, b, _ in c.methods()), "--method adafilter"),
    "spottune": (lambda c: any(b.startswith("spottune") for _, b, _ in c.methods()),
                 "--method spottune or spottune_global"),
    "spottune_policy": (lambda c: any(b == "spottune" for _, b, _ in c.methods()), "--method spottune"),
    "spottune_global": (lambda c: any(b == "spottune_global" for _, b, _ in c.methods()), "--method spottune_global"),
    "source": (lambda c: uses_source_images(c), "a run that reads source images (soft with --soft_source images, "
                                                 "selective, or --l2sp_fisher with an L2-SP method)"),
    "single": (lambda c: not c.compare, "a run without --compare"),
    "one_seed": (lambda c: not c.seeds, "a run without --seeds"),
    "sgd": (lambda c: c.opt == "sgd", "--opt sgd"),
    "ddp": (lambda c: world_size() > 1, "several processes (torchrun)"),
}


def uses_source_images(cfg):
    """True when some method of the run reads images of the source set: its recipe draws them, or L2-SP-Fisher
    estimates the source task's Fisher information on them."""
    from tlkernels.train.recipes import recipe
    return any(recipe(cfg, b, l2).uses_source or (l2 and cfg.l2sp_fisher > 0) for _, b, l2 in cfg.methods())


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs():
    """The recipes shipped with tlkernels (tlkernels/train/configs/NAME.json): {NAME: path}."""
    return {f[:-5]: os.path.join(CONFIGS, f) for f in sorted(os.listdir(CONFIGS)) if f.endswith(".json")}


@dataclass
class Config:
    """Every option of the trainer (flag --name, or key of the --config JSON file)."""
    method: str = option("finetune", "the method (see the list below); '+l2sp' adds the L2-SP penalty, e.g. adafilter+l2sp",
                       acts="single")
    compare: str = option("", "comma-separated methods trained on the same split and seeds, then compared "
                           "(comparison.md, comparison.png)")
    seeds: str = option("", "comma-separated seeds: every method on every seed, mean +- std in comparison.md "
                         "(empty: --seed alone)")
    seed: int = option(0, "random seed: same seed, same numbers (and, for the demo, the same target split)", acts="one_seed")
    target: str = option("", "ImageFolder root with train/<class>/* and val/<class>/* (empty: the embedded demo)")
    source: str = option("", "ImageFolder root of the source set, train/ and val/ (soft, selective; empty: the demo's)",
                       acts="source")
    arch: str = option("resnet18", "the pre-trained model for --target data: any torchvision classification model, or "
                                "timm/NAME (timm:NAME) for a timm model", acts="target")
    checkpoint: str = option("", "pre-trained state_dict of --arch instead of torchvision's weights (with the demo: of its "
                               "ResNet-18 instead of the cached pre-training)")
    image_size: int = option(224, "--target data: training RandomResizedCrop and validation CenterCrop size", acts="target")
    mean: str = option("", "normalisation mean, comma-separated per channel (default: the pre-trained weights' "
                        "metadata; ImageNet's with --checkpoint)")
    std: str = option("", "normalisation std, comma-separated per channel (default: as --mean)")
    skip_bad_images: bool = option(False, "count and skip unreadable images instead of stopping with an error naming them",
                                acts="target")
    workers: int = option(-1, "DataLoader worker processes (-1: 0 for the in-memory demo, else min(8, cores))")
    device: str = option("auto", "auto (CUDA when available; cuda:LOCAL_RANK under torchrun), cpu, cuda or cuda:N")
    amp: str = option("off", "mixed precision: autocast in bf16 or fp16 (fp16 with a gradient scaler)",
                   ("off", "bf16", "fp16"))
    channels_last: bool = option(False, "model and batches in channels_last memory format")
    compile: bool = option(False, "torch.compile the model (the tlkernels ops have fake kernels)")
    out_dir: str = option("runs/demo", "metrics, checkpoints, plots and exports go to out_dir/<method>/")
    cache_dir: str = option("", "pre-trained demo model and descriptor caches (default: out_dir/cache)")
    epochs: int = option(30, "passes over the target training set")
    eval_every: int = option(5, "validate every N epochs (and after the last)")
    batch_size: int = option(32, "images per step and process (global batch: batch_size x processes, as timm)")
    opt: str = option("sgd", "optimizer, both with the fused L2-SP step: SGD with momentum, or AdamW (decoupled weight "
                          "decay; try --lr 1e-3 --weight_decay 0.05)", ("sgd", "adamw"))
    lr: float = option(0.02, "learning rate of the backbone (after --warmup_epochs: cosine decay to 0)")
    momentum: float = option(0.9, "SGD momentum", acts="sgd")
    weight_decay: float = option(1e-4, "weight decay (SGD: L2 in the gradient; AdamW: decoupled); none on the tensors "
                                    "L2-SP penalises")
    head_lr_mult: float = option(1.0, "the new head's learning rate over the backbone's (fine-tuning recipes often "
                                   "train the head 10x faster: 10)")
    warmup_epochs: int = option(0, "epochs of linear learning-rate warm-up before the cosine decay")
    layer_decay: float = option(1.0, "layer-wise learning-rate decay: the backbone's unit at depth d of D (stem 0, "
                                  "each residual block, or each convolution where the model has no blocks) trains at "
                                  "lr x layer_decay^(D + 1 - d); the head and the methods' new modules at lr "
                                  "(1: off; timm's recipes use 0.65-0.8)")
    clip_grad: float = option(0.0, "clip the gradients' global norm to this value (0: off)")
    grad_accum: int = option(1, "accumulate the gradients of N batches per optimizer step (effective batch "
                             "batch_size x N x processes)")
    model_ema: float = option(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999; "
                                "warm-up: min(decay, (1 + t) / (10 + t)) at step t), validated beside the model and "
                                "exported as ema/ (0: off)")
    freeze_bn: bool = option(False, "BatchNorm statistics and affine parameters of the pre-trained network stay as "
                                 "they are (small target batches)")
    sync_bn: bool = option(False, "under torchrun on GPUs, BatchNorm statistics over the global batch "
                               "(torch.nn.SyncBatchNorm)", acts="ddp")
    l2sp_alpha: float = option(0.1, "L2-SP: pull of the pre-trained weights toward their start (paper: 0.1)", acts="l2sp")
    l2sp_beta: float = option(0.01, "L2-SP: plain L2 on the new head (paper: 0.01)", acts="l2sp")
    l2sp_fisher: int = option(0, "L2-SP-Fisher: weigh each element by the source task's Fisher diagonal, estimated "
                              "on this many source images (0: plain L2-SP)", acts="l2sp")
    label_smoothing: float = option(0.0, "target loss label smoothing, in [0, 1] (timm's recipes use 0.1)")
    class_weights: str = option("none", "target loss class weights: balanced = n / (classes x count) per class",
                             ("none", "balanced"))
    soft_schedule: str = option("cosine", "soft: lambda(t) schedule", ("linear", "cosine", "exponential", "step"), "soft")
    soft_lambda0: float = option(1.0, "soft: source-loss weight at the start", acts="soft")
    soft_source: str = option("images", "soft: the source loss on source images and labels, or distillation: the "
                                     "frozen pre-trained model's softmax on the target images", ("images", "distill"),
                             "soft")
    selective_k: int = option(50, "selective: source neighbours per target image at level 1", acts="selective")
    selective_rounds: int = option(3, "selective: training rounds; after each but the last, hard target images "
                                   "climb a level (k x level neighbours, sampled level times as often)", acts="selective")
    selective_max_level: int = option(10, "selective: highest sampling level", acts="selective")
    selective_hardness: str = option("misclassified", "selective: which target images are hard after a round "
                                  "(misclassified, or prediction entropy above --selective_entropy_quantile)",
                                  ("misclassified", "entropy"), "selective")
    selective_entropy_quantile: float = option(0.8, "selective: entropy quantile above which an image is hard",
                                             acts="entropy")
    selective_bank: str = option("gabor", "selective: descriptor filters: a Gabor bank, or the pre-trained model's "
                                       "first two conv layers (pre-activation, the paper's default)", ("gabor", "model"),
                               "selective")
    selective_bins: int = option(32, "selective: histogram bins per filter channel", acts="selective")
    selective_memory_gb: float = option(2.0, "selective: GiB the source search's buffers may take (the source "
                                        "descriptors are streamed from their store in chunks that fit)",
                                        acts="selective")
    adafilter_hidden: int = option(32, "AdaFilter: LSTM width", acts="adafilter")
    spottune_tau: float = option(5.0, "SpotTune: Gumbel-softmax temperature", acts="spottune")
    policy_lr: float = option(0.01, "SpotTune: policy network (SpotTune-Global: block logits) learning rate",
                            acts="spottune")
    spottune_budget: int = option(0, "SpotTune-Global: exactly this many fine-tuned blocks (0: no budget)",
                                acts="spottune_global")
    spottune_policy: str = option("official", "SpotTune: the official code's policy network, or a torchvision-style "
                                           "ResNet policy (conv shortcuts)", ("official", "resnet"),
                                 "spottune_policy")
    pretrain_epochs: int = option(2, "demo: epochs of source pre-training (cached)", acts="pretrain")
    target_per_class: int = option(10, "demo: training images per class of the target set", acts="demo")
    source_limit: int = option(0, "use only the first N source images (0: all)", acts="source_set")
    val_limit: int = option(0, "evaluate on N validation images, evenly spaced through the validation set (every "
                               "class of a class-ordered set is kept; 0: all)")
    resume: bool = option(False, "continue out_dir/<method>/last.pt exactly where it stopped (on a GPU exactly with "
                              "--deterministic: cuDNN's fastest algorithms are not deterministic)")
    deterministic: bool = option(False, "deterministic cuDNN/cuBLAS algorithms (torch.use_deterministic_algorithms): "
                                     "a GPU run repeats exactly, resumed or not; slower")
    stop_after: int = option(0, "stop after this many steps (checkpoint saved), as an interruption would (0: off)")
    export: bool = option(True, "write model.pt2 (torch.export) and, where the model is plain, plain.pt")
    tensorboard: bool = option(False, "also log to out_dir/<method>/tensorboard (needs the tensorboard package)")
    log_every: int = option(10, "read the steps' losses from the device every N steps (a read waits for the GPU); "
                             "metrics.jsonl still has one record per step, L2-SP's value on the steps read")
    quiet: bool = option(False, "no progress bars")
    threads: int = option(0, "torch threads (0: torch's default)")
    config: str = option("", "JSON file with any of these options, or the name of a recipe shipped in "
                             f"tlkernels/train/configs/: {', '.join(shipped_configs())}")

    def methods(self):
        """The methods to train, each parsed once: [(name as given, base method, with L2-SP)]."""
        names = [m for m in self.compare.split(",") if m] or [self.method]
        return [(m, m.partition("+")[0], m.partition("+")[2] == "l2sp" or m == "l2sp") for m in names]

    def seed_list(self):
        """The seeds to run: --seeds, else [--seed]."""
        return [int(s) for s in self.seeds.split(",") if s.strip()] or [self.seed]

    def floats(self, name):
        """A comma-separated option (--mean, --std) as floats, or None when it is empty."""
        return [float(v) for v in getattr(self, name).split(",") if v.strip()] or None


def _type_name(f):
    return f.type if isinstance(f.type, str) else f.type.__name__


def _epilog():
    lines = ["methods:"] + [f"  {m:<10} {text}" for m, text in METHODS.items()]
    lines += ["", "examples:",
              "  python -m tlkernels.train --compare finetune,l2sp,soft,selective,adafilter,spottune --seeds 0,1",
              "  python -m tlkernels.train --method spottune --target data/birds --device cuda --amp bf16 --workers 8",
              "  torchrun --nproc_per_node=4 -m tlkernels.train --method selective --target data/birds "
              "--source data/imagenet_subset --amp bf16"]
    return "\n".join(lines)


def parser():
    """The argparse parser: one flag per Config field, help with default and choices, methods in the epilog."""
    ap = argparse.ArgumentParser(prog="python -m tlkernels.train",
                                 description="tlkernels reference trainer: the five adaptive fine-tuning methods "
                                             "through the tlkernels kernels.",
                                 epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        help_ = f.metadata["help"] + f" (default: {f.default!r})"
        if _type_name(f) == "bool":
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}[_type_name(f)]
            ap.add_argument(f"--{f.name}", type=typ, default=None, choices=f.metadata["choices"], help=help_,
                            metavar=None if f.metadata["choices"] else _type_name(f).upper())
    return ap


def _read_config_file(ap, path):
    """The options of --config PATH, or of a shipped recipe's NAME when no file PATH exists."""
    if not os.path.exists(path) and path in shipped_configs():
        path = shipped_configs()[path]
    elif not os.path.exists(path) and os.sep not in path and not path.endswith(".json"):
        ap.error(f"--config {path}: no such file, and not a shipped recipe ({', '.join(shipped_configs())})")
    try:
        with open(path) as fh:
            values = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"--config {path}: {e}")
    if not isinstance(values, dict):
        ap.error(f"--config {path}: expected a JSON object of options (e.g. {{\"epochs\": 10}}), "
                 f"got a JSON {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for k, v in values.items():
        if k not in fields:
            ap.error(f"--config {path}: unknown option {k!r}")
        tname = _type_name(fields[k])
        want = {"int": int, "float": (int, float), "str": str, "bool": bool}[tname]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            ap.error(f"--config {path}: option {k!r} must be {tname}, got {v!r}")
        if fields[k].metadata["choices"] and v not in fields[k].metadata["choices"]:
            ap.error(f"--config {path}: option {k!r} must be one of {', '.join(fields[k].metadata['choices'])}, "
                     f"got {v!r}")
    return values


# Numeric options: (names, lowest allowed, whether the bound is excluded, what 0 means where it is allowed).
RANGES = [
    (("epochs", "eval_every", "batch_size", "selective_k", "selective_bins", "target_per_class", "pretrain_epochs",
      "image_size", "selective_rounds", "selective_max_level", "adafilter_hidden", "log_every", "grad_accum"), 1,
     False, None),
    (("source_limit", "val_limit"), 0, False, "all"),
    (("stop_after", "threads", "spottune_budget", "l2sp_fisher", "warmup_epochs"), 0, False, "off"),
    (("clip_grad",), 0.0, False, "off"),
    (("lr", "spottune_tau", "head_lr_mult", "selective_memory_gb"), 0.0, True, None),
    (("weight_decay", "l2sp_alpha", "l2sp_beta", "soft_lambda0", "policy_lr"), 0.0, False, None),
]


def _comma_list(ap, cfg, name, example, convert):
    """A comma-separated option as a list; ap.error on a bad or repeated entry."""
    raw = getattr(cfg, name)
    try:
        vals = [convert(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--{name} must be {example}, got {raw!r}")
    twice = sorted({v for v in vals if vals.count(v) > 1})
    if twice and name in ("seeds", "compare"):
        ap.error(f"--{name} lists {', '.join(map(str, twice))} more than once, got {raw!r}")
    return vals


def _check_dir(ap, name, path):
    """--out_dir / --cache_dir: a directory, or a path where one can be made, that can be written."""
    from tlkernels._io import unwritable
    why = unwritable(path, directory=True)
    if why:
        ap.error(f"--{name} {path}: {why}")


def check(ap, cfg, given=()):
    """Exits through ap.error with a message naming the option for any value the trainer cannot use; warns
    (UserWarning) about options in `given` (the ones the user set) set away from their default in a run where
    they do nothing."""
    for m, base, _ in cfg.methods():
        if base not in METHODS or m.partition("+")[2] not in ("", "l2sp"):
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)} (optionally with +l2sp)")
    _comma_list(ap, cfg, "compare", "comma-separated methods", str)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name, f in fields.items():
        if _type_name(f) == "float" and not math.isfinite(getattr(cfg, name)):
            ap.error(f"--{name} must be a finite number, got {getattr(cfg, name)}")
    if not 0.0 < cfg.selective_entropy_quantile < 1.0:
        ap.error(f"--selective_entropy_quantile must be in (0, 1), got {cfg.selective_entropy_quantile}")
    if not 0.0 <= cfg.label_smoothing <= 1.0:
        ap.error(f"--label_smoothing must be in [0, 1], got {cfg.label_smoothing}")
    if not 0.0 <= cfg.momentum < 1.0:
        ap.error(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not 0.0 < cfg.layer_decay <= 1.0:
        ap.error(f"--layer_decay must be in (0, 1] (1: off), got {cfg.layer_decay}")
    if not 0.0 <= cfg.model_ema < 1.0:
        ap.error(f"--model_ema must be in [0, 1) (0: off), got {cfg.model_ema}")
    if cfg.warmup_epochs >= cfg.epochs > 0:
        ap.error(f"--warmup_epochs must be less than --epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    for names, low, strict, zero in RANGES:
        for name in names:
            v = getattr(cfg, name)
            if v < low or (strict and v == low):
                bound = f"> {low}" if strict else f">= {low}" + (f" (0: {zero})" if zero else "")
                ap.error(f"--{name} must be {bound}, got {v}")
    if cfg.workers < -1:
        ap.error(f"--workers must be >= 0, or -1 for the default, got {cfg.workers}")
    _comma_list(ap, cfg, "seeds", "comma-separated integers, e.g. 0,1,2", int)
    for name in ("mean", "std"):
        vals = _comma_list(ap, cfg, name, "comma-separated numbers, e.g. 0.485,0.456,0.406", float)
        if not all(math.isfinite(v) for v in vals):
            ap.error(f"--{name} must be finite numbers, got {getattr(cfg, name)!r}")
        if vals and name == "std" and min(vals) <= 0:
            ap.error(f"--std must be > 0 per channel, got {getattr(cfg, name)!r}")
    if cfg.source and not cfg.target:
        ap.error("--source needs --target")
    if (cfg.mean or cfg.std) and not cfg.target:
        ap.error("--mean/--std apply to --target image folders (the demo's tensors are not normalised)")
    if cfg.device not in ("auto", "cpu", "cuda") and not (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()):
        ap.error(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.target:
        from tlkernels.train.backbones import arch_problem
        problem = arch_problem(cfg.arch)
        if problem:
            ap.error(f"--arch {problem}")
    for name in ("out_dir", "cache_dir"):
        if getattr(cfg, name):
            _check_dir(ap, name, getattr(cfg, name))
    unused = []
    for name in given:
        acts = fields[name].metadata["acts"]
        if acts and getattr(cfg, name) != fields[name].default and not ACTS[acts][0](cfg):
            unused.append(f"--{name} acts only with {ACTS[acts][1]}")
    if unused:
        warnings.warn("tlkernels-train: options that do nothing in this run: " + "; ".join(unused), UserWarning,
                      stacklevel=3)


def parse_args(argv=None):
    """Config from the command line (argv, default sys.argv) and --config; flags win over the file."""
    ap = parser()
    ns = ap.parse_args(argv)
    values = _read_config_file(ap, ns.config) if ns.config else {}
    values.update({k: v for k, v in vars(ns).items() if v is not None})
    cfg = Config(**values)
    check(ap, cfg, given=values)
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    return cfg
