"""Source-image selection for selective joint fine-tuning (Ge & Yu, CVPR 2017).

    sel = SourceSelector(gabor_bank(), bins=100, cache_dir="cache/")
    sel.fit(target_train)                      # equal-mass bin edges on the target set
    sel.describe(target_train, name="target")  # (N_t, channels*bins) descriptors, stored on disk as exact counts
    sel.describe(source_train, name="source")
    nbrs = sel.select(k=300)                   # K nearest source images of each target image (weighted sym. KL)
    sel.grow(hard_target_indices, levels=2)    # hard target images get more neighbours
    joint = JointDataset(target_train, source_train, sel.neighbours())
"""
import hashlib
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlkernels import store
from tlkernels.ops._utils import conv_output_hw, pair
from tlkernels.ops.bins import fit_bin_edges
from tlkernels.ops.histogram import filterbank_histogram
from tlkernels.ops.knn import chunk_rows, knn_search


def _hash_tensor(h, t):
    """Feed tensor t (shape, dtype and bytes) into hash h."""
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def dataset_fingerprint(dataset):
    """A digest of what `dataset` holds, so that a descriptor cache is never reused for other images:
    in-memory tensors by their bytes, image folders by every file's path, size and modification time,
    subsets by their indices and parent, and any other dataset by the bytes of every item."""
    from torchvision.datasets import DatasetFolder
    h = hashlib.sha256()
    if isinstance(dataset, torch.utils.data.TensorDataset):
        for t in dataset.tensors:
            _hash_tensor(h, t)
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
                _hash_tensor(h, torch.as_tensor(t))
    return h.hexdigest()


