"""Histogram descriptors as exact integer counts, in memory or in a store on disk read by memory map.

A filter channel's histogram over P responses holds count / P in each bin. Descriptors keep the counts and
each row's P per filter-bank stage, so a value reads back exactly (count / P, computed in float64 by
`decode`). Counts are uint16 when every P of a shard fits (a 224 x 224 image at stride 1 gives 50,176
responses), else uint32: as compact as float16 and lossless, where float16 would round a one-response bin of
a 224 x 224 image (2e-5, below float16's normal range) by up to 3%, and change which source images are
nearest.

A store directory:
  manifest.json            format, version, key (bank, edges, bins, mode, data set fingerprint), rows, dims,
                           stage columns, shard rows, and per shard its row range, files and sha256 checksums
  shard-00000.counts.npy   (rows, dims) counts            } memory-mapped for reading, one row range at a time,
  shard-00000.pixels.npy   (rows, stages) uint32 P values } so the resident set stays one chunk
  shard-00000.json         the shard's record (its checksums), written after its files and merged into the
                           manifest when every shard is done: an interrupted description resumes at the
                           first shard without a record, and a shard whose files fail their checksum is rebuilt.
Under torch.distributed every rank writes its own shards (shard i belongs to rank i % world) into one
directory that all ranks see; rank 0 writes the manifest.
"""
import glob
import hashlib
import json
import os
import warnings

import numpy as np
import torch

from tlkernels._io import atomic_write, atomic_write_text

FORMAT = "tlkernels-descriptor-store"
VERSION = 1
SHARD_ROWS = 16384
MANIFEST = "manifest.json"


def count_dtype(max_pixels):
    """The smallest unsigned integer type that holds counts of up to `max_pixels` responses."""
    return np.uint16 if max_pixels <= np.iinfo(np.uint16).max else np.uint32


def narrow(counts, pixels):
    """Counts in the smallest unsigned type their rows' response counts `pixels` allow (count_dtype)."""
    return counts.astype(count_dtype(int(pixels.max(initial=0))))


def _unsigned(t):
    """Counts as signed integers wide enough to hold them (uint16 / uint32 tensors reinterpreted and widened:
    every device converts those)."""
    if t.dtype == torch.uint16:
        return t.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    if t.dtype == torch.uint32:
        return t.view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)
    return t


_HEADERS = {}


