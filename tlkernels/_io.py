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


def unwritable(path, directory=False):
    """Why `path` cannot be written (a file, or with directory=True a directory to make or fill), or None when
    it can: the nearest existing ancestor must be a directory where a file can be created (tried: permission
    bits say nothing to root, and a read-only file system only answers a real attempt)."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and not directory:
        return f"{path!r} is a directory, expected a file path"
    if os.path.exists(path) and not os.path.isdir(path) and directory:
        return f"{path!r} is a file, expected a directory"
    probe = path if directory and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is a file, so nothing can be created below it"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"directory {probe!r} is not writable ({e.strerror or e})"
    return None


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
