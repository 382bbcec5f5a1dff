"""Reading and writing the files tlkernels keeps: atomically written, loaded without running code.

Every file the project reads goes through `load`: `torch.load(..., weights_only=True)` unpickles only
tensors, dicts, lists, tuples, numbers and strings, so a crafted file cannot execute anything, and an
unreadable file (missing, truncated, garbage, or holding Python objects) raises one clear error that names
the file and what it was meant to be.
"""
import os
import tempfile

import torch


class CheckpointError(RuntimeError):
    """A file tlkernels was asked to read cannot be used; the message names it and says why."""


def atomic_write(path, mode, suffix, write):
    """write(fh) into a temporary file in the same directory, fsync, then rename over `path`: readers see the
    old file or the new one, never a torn one; on failure the temporary file is removed."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    """torch.save(obj) to `path` atomically."""
    atomic_write(path, "wb", ".pt", lambda fh: torch.save(obj, fh))


def atomic_write_text(text, path):
    """Write a text file atomically."""
    atomic_write(path, "w", ".txt", lambda fh: fh.write(text))


def load(path, what):
    """torch.load(path, weights_only=True) on the CPU; any failure becomes a CheckpointError naming `what`
    (e.g. "--resume checkpoint") and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path}: no such file") from None
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that asks for code (refused)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            msg = ("it holds Python objects other than tensors, dicts, lists, numbers and strings; tlkernels "
                   "loads only those (weights_only=True), so it was not loaded")
        raise CheckpointError(f"{what} {path} cannot be read: {msg}") from None