def _npy_header(path):
    """(data offset, row bytes) of an .npy file, read once per version of the file."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            _HEADERS[key] = (f.tell(), int(np.prod(shape[1:])) * np.dtype(dtype).itemsize)
    return _HEADERS[key]


def _read(src, a, b):
    """Rows [a, b) of an array, or of an .npy file through a memory map unmapped straight after the copy (the
    mapped pages leave the process: reading a store never grows its resident set beyond a chunk)."""
    if isinstance(src, np.ndarray):
        return src[a:b]
    m = np.load(src, mmap_mode="r")
    try:
        return np.array(m[a:b])
    finally:
        if getattr(m, "_mmap", None) is not None:
            m._mmap.close()


class Descriptors:
    """Rows of histogram descriptors held as counts: parts in memory or shards of a store on disk.

    shape            (rows, dims)
    rows(a, b)       rows [a, b) as a float tensor (count / P); tensor(): all rows
    subset(a, b)     a view of rows [a, b) (a rank's share)
    raw(a, b), decode(counts, pixels, dtype): the two halves of rows(), which knn_search uses to move the
                     compact counts to the search's device and divide there.
    prefetch(a, b)   asks the kernel to read rows [a, b) of a store ahead (the search asks for the next chunk
                     while it computes this one).
    """

    def __init__(self, parts, stage_columns):
        # parts: (start, stop, counts, pixels, first): rows [start, stop) are rows [first, first + stop - start)
        # of counts (rows, dims) / pixels (rows, stages), numpy arrays or .npy paths
        self.parts = parts
        self.stage_columns = [tuple(c) for c in stage_columns]
        self.shape = (parts[-1][1] if parts else 0, self.stage_columns[-1][1])

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        where = "memory" if not self.parts or isinstance(self.parts[0][2], np.ndarray) else "store"
        return f"Descriptors(rows={self.shape[0]}, dims={self.shape[1]}, in {where})"

    def _check(self, name, a, b):
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= self.shape[0]):
            raise IndexError(f"Descriptors.{name}: rows [{a}, {b}) are outside [0, {self.shape[0]}]")

    def _overlaps(self, start, stop):
        """(lo, hi, counts, pixels, a) for each part rows [start, stop) reach: rows [lo, hi) of this view are
        rows [a, a + hi - lo) of the part's arrays."""
        for s0, s1, c, p, first in self.parts:
            lo, hi = max(start, s0), min(stop, s1)
            if lo < hi:
                yield lo, hi, c, p, first + lo - s0

    def subset(self, start, stop):
        self._check("subset", start, stop)
        return Descriptors([(lo - start, hi - start, c, p, a) for lo, hi, c, p, a in self._overlaps(start, stop)],
                           self.stage_columns)

    def raw(self, start, stop):
        """(counts, pixels) numpy arrays of rows [start, stop): unsigned counts (rows, dims), uint32 P (rows, stages)."""
        self._check("raw", start, stop)
        cs, ps = [], []
        for lo, hi, c, p, a in self._overlaps(start, stop):
            cs.append(_read(c, a, a + hi - lo))
            ps.append(_read(p, a, a + hi - lo))
        if not cs:
            return np.zeros((0, self.shape[1]), np.uint16), np.zeros((0, len(self.stage_columns)), np.uint32)
        counts = cs[0] if len(cs) == 1 else np.concatenate(cs)  # (uint16 with uint32: uint32)
        pixels = ps[0] if len(ps) == 1 else np.concatenate(ps)
        return counts, pixels

    def decode(self, counts, pixels, dtype=torch.float32, out=None):
        """count / P per value (correctly rounded in float64), as `dtype`. numpy arrays are decoded on the CPU by
        numpy (one pass, casting as it divides), into `out` (a float64 CPU tensor with room for them, reused
        across chunks: fresh pages from the OS per chunk cost more than the division) when given; tensors are
        decoded on their device."""
        if isinstance(counts, np.ndarray):
            if out is not None and out.dtype == torch.float64 and out.shape[0] >= counts.shape[0] \
                    and out.shape[1:] == counts.shape[1:]:
                out = out[:counts.shape[0]].numpy()
            else:
                out = np.empty(counts.shape, np.float64)
            p = pixels.astype(np.float64)
            for s, (lo, hi) in enumerate(self.stage_columns):
                np.divide(counts[:, lo:hi], p[:, s:s + 1], out=out[:, lo:hi])
            out = torch.from_numpy(out)
        else:
            out = _unsigned(counts).to(torch.float64)
            p = _unsigned(pixels).to(torch.float64)
            for s, (lo, hi) in enumerate(self.stage_columns):
                out[:, lo:hi].div_(p[:, s:s + 1])
        return out if dtype == torch.float64 else out.to(dtype)

    def rows(self, start, stop, dtype=torch.float32):
        return self.decode(*self.raw(start, stop), dtype=dtype)

    def tensor(self, dtype=torch.float32):
        return self.rows(0, self.shape[0], dtype)

    def prefetch(self, start, stop):
        for lo, hi, c, _, a in self._overlaps(start, stop):
            if isinstance(c, str) and hasattr(os, "posix_fadvise"):
                offset, row = _npy_header(c)
                fd = os.open(c, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, offset + a * row, (hi - lo) * row, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)


def in_memory(counts, pixels, stage_columns):
    """Descriptors over count and pixel arrays held in memory."""
    return Descriptors([(0, counts.shape[0], counts, pixels, 0)] if counts.shape[0] else [], stage_columns)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _save_npy(array, path):
    atomic_write(path, "wb", ".npy", lambda fh: np.save(fh, array, allow_pickle=False))


class DescriptorStore:
    """The store in `directory` for one data set's descriptors (module docstring). key: a dict of strings and
    numbers naming what the descriptors are of (a store with another key is rebuilt, with a warning)."""

    def __init__(self, directory, key, rows, stage_columns, shard_rows=SHARD_ROWS, what="descriptor store"):
        if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
            raise ValueError(f"DescriptorStore: shard_rows must be a positive int, got {shard_rows!r}")
        self.directory, self.key, self.rows, self.what = directory, dict(key), int(rows), what
        self.stage_columns = [list(c) for c in stage_columns]
        self.dims = self.stage_columns[-1][1]
        self.shard_rows = shard_rows
        self.header = {"format": FORMAT, "version": VERSION, "key": self.key, "rows": self.rows, "dims": self.dims,
                       "stage_columns": self.stage_columns, "shard_rows": shard_rows}
        self.shards = (self.rows + shard_rows - 1) // shard_rows

    # ---- layout
    def _path(self, name):
        return os.path.join(self.directory, name)

    def shard_range(self, i):
        return i * self.shard_rows, min(self.rows, (i + 1) * self.shard_rows)

    def _files(self, i):
        return {"counts": f"shard-{i:05d}.counts.npy", "pixels": f"shard-{i:05d}.pixels.npy"}

    def _manifest(self):
        """The manifest as a dict, or None when absent or unreadable (warned)."""
        path = self._path(MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                m = json.load(f)
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
            return m
        except (OSError, ValueError) as e:
            warnings.warn(f"{self.what} {self.directory}: manifest is unreadable ({e}); rebuilding the store")
            return None

    # ---- writing (prepare on rank 0, then write_shard on every rank, then finish on rank 0)
    def prepare(self):
        """Make the manifest name this key and layout; a store of other descriptors is removed (warned)."""
        m = self._manifest()
        if m is not None and {k: m.get(k) for k in self.header} == self.header:
            return
        stale = glob.glob(self._path("shard-*"))
        if m is not None or stale:
            if m is not None:
                warnings.warn(f"{self.what} {self.directory} holds other descriptors (its key or layout differs "
                              f"from this bank, edges, bins and data set); rebuilding it")
            for f in stale:
                os.unlink(f)
        os.makedirs(self.directory, exist_ok=True)
        atomic_write_text(json.dumps(dict(self.header, shards=[None] * self.shards), indent=1), self._path(MANIFEST))

    def _record(self, i, manifest):
        """Shard i's record: its own file (written by the last description of it), else the manifest's entry."""
        side = self._path(f"shard-{i:05d}.json")
        if os.path.exists(side):
            try:
                with open(side) as f:
                    rec = json.load(f)
                if isinstance(rec, dict):
                    return rec
            except (OSError, ValueError):
                pass
        entry = (manifest or {}).get("shards")
        if isinstance(entry, list) and i < len(entry) and isinstance(entry[i], dict):
            return entry[i]
        return None

    def _valid(self, i, rec):
        files = self._files(i)
        if (not isinstance(rec, dict) or rec.get("rows") != list(self.shard_range(i)) or rec.get("files") != files
                or not isinstance(rec.get("sha256"), dict)):
            return False
        return all(os.path.exists(self._path(f)) and _sha256(self._path(f)) == rec["sha256"].get(name)
                   for name, f in files.items())

    def pending(self, shards):
        """Of the shard indices `shards`, those to describe: without a record, or failing their checksum (warned)."""
        manifest = self._manifest()
        out = []
        for i in shards:
            rec = self._record(i, manifest)
            if rec is None:
                out.append(i)
            elif not self._valid(i, rec):
                warnings.warn(f"{self.what} {self.directory}: shard {i} does not match its checksum (corrupt or "
                              f"incomplete); rebuilding it")
                out.append(i)
        return out

    def write_shard(self, i, counts, pixels):
        """Write shard i (counts (rows, dims) unsigned ints, pixels (rows, stages) uint32) and then its record."""
        a, b = self.shard_range(i)
        if counts.shape != (b - a, self.dims) or pixels.shape != (b - a, len(self.stage_columns)):
            raise ValueError(f"DescriptorStore.write_shard: shard {i} needs counts ({b - a}, {self.dims}) and "
                             f"pixels ({b - a}, {len(self.stage_columns)}), got {counts.shape} and {pixels.shape}")
        files = self._files(i)
        _save_npy(np.ascontiguousarray(counts), self._path(files["counts"]))
        _save_npy(np.ascontiguousarray(pixels, dtype=np.uint32), self._path(files["pixels"]))
        rec = {"rows": [a, b], "files": files, "sha256": {n: _sha256(self._path(f)) for n, f in files.items()}}
        atomic_write_text(json.dumps(rec), self._path(f"shard-{i:05d}.json"))

    def finish(self):
        """Merge every shard's record into the manifest (rank 0, after all shards are written)."""
        manifest = self._manifest() or dict(self.header)
        recs = [self._record(i, manifest) for i in range(self.shards)]
        missing = [i for i, r in enumerate(recs) if r is None]
        if missing:
            raise RuntimeError(f"{self.what} {self.directory}: shards {missing[:8]} were not written (under "
                               f"torch.distributed every rank must see this directory: one node, or a shared file "
                               f"system)")
        done = dict(self.header, shards=recs)
        if done != manifest:  # (a complete store that was only read is left untouched)
            atomic_write_text(json.dumps(done, indent=1), self._path(MANIFEST))
        for i in range(self.shards):
            side = self._path(f"shard-{i:05d}.json")
            if os.path.exists(side):
                os.unlink(side)

    # ---- reading
    def descriptors(self):
        """The stored rows as Descriptors (each shard memory-mapped while it is read)."""
        parts = []
        for i in range(self.shards):
            a, b = self.shard_range(i)
            f = self._files(i)
            parts.append((a, b, self._path(f["counts"]), self._path(f["pixels"]), 0))
        return Descriptors(parts, self.stage_columns)

    def disk_bytes(self):
        return sum(os.path.getsize(self._path(f)) for i in range(self.shards) for f in self._files(i).values()
                   if os.path.exists(self._path(f)))
