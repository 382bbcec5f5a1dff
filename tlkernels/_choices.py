"""The measured choices (which exact path of an op runs fastest on this host, per call signature: the gated
convolution's strategies, the histogram's paths, the kNN GEMM's BLAS) kept on disk between processes.

TLKERNELS_CHOICE_CACHE=path loads the file at import, when it was written on the same host with the same
software (CPU model and flags, torch version, the compiled library file), and writes the process's picks back
at exit, atomically and merged with the file's (several processes of one job may share it). A later run then
takes the same strategies without timing them again: the same rounding in every run of a job, and no
measurement at start-up. Unset (the default): every process measures for itself. The file is JSON, read as
data only: {"format": 2, "host": {...}, "picks": {signature: candidate name}} (format 1 kept the compiled and
the Python ops' picks apart, as "cpp" and "python"; both are read into the one table)."""
import atexit
import hashlib
import json
import os
import platform
import warnings

import torch

from tlkernels import config
from tlkernels._extension import HAS_C
from tlkernels._io import atomic_write_text, unwritable

FORMAT = 2
ENV = config.env("choice_cache")


def host_key():
    """What a saved choice is valid for: the CPU (model and ISA flags), torch, and the compiled library build."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:  # (the first processor's lines)
            for line in fh:
                name, _, value = line.partition(":")
                info.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model, flags = info.get("model name") or platform.processor(), info.get("flags", "")
    lib = ""
    if HAS_C:
        from tlkernels import _C
        st = os.stat(_C.__file__)
        lib = f"{st.st_size}-{st.st_mtime_ns}"
    return {"cpu": model, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch": torch.__version__,
            "library": lib}


def current():
    """The process's picks, {signature: candidate name}: one table, the compiled library's
    (csrc/ops/measured_choice.h), for the compiled and the Python ops alike."""
    if not HAS_C:
        return {}
    flat = list(torch.ops.tlkernels._measured_choices())
    return dict(zip(flat[0::2], flat[1::2]))


def _picks(data):
    """The {signature: name} picks of a parsed cache file of this format or format 1, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("host"), dict):
        return None
    sections = {FORMAT: ("picks",), 1: ("cpp", "python")}.get(data.get("format"))
    if sections is None or not all(isinstance(data.get(s), dict) for s in sections):
        return None
    picks = {k: v for s in sections for k, v in data[s].items()}
    return picks if all(isinstance(k, str) and isinstance(v, str) for k, v in picks.items()) else None


def _read(path):
    """The picks saved in `path` for this host ({signature: name}), or None (no file, another host or build,
    unreadable: warned)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
        picks = _picks(data)
        if picks is None:
            raise ValueError(f"not a format-{FORMAT} choice cache")
    except (OSError, ValueError) as e:
        _warn_once(path, f"cannot be read: {type(e).__name__}: {e}; measuring anew, and the next save rewrites it")
        return None
    return picks if data["host"] == host_key() else None


def known_names():
    """What a pick may name: every op's candidates, registered where they are defined (the compiled ops' in C++,
    the Python ops' through _timing.register_names), in the compiled library's table."""
    import tlkernels.ops  # noqa: F401  (the Python ops register their candidates at import)
    return set(torch.ops.tlkernels._measured_choice_names()) if HAS_C else set()


_WARNED = set()


def _warn_once(path, msg):
    """One warning per file and kind of trouble (a cache is read and written many times in a job)."""
    key = (os.path.abspath(path), msg.split(":")[0])
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"tlkernels: {ENV} / choice cache {path}: {msg}", RuntimeWarning, stacklevel=3)


def _usable(path):
    """False (with one warning) when `path` cannot hold the cache: a directory, or nowhere a file can be written."""
    why = unwritable(path)
    if why:
        _warn_once(path, f"cannot be used: {why}; the measured choices are not kept (point {ENV} at a writable "
                         f"file path)")
    return why is None


def load(path):
    """Take the picks saved in `path` (when written for this host and build); returns how many were taken.
    Picks naming no candidate of any op (a hand-edited or foreign file) are left out, with one warning."""
    if not _usable(path):
        return 0
    data = _read(path)
    if data is None:
        return 0
    names = known_names()
    bad = sorted(f"{k}={v}" for k, v in data.items() if v not in names)
    if bad:
        _warn_once(path, f"unknown strategies: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} name no "
                         f"candidate of any op (known: {', '.join(sorted(names))}); those entries are ignored and "
                         f"measured anew")
    picks = {k: v for k, v in data.items() if v in names}
    if HAS_C:
        torch.ops.tlkernels._set_measured_choices([s for kv in picks.items() for s in kv])
    return len(picks)


def save(path):
    """Write the process's picks, merged with those already in `path` for this host, atomically. Returns False
    (with one warning, never an exception: it also runs at interpreter exit) when the file cannot be written."""
    if not _usable(path):
        return False
    picks = current()
    old = _read(path)
    if old is not None:
        picks = {**old, **picks}
        if picks == old:
            return True
    try:
        atomic_write_text(json.dumps({"format": FORMAT, "host": host_key(), "picks": picks}, indent=1,
                                     sort_keys=True),
                          path)
    except OSError as e:
        _warn_once(path, f"cannot be written: {type(e).__name__}: {e}; the measured choices are not kept "
                         f"(point {ENV} at a writable file path)")
        return False
    return True


def install():
    """At import: with TLKERNELS_CHOICE_CACHE set, load its picks and save the process's at exit."""
    path = config.get("choice_cache")
    if not path:
        return
    load(path)
    atexit.register(save, path)
