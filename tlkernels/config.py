"""The settings of tlkernels: one table (SETTINGS), read from the environment once, when tlkernels is imported.

    import tlkernels
    tlkernels.config.get("gated_conv")                     # the current value
    with tlkernels.config.override(gated_conv="routed"):   # for a block (tests, selfcheck, benchmarks)
        ...
    tlkernels.config.set(knn_gemm="torch")                 # for the rest of the process

A setting's choices are declared by the code that reads it: the compiled library's settings in C++
(csrc/ops/config.h, listed through the op `_config_choices`), the others by the Python module named in the
table (`declare`). The first choice is the default. An environment value that is not a choice stops
`import tlkernels` with an error naming the variable, the choices and what came; `set` and `override` check
the same way and push the compiled library's settings to C++ through one op (`_set_config`). Without the
compiled library its settings keep the environment's text unchecked (nothing then reads them but the front
ends' `reference` and `triton` tests). `python -m tlkernels.config` prints the table (README, "Settings").
"""
import contextlib
import os
from dataclasses import dataclass

__all__ = ["SETTINGS", "get", "set", "override", "choices", "env", "table"]

COMPILED = "the compiled library"
PATH = "a file path"


@dataclass(frozen=True)
class Setting:
    name: str   # the name get/set/override take
    env: str    # the environment variable read at import
    owner: str  # who declares the choices: COMPILED, a module, or PATH (free text)
    doc: str


SETTINGS = (
    Setting("backend", "TLKERNELS_BACKEND", "tlkernels._extension",
            "`auto`: the compiled kernels (Triton's on CUDA tensors where the compiled library has none); "
            "`reference`: every op runs its pure-PyTorch reference"),
    Setting("gated_conv", "TLKERNELS_GATED_CONV", COMPILED,
            "the gated convolution's strategy: `auto` (measured once per call signature on CPU tensors), "
            "`heuristic` (fixed size rules), a strategy name (forced wherever it applies; `triton` included) or "
            "`reference` (tlkernels.ops.gated_conv2d)"),
    Setting("histogram", "TLKERNELS_HISTOGRAM", COMPILED,
            "the filter-bank histogram's path: measured (`auto`), fixed rule (`heuristic`) or forced"),
    Setting("knn_gemm", "TLKERNELS_KNN_GEMM", "tlkernels.ops.knn",
            "the BLAS of the CPU nearest-neighbour search's GEMM: measured (`auto`) or forced"),
    Setting("cpu_isa", "TLKERNELS_CPU_ISA", COMPILED,
            "the instruction set the hand-written CPU paths may use (`scalar`: the portable loops)"),
    Setting("choice_cache", "TLKERNELS_CHOICE_CACHE", PATH,
            "a JSON file that keeps the measured choices between processes on one host (empty: none)"),
    Setting("triton_interpret", "TRITON_INTERPRET", "tlkernels._extension",
            "`1`: the Triton kernels run in Triton's CPU interpreter (Triton reads the variable itself when the "
            "kernels are defined; ours picks the interpreter's launch sizes and lets CPU tensors in)"),
)
_BY_NAME = {s.name: s for s in SETTINGS}
_RAW = {s.name: os.environ.get(s.env, "") for s in SETTINGS}  # the environment, read once
_CHOICES = {}  # name -> declared choices (the default first)
_VALUES = {s.name: _RAW[s.name] for s in SETTINGS}


def _setting(name):
    if name not in _BY_NAME:
        raise ValueError(f"tlkernels.config: no setting is named {name!r}; the settings are "
                         f"{', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def _check(name, value, where):
    """`value` if it is one of the setting's choices (or the setting takes any text), else a ValueError."""
    _setting(name)
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {type(value).__name__}")
    allowed = _CHOICES.get(name)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def declare(name, choices, read=None):
    """Declare the choices of setting `name` (the code that reads it calls this once, at import) and take the
    environment's value, checked; `read` maps the variable's text to a choice where another library owns the
    variable's syntax."""
    s = _setting(name)
    _CHOICES[name] = tuple(choices)
    raw = read(_RAW[name]) if read else _RAW[name]
    _VALUES[name] = _check(name, raw, f"tlkernels: {s.env}") if raw else _CHOICES[name][0]


def declare_compiled(lib_choices, push):
    """Declare the compiled library's settings from its `_config_choices()` and push the values to it."""
    global _PUSH
    flat = list(lib_choices)
    for name, joined in zip(flat[0::2], flat[1::2]):
        declare(name, joined.split(","))
    _PUSH = push
    _push({n: _VALUES[n] for n in flat[0::2]})


_PUSH = None  # the compiled library's `_set_config`, once loaded


def _push(values):
    compiled = [x for n, v in values.items() if _setting(n).owner == COMPILED and n in _CHOICES for x in (n, v)]
    if _PUSH is not None and compiled:
        _PUSH(compiled)


def get(name):
    """The current value of setting `name`."""
    _setting(name)
    return _VALUES[name]


def env(name):
    """The environment variable of setting `name`."""
    return _setting(name).env


def choices(name):
    """The declared choices of `name`, the default first (None: any text, or not declared in this process)."""
    _setting(name)
    return _CHOICES.get(name)


def set(**values):
    """Set settings for the rest of the process (all checked before any changes); returns the previous values."""
    for name, v in values.items():
        _check(name, v, f"tlkernels.config: {name}")
    old = {n: _VALUES[n] for n in values}
    _VALUES.update(values)
    _push(values)
    return old


@contextlib.contextmanager
def override(**values):
    """Settings changed inside the block, restored afterwards (process-wide: not per thread)."""
    old = set(**values)
    try:
        yield
    finally:
        set(**old)


def table():
    """The settings as a Markdown table (README's "Settings" section is this text)."""
    rows = ["| setting | environment variable | choices (default first) | what it chooses |", "|---|---|---|---|"]
    for s in SETTINGS:
        ch = _CHOICES.get(s.name)
        what = ", ".join(f"`{c}`" for c in ch) if ch else s.owner
        rows.append(f"| `{s.name}` | `{s.env}` | {what} | {s.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    from tlkernels import config  # (this file runs as __main__: the table is the imported module's)
    print(config.table())
