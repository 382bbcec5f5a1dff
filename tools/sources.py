"""The compiled library's source files from csrc/sources.txt (the one list setup.py and CMakeLists.txt read)."""
import glob
import os


def extension_sources(csrc, cuda, python=True):
    """Sorted source paths under `csrc`: every plain line's glob, the "cuda:" ones when `cuda`, the "python:"
    ones (the Python module's entry point) when `python`."""
    out = []
    with open(os.path.join(csrc, "sources.txt")) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, pattern = line.rpartition(":")
            kind, pattern = kind.strip(), pattern.strip()
            if kind not in ("", "cuda", "python"):
                raise ValueError(f"{csrc}/sources.txt: unknown line kind {kind!r} in {line!r}")
            if (kind == "cuda" and not cuda) or (kind == "python" and not python):
                continue
            found = sorted(glob.glob(os.path.join(csrc, pattern)))
            if not found:
                raise ValueError(f"{csrc}/sources.txt: {pattern!r} matches no file")
            out += found
    return out
