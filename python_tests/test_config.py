"""tlkernels.config: one table of settings, read from the environment once, checked, pushed to the compiled
library through one op, documented once (README's table is the table's text)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import tlkernels  # noqa: F401  (declares every setting)
from tlkernels import config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compiled_values():
    return dict(zip(*[iter(torch.ops.tlkernels._config())] * 2))


def test_every_compiled_setting_is_in_the_table_and_pushed():
    compiled = {s.name for s in config.SETTINGS if s.owner == config.COMPILED}
    assert set(compiled_values()) == compiled
    assert compiled_values() == {n: config.get(n) for n in compiled}
    for s in config.SETTINGS:  # every setting but the free-text path has declared choices, its value among them
        if s.owner != config.PATH:
            assert config.get(s.name) in config.choices(s.name), s.name


def test_set_checks_everything_first_and_override_restores(settings):
    before = {s.name: config.get(s.name) for s in config.SETTINGS}
    with pytest.raises(ValueError, match="tlkernels.config: histogram must be one of auto, heuristic, separable, "
                                         "direct, got 'fast'"):
        config.set(gated_conv="routed", histogram="fast")
    with pytest.raises(ValueError, match="no setting is named 'gated_conv2d'; the settings are backend, gated_conv"):
        config.set(gated_conv2d="routed")
    with pytest.raises(TypeError, match="tlkernels.config: knn_gemm must be a string, got int"):
        config.set(knn_gemm=1)
    assert {s.name: config.get(s.name) for s in config.SETTINGS} == before
    with config.override(gated_conv="routed", histogram="direct", knn_gemm="torch"):
        assert config.get("gated_conv") == "routed" and config.get("knn_gemm") == "torch"
        assert compiled_values()["gated_conv"] == "routed" and compiled_values()["histogram"] == "direct"
    assert {s.name: config.get(s.name) for s in config.SETTINGS} == before
    assert compiled_values()["gated_conv"] == before["gated_conv"]


def _import_with(env):
    code = ("import torch, tlkernels; from tlkernels import config; "
            "print(config.get('gated_conv'), config.get('knn_gemm'), config.get('triton_interpret'), "
            "dict(zip(*[iter(torch.ops.tlkernels._config())] * 2)))")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_the_environment_is_read_at_import_and_reaches_the_compiled_library():
    r = _import_with({"TLKERNELS_GATED_CONV": "routed", "TLKERNELS_KNN_GEMM": "numpy", "TLKERNELS_CPU_ISA": "scalar",
                      "TRITON_INTERPRET": "true"})  # (Triton's own syntax for its variable: 1, true, on, ...)
    assert r.returncode == 0, r.stderr[-2000:]
    gc, gemm, interpret, compiled = r.stdout.split(" ", 3)
    assert (gc, gemm, interpret) == ("routed", "numpy", "1")
    assert eval(compiled) == {"gated_conv": "routed", "cpu_isa": "scalar",
                              "histogram": os.environ.get("TLKERNELS_HISTOGRAM") or "auto"}


@pytest.mark.parametrize("var,value,choices", [
    ("TLKERNELS_GATED_CONV", "fastest", "auto, heuristic, routed, mix, blended, grouped, concat, brgemm, bmm, "
                                        "twoconv, triton, reference"),
    ("TLKERNELS_CPU_ISA", "avx9000", "native, avx512, avx2, scalar"),
    ("TLKERNELS_KNN_GEMM", "mkl", "auto, torch, numpy"),
    ("TLKERNELS_BACKEND", "Reference", "auto, reference")])
def test_a_bad_environment_value_stops_the_import_with_a_clear_error(var, value, choices):
    r = _import_with({var: value})
    assert r.returncode != 0
    assert f"ValueError: tlkernels: {var} must be one of {choices}, got '{value}'" in r.stderr, r.stderr[-2000:]


def test_readme_shows_the_table():
    assert config.table() in (ROOT / "README.md").read_text()


def test_no_setting_is_read_from_the_environment_elsewhere():
    """One home: only tlkernels/config.py reads the settings' variables (Python os.environ, C++ getenv)."""
    names = "|".join(re.escape(s.env) for s in config.SETTINGS)
    reads = re.compile(rf"(environ(\.get)?[\[(]\s*[\"']({names})|getenv\(\s*\"({names}))")
    found = [f"{p.relative_to(ROOT)}" for p in [*ROOT.glob("tlkernels/**/*.py"), *ROOT.glob("csrc/**/*.[ch]*")]
             if p.name != "config.py" and reads.search(p.read_text())]
    assert not found, found
    assert not any("getenv" in p.read_text() for p in ROOT.glob("csrc/ops/**/*.[ch]*")), "C++ reads no environment"
