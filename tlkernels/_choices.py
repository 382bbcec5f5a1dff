"""The measured choices (which exact path of an op runs fastest on this host, per call signature: the gated
convolution's strategies, the histogram's paths, the kNN GEMM's BLAS) kept on disk between processes.

TLKERNELS_CHOICE_CACHE=path loads the file at import, when it was written on the same host with the same
software (CPU model and flags, torch version, the compiled library file), and writes the process's picks back
at exit, atomically and merged with the file's (several processes of one job may share it). A later run then
takes the same strategies without timing them again: the same rounding in every run of a job, and no
measurement at start-up. Unset (the default): every process measures for itself. The file is JSON, read as
data only."""
import atexit
import hashlib
import json
import os
import platform
import warnings

import torch

from tlkernels import _timing, config
from tlkernels._extension import HAS_C
from tlkernels._io import atomic_write_text, unwritable

FORMAT = 1
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
    """The process's picks: {"cpp": {key: name}, "python": {key: name}}."""
    cpp = {}
    if HAS_C:
        flat = list(torch.ops.tlkernels._measured_choices())
        cpp = dict(zip(flat[0::2], flat[1::2]))
    return {"cpp": cpp, "python": dict(_timing._CHOICES)}


def _read(path):
    """The picks saved in `path` for this host, or None (no file, another host or build, unreadable: warned)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
        ok = (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("host"), dict)
              and all(isinstance(data.get(s), dict) and all(isinstance(k, str) and isinstance(v, str)
                                                             for k, v in data[s].items()) for s in ("cpp", "python")))
        if not ok:
            raise ValueError(f"not a format-{FORMAT} choice cache")
    except (OSError, ValueError) as e:
        _warn_once(path, f"cannot be read: {type(e).__name__}: {e}; measuring anew, and the next save rewrites it")
        return None
    return data if data["host"] == host_key() else None


def known_names():
    """{"cpp": names, "python": names}: what a pick may name (every op's candidates, registered where they are
    defined: the compiled ops' in C++, the Python ops' through _timing.register_names)."""
    import tlkernels.ops  # noqa: F401  (the Python ops register their candidates at import)
    cpp = set(torch.ops.tlkernels._measured_choice_names()) if HAS_C else set()
    return {"cpp": cpp, "python": set(_timing.NAMES)}


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
    bad = sorted(f"{k}={v}" for s in ("cpp", "python") for k, v in data[s].items() if v not in names[s])
    if bad:
        _warn_once(path, f"unknown strategies: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} name no "
                         f"candidate of any op (known: {', '.join(sorted(names['cpp'] | names['python']))}); "
                         f"those entries are ignored and measured anew")
    picks = {s: {k: v for k, v in data[s].items() if v in names[s]} for s in ("cpp", "python")}
    if HAS_C:
        torch.ops.tlkernels._set_measured_choices([s for kv in picks["cpp"].items() for s in kv])
    with _timing._CHOICES_LOCK:
        _timing._CHOICES.update(picks["python"])
    return len(picks["cpp"]) + len(picks["python"])


def save(path):
    """Write the process's picks, merged with those already in `path` for this host, atomically. Returns False
    (with one warning, never an exception: it also runs at interpreter exit) when the file cannot be written."""
    if not _usable(path):
        return False
    picks = current()
    old = _read(path)
    if old is not None:
        for s in ("cpp", "python"):
            picks[s] = {**old[s], **picks[s]}
        if all(picks[s] == old[s] for s in ("cpp", "python")):
            return True
    try:
        atomic_write_text(json.dumps({"format": FORMAT, "host": host_key(), **picks}, indent=1, sort_keys=True),
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
