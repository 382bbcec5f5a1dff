"""Source-image selection for selective joint fine-tuning (Ge & Yu, CVPR 2017).

    sel = SourceSelector(gabor_bank(), bins=100, cache_dir="cache/")
    sel.fit(target_train)                      # equal-mass bin edges on the target set
    sel.describe(target_train, name="target")  # (N_t, channels*bins) descriptors, cached on disk
    sel.describe(source_train, name="source")
    nbrs = sel.select(k=300)                   # K nearest source images of each target image (weighted sym. KL)
    sel.grow(hard_target_indices, levels=2)    # hard target images get more neighbours
    joint = JointDataset(target_train, source_train, sel.neighbours())
"""
import hashlib
import os
import warnings

import torch
from torch.utils.data import DataLoader, Dataset

from tlkernels._io import atomic_save, load
from tlkernels.ops.bins import fit_bin_edges
from tlkernels.ops.histogram import filterbank_histogram
from tlkernels.ops.knn import knn_search

CACHE_FORMAT = "tlkernels-descriptors"
CACHE_VERSION = 1


def dataset_fingerprint(dataset):
    """A digest of what `dataset` holds, so that a descriptor cache is never reused for other images:
    in-memory tensors by their bytes, image folders by every file's path, size and modification time,
    subsets by their indices and parent, and any other dataset by the bytes of every item."""
    from torchvision.datasets import DatasetFolder
    h = hashlib.sha256()
    if isinstance(dataset, torch.utils.data.TensorDataset):
        for t in dataset.tensors:
            h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(dataset, torch.utils.data.Subset):
        h.update(torch.as_tensor(list(dataset.indices), dtype=torch.long).numpy().tobytes())
        h.update(dataset_fingerprint(dataset.dataset).encode())
    elif isinstance(dataset, DatasetFolder) or hasattr(dataset, "samples"):  # an image folder: its file list
        h.update(repr(getattr(dataset, "transform", None)).encode())
        for path, label in dataset.samples:
            st = os.stat(path)
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        for i in range(len(dataset)):
            item = dataset[i]
            for t in (item if isinstance(item, (tuple, list)) else (item,)):
                t = torch.as_tensor(t)
                h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SourceSelector:
    """Source images nearest to each target image by their filter-bank histogram descriptors.

    bank        a tlkernels.filters.FilterBank (gabor_bank() or from_model(...)); TypeError otherwise
    bins        histogram bins per filter channel; fine_bins: the fine histogram equal-mass edges are cut from
    mode        "equal_mass" (the paper's) or "uniform" bin edges, fitted on the target set by fit()
    metric      knn_search metric ("skl": weighted symmetric KL, the paper's)
    cache_dir   descriptors are cached there (atomic files keyed on the bank, edges and the data's content)
    device      where histograms and the search run (None: the images' device); descriptors are kept on the CPU
    Datasets yield (image, label) pairs or images, (C, H, W) tensors. Under torch.distributed,
    describe_shard() describes this rank's share of the source set and select()/grow() search the shards
    (every rank gets the global answer). Methods raise RuntimeError when called out of order.
    """

    def __init__(self, bank, bins=100, fine_bins=2000, mode="equal_mass", metric="skl", batch_size=64,
                 cache_dir=None, progress=True, num_workers=0, device=None):
        from tlkernels.filters import FilterBank
        if not isinstance(bank, FilterBank):
            raise TypeError(f"SourceSelector: bank must be a tlkernels.filters.FilterBank (gabor_bank() or "
                            f"from_model(...)), got {type(bank).__name__}")
        self.bank, self.bins, self.fine_bins, self.mode, self.metric = bank, bins, fine_bins, mode, metric
        self.batch_size, self.cache_dir, self.progress, self.num_workers = batch_size, cache_dir, progress, num_workers
        self.device = None if device is None else torch.device(device)
        self.sharded, self.source_count = False, None
        self.edges = None
        self.descriptors = {}
        self._nbrs = None
        self._counts = None
        self.k = None

    def _loader(self, dataset):
        return _OnDevice(DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers),
                         self.device)

    def fit(self, target_dataset):
        """Fit the bin edges on the target set (ValueError when it is empty); returns self."""
        if len(target_dataset) == 0:
            raise ValueError("SourceSelector.fit: the target dataset is empty")
        self.edges = fit_bin_edges(self._loader(target_dataset), self.bank, self.bins, self.fine_bins, self.mode)
        return self

    def _fingerprint(self, dataset, name):
        h = hashlib.sha256()
        for t in self.bank.fingerprint_tensors() + list(self.edges):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(f"{name}|{len(dataset)}|{self.bins}|{self.mode}|".encode())
        h.update(dataset_fingerprint(dataset).encode())
        return h.hexdigest()

    def _load_cache(self, path, fingerprint, n):
        try:
            obj = load(path, "SourceSelector descriptor cache")
            ok = (isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT and obj.get("version") == CACHE_VERSION
                  and obj.get("fingerprint") == fingerprint and isinstance(obj.get("descriptors"), torch.Tensor)
                  and tuple(obj["descriptors"].shape) == (n, self.bank.num_channels * self.bins)
                  and hashlib.sha256(obj["descriptors"].numpy().tobytes()).hexdigest() == obj.get("checksum"))
            if ok:
                return obj["descriptors"]
            warnings.warn(f"SourceSelector: cache {path} does not match this bank/edges/dataset; rebuilding it")
        except Exception as e:  # corrupted file: rebuild, never use it
            warnings.warn(f"SourceSelector: cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
        return None

    @torch.no_grad()
    def describe(self, dataset, name):
        """(N, channels * bins) descriptors of `dataset` (histograms per filter channel, each summing to 1)."""
        if self.edges is None:
            raise RuntimeError("SourceSelector.describe: call fit(target_dataset) first")
        path = None
        if self.cache_dir is not None:
            fp = self._fingerprint(dataset, name)
            path = os.path.join(self.cache_dir, f"descriptors-{name}.pt")
            if os.path.exists(path):
                d = self._load_cache(path, fp, len(dataset))
                if d is not None:
                    return self._keep(name, d)
        parts = []
        loader = self._loader(dataset)
        if self.progress:
            from tqdm.auto import tqdm
            loader = tqdm(loader, desc=f"describe {name}", unit="batch", leave=False)
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            hs = [filterbank_histogram(x, s["weight"].to(x.device), self.edges[i].to(x.device), s["stride"],
                                       s["padding"])
                  for i, (s, x) in enumerate(self.bank.stage_inputs(images))]
            parts.append(torch.cat(hs, 1).flatten(1).cpu())
        d = torch.cat(parts) if parts else torch.zeros(0, self.bank.num_channels * self.bins)
        if path is not None:
            atomic_save({"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fp, "descriptors": d,
                         "checksum": hashlib.sha256(d.numpy().tobytes()).hexdigest()}, path)
        return self._keep(name, d)

    def _keep(self, name, d):
        """Hold descriptors `d` as `name` (computed or read from the cache alike)."""
        self.descriptors[name] = d
        if name == "source":
            self.sharded, self.source_count = False, d.shape[0]
        return d

    def describe_shard(self, source_dataset):
        """This rank's contiguous share of the source set as the "source" descriptors (torch.distributed
        initialised); select() and grow() then search every rank's share and return global source indices."""
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("SourceSelector.describe_shard: torch.distributed is not initialised")
        rank, world, n = dist.get_rank(), dist.get_world_size(), len(source_dataset)
        shard = torch.utils.data.Subset(source_dataset, range(n * rank // world, n * (rank + 1) // world))
        cache_dir, self.cache_dir = self.cache_dir, None  # a shard is not the data set a cache is keyed on
        try:
            d = self.describe(shard, "source")
        finally:
            self.cache_dir = cache_dir
        self.sharded, self.source_count = True, n
        return d

    def channel_weights(self):
        """(channels,) weight of each histogram channel in the distance (the bank's: 0.5 / filters of its stage)."""
        return self.bank.channel_weights()

    def _search(self, rows, k):
        t, s = self.descriptors["target"], self.descriptors["source"]
        dev = self.device or t.device
        return knn_search(t[rows].to(dev, torch.float64), s.to(dev, torch.float64), k, metric=self.metric,
                          channel_weights=self.channel_weights().to(dev, torch.float64), sharded=self.sharded)[1].cpu()

    def select(self, k):
        """(N_target, k) indices of each target image's k nearest source images, nearest first."""
        for name in ("target", "source"):
            if name not in self.descriptors:
                raise RuntimeError(f"SourceSelector.select: describe(..., name={name!r}) first")
        n_src = self.source_count
        if not 1 <= k <= n_src:
            raise ValueError(f"SourceSelector.select: k must be in [1, {n_src}] (source images), got {k}")
        self.k = k
        self._nbrs = self._search(torch.arange(self.descriptors["target"].shape[0]), k)
        self._counts = torch.full((self._nbrs.shape[0],), k, dtype=torch.long)
        self._filled = self._counts.clone()  # neighbours searched per row (nearest first)
        self._levels = torch.ones(self._nbrs.shape[0], dtype=torch.long)
        return self._nbrs

    def grow(self, hard_target_indices, levels=2):
        """Give the listed (hard) target images k * levels neighbours (capped at the source size); the others
        keep theirs."""
        if self._nbrs is None:
            raise RuntimeError("SourceSelector.grow: call select(k) first")
        idx = torch.as_tensor(hard_target_indices, dtype=torch.long).unique()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self._nbrs.shape[0]):
            raise ValueError(f"SourceSelector.grow: hard_target_indices must be in [0, {self._nbrs.shape[0]}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        lv = self.levels.clone()
        lv[idx] = torch.clamp(lv[idx], min=int(levels))
        return self.set_levels(lv)

    @property
    def levels(self):
        """Per target image, its level: it has k * level neighbours (capped at the source size)."""
        return self._levels

    def set_levels(self, levels):
        """Give target image i k * levels[i] nearest neighbours (levels >= 1; capped at the source size), the
        iterative hard-sample mining step: lists only grow by search, a lower level keeps the nearest part."""
        if self._nbrs is None:
            raise RuntimeError("SourceSelector.set_levels: call select(k) first")
        levels = torch.as_tensor(levels, dtype=torch.long)
        if tuple(levels.shape) != (self._nbrs.shape[0],) or (levels.numel() and int(levels.min()) < 1):
            raise ValueError(f"SourceSelector.set_levels: levels must be ({self._nbrs.shape[0]},) ints >= 1, got "
                             f"shape {tuple(levels.shape)}" + (f", min {int(levels.min())}" if levels.numel() else ""))
        want = torch.clamp(levels * self.k, max=self.source_count)
        for kk in sorted(set(want[want > self._filled].tolist())):  # one search per new list length
            rows = ((want == kk) & (want > self._filled)).nonzero().squeeze(1)
            if kk > self._nbrs.shape[1]:
                pad = self._nbrs.new_full((self._nbrs.shape[0], kk - self._nbrs.shape[1]), -1)
                self._nbrs = torch.cat([self._nbrs, pad], 1)
            self._nbrs[rows, :kk] = self._search(rows, kk)
            self._filled[rows] = kk
        self._levels, self._counts = levels.clone(), want
        return self.neighbours()

    def neighbours(self):
        """List over target images of their neighbour index tensors (nearest first)."""
        return [self._nbrs[i, :c] for i, c in enumerate(self._counts.tolist())]


class _OnDevice:
    """Re-iterable view of a loader whose images are moved to `device` (None: left where they are)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.device is None:
                yield batch
            elif isinstance(batch, (tuple, list)):
                yield [batch[0].to(self.device)] + list(batch[1:])
            else:
                yield batch.to(self.device)


class JointDataset(Dataset):
    """Pairs target image i with one of its retrieved source images, drawn reproducibly per (seed, epoch, i).
    Items: (target_image, target_label, source_image, source_label)."""

    def __init__(self, target, source, neighbours, seed=0):
        if len(neighbours) != len(target):
            raise ValueError(f"JointDataset: neighbours must have one entry per target image ({len(target)}), "
                             f"got {len(neighbours)}")
        for i, nb in enumerate(neighbours):
            n = len(nb)
            if n == 0:
                raise ValueError(f"JointDataset: target image {i} has an empty neighbour list; every target image "
                                 f"needs at least one source neighbour")
            t = torch.as_tensor(nb)
            if int(t.min()) < 0 or int(t.max()) >= len(source):
                raise ValueError(f"JointDataset: neighbours[{i}] holds source indices outside [0, {len(source)}): "
                                 f"[{int(t.min())}, {int(t.max())}]")
        self.target, self.source, self.neighbours, self.seed, self.epoch = target, source, neighbours, seed, 0

    def set_epoch(self, epoch):
        """Draw other source partners in the next epoch (the draw depends on (seed, epoch, index))."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        nb = self.neighbours[i]
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFFFFFF)
        j = int(nb[torch.randint(len(nb), (1,), generator=g)])
        ti, tl = self.target[i]
        si, sl = self.source[j]
        return ti, tl, si, sl