class SourceSelector:
    """Source images nearest to each target image by their filter-bank histogram descriptors.

    bank        a tlkernels.filters.FilterBank (gabor_bank() or from_model(...)); TypeError otherwise
    bins        histogram bins per filter channel; fine_bins: the fine histogram equal-mass edges are cut from
    mode        "equal_mass" (the paper's) or "uniform" bin edges, fitted on the target set by fit()
    metric      knn_search metric ("skl": weighted symmetric KL, the paper's)
    cache_dir   descriptors are written there as a tlkernels.store.DescriptorStore per name (sharded, checksummed,
                resumable, keyed on the bank, edges and the data's content); None: held in memory
    memory_gb   memory the searches' buffers may take (sets their chunk size); the source descriptors in a
                store are read chunk by chunk, never whole
    device      where histograms and the search run (None: the CPU); descriptors are kept as exact counts
                (tlkernels.store.Descriptors) in memory or on disk
    num_workers DataLoader worker processes reading the images (decoding is what bounds a GPU host)
    Datasets yield (image, label) pairs or images, (C, H, W) tensors. Under torch.distributed with a cache_dir
    (a directory every rank sees), describe() is collective: each rank describes its shards of the store;
    describe_shard() then hands each rank its share of the source rows for select()/grow(), which search the
    shards (every rank gets the global answer). Methods raise RuntimeError when called out of order.
    """

    def __init__(self, bank, bins=100, fine_bins=2000, mode="equal_mass", metric="skl", batch_size=64,
                 cache_dir=None, progress=True, num_workers=0, device=None, memory_gb=2.0,
                 shard_rows=store.SHARD_ROWS):
        from tlkernels.filters import FilterBank
        if not isinstance(bank, FilterBank):
            raise TypeError(f"SourceSelector: bank must be a tlkernels.filters.FilterBank (gabor_bank() or "
                            f"from_model(...)), got {type(bank).__name__}")
        if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
            raise ValueError(f"SourceSelector: memory_gb must be a number > 0, got {memory_gb!r}")
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"SourceSelector: shard_rows must be a positive int, got {shard_rows!r}")
        self.bank, self.bins, self.fine_bins, self.mode, self.metric = bank, bins, fine_bins, mode, metric
        self.batch_size, self.cache_dir, self.progress, self.num_workers = batch_size, cache_dir, progress, num_workers
        self.memory_gb, self.shard_rows = memory_gb, shard_rows
        self.device = None if device is None else torch.device(device)
        self.sharded, self.source_count = False, None
        self.edges = None
        self.descriptors = {}
        self._nbrs = None
        self._counts = None
        self.k = None

    def _loader(self, dataset):
        pin = self.device is not None and self.device.type == "cuda"
        return _OnDevice(DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                                    pin_memory=pin), self.device)

    def fit(self, target_dataset):
        """Fit the bin edges on the target set (ValueError when it is empty); returns self."""
        if len(target_dataset) == 0:
            raise ValueError("SourceSelector.fit: the target dataset is empty")
        self.edges = fit_bin_edges(self._loader(target_dataset), self.bank, self.bins, self.fine_bins, self.mode)
        return self

    def stage_columns(self):
        """[lo, hi) descriptor columns of each bank stage (its filters x bins)."""
        cols, lo = [], 0
        for s in self.bank.stages:
            cols.append((lo, lo + s["weight"].shape[0] * self.bins))
            lo = cols[-1][1]
        return cols

    def _key(self, dataset):
        """What a store of `dataset`'s descriptors is of: the bank, the edges, the binning and the images."""
        def digest(ts):
            h = hashlib.sha256()
            for t in ts:
                _hash_tensor(h, t)
            return h.hexdigest()
        return {"bank": digest(self.bank.fingerprint_tensors()), "edges": digest(list(self.edges)),
                "bins": self.bins, "mode": self.mode, "data": dataset_fingerprint(dataset)}

    def _counts_of(self, images):
        """Integer histogram counts (N, dims) and responses per histogram (N, stages) of a batch of images."""
        hs, ps = [], []
        for i, (s, x) in enumerate(self.bank.stage_inputs(images)):
            w = s["weight"]
            stride, padding = pair("SourceSelector", "stride", s["stride"]), pair("SourceSelector", "padding",
                                                                                   s["padding"], allow_zero=True)
            oh, ow = conv_output_hw(x, w, stride, padding)
            p = oh * ow  # responses per histogram
            h = filterbank_histogram(x, w.to(x.device), self.edges[i].to(x.device), stride, padding)
            hs.append(torch.round(h.double() * p).to(torch.int64).flatten(1))  # count * (1/P) within an ulp: exact
            ps.append(torch.full((x.shape[0], 1), p, dtype=torch.int64))
        counts, pixels = torch.cat(hs, 1).cpu(), torch.cat(ps, 1)
        per_channel = counts.reshape(counts.shape[0], -1, self.bins).sum(-1)
        expect = torch.cat([pixels[:, i:i + 1].expand(-1, (hi - lo) // self.bins)
                            for i, (lo, hi) in enumerate(self.stage_columns())], 1)
        if not torch.equal(per_channel, expect):
            raise RuntimeError("SourceSelector: histogram counts do not sum to the responses per image "
                               "(filterbank_histogram returned values that are not count / responses)")
        return counts.numpy(), pixels.numpy().astype(np.uint32)

    def _batches(self, dataset, total, desc):
        """(counts, pixels) of `dataset` batch by batch, with a progress bar in images/s."""
        bar = None
        if self.progress and total:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=desc, unit="img", leave=False)
        try:
            for batch in self._loader(dataset):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                yield self._counts_of(images)
                if bar is not None:
                    bar.update(images.shape[0])
        finally:
            if bar is not None:
                bar.close()

    @torch.no_grad()
    def describe(self, dataset, name):
        """The descriptors of `dataset` (tlkernels.store.Descriptors, (N, channels * bins): a histogram per filter
        channel, each summing to 1), kept as `name`. With a cache_dir they are written to (or read from) the
        store cache_dir/descriptors-<name>: each shard as it is complete, so an interrupted description resumes;
        under torch.distributed every rank must call this (each describes its shards)."""
        if self.edges is None:
            raise RuntimeError("SourceSelector.describe: call fit(target_dataset) first")
        if self.cache_dir is None:
            parts = list(self._batches(dataset, len(dataset), f"describe {name}"))
            dims = self.stage_columns()[-1][1]
            counts = np.concatenate([c for c, _ in parts]) if parts else np.zeros((0, dims), np.int64)
            pixels = np.concatenate([p for _, p in parts]) if parts else np.zeros((0, len(self.bank.stages)), np.uint32)
            return self._keep(name, store.in_memory(store.narrow(counts, pixels), pixels, self.stage_columns()))
        return self._keep(name, self._describe_store(dataset, name))

    def _describe_store(self, dataset, name):
        import torch.distributed as dist
        collective = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
        st = store.DescriptorStore(os.path.join(self.cache_dir, f"descriptors-{name}"), self._key(dataset),
                                   len(dataset), self.stage_columns(), self.shard_rows,
                                   what=f"SourceSelector: descriptor store {name!r}")
        if rank == 0:
            st.prepare()
        if collective:
            dist.barrier()
        todo = st.pending(range(rank, st.shards, world))
        if todo:
            rows = [r for i in todo for r in range(*st.shard_range(i))]
            batches = self._batches(torch.utils.data.Subset(dataset, rows), len(rows), f"describe {name}")
            buf_c, buf_p = [], []
            for i in todo:  # the batches arrive in row order; each shard is written as soon as it is full
                need = st.shard_range(i)[1] - st.shard_range(i)[0]
                while sum(len(c) for c in buf_c) < need:
                    c, p = next(batches, (None, None))
                    if c is None:
                        raise RuntimeError(f"SourceSelector.describe: data set {name!r} yielded fewer images than "
                                           f"its length ({len(dataset)})")
                    buf_c.append(c)
                    buf_p.append(p)
                counts, pixels = np.concatenate(buf_c), np.concatenate(buf_p)
                buf_c, buf_p = [counts[need:]], [pixels[need:]]
                st.write_shard(i, store.narrow(counts[:need], pixels[:need]), pixels[:need])
            batches.close()
        if collective:
            dist.barrier()
        if rank == 0:
            st.finish()
        if collective:
            dist.barrier()
        return st.descriptors()

    def _keep(self, name, d):
        """Hold descriptors `d` as `name` (computed or read from the store alike)."""
        self.descriptors[name] = d
        if name == "source":
            self.sharded, self.source_count = False, d.shape[0]
        return d

    def describe_shard(self, source_dataset):
        """This rank's contiguous share of the source set as the "source" descriptors (torch.distributed
        initialised; collective); select() and grow() then search every rank's share and return global source
        indices. With a cache_dir every rank describes its shards of the store and searches its share of it."""
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("SourceSelector.describe_shard: torch.distributed is not initialised")
        rank, world, n = dist.get_rank(), dist.get_world_size(), len(source_dataset)
        lo, hi = n * rank // world, n * (rank + 1) // world
        if self.cache_dir is not None:
            d = self.describe(source_dataset, "source").subset(lo, hi)
        else:
            d = self.describe(torch.utils.data.Subset(source_dataset, range(lo, hi)), "source")
        self.descriptors["source"] = d
        self.sharded, self.source_count = True, n
        return d

    def channel_weights(self):
        """(channels,) weight of each histogram channel in the distance (the bank's: 0.5 / filters of its stage)."""
        return self.bank.channel_weights()

    def _search(self, rows, k):
        """Exact search in float64, the source descriptors streamed chunk by chunk within memory_gb."""
        t, s = self.descriptors["target"], self.descriptors["source"]
        dev = self.device or torch.device("cpu")
        q = t.tensor(torch.float64)[rows].to(dev)
        return knn_search(q, s, k, metric=self.metric, channel_weights=self.channel_weights().to(dev, torch.float64),
                          sharded=self.sharded,
                          chunk_size=chunk_rows(self.memory_gb, s.shape[1], q.shape[0], self.metric))[1].cpu()

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
