"""TLKERNELS_CHOICE_CACHE: the measured strategy choices written at exit and taken by the next process on the
same host and build; another host's, or an unreadable file, is ignored (with a warning) and rewritten."""
import json
import os
import subprocess
import sys

import pytest

from tlkernels._extension import HAS_C

pytestmark = pytest.mark.skipif(not HAS_C, reason="the cached choices are the compiled ops' and the kNN GEMM's")

# One gated convolution (CPU, auto: measured) and one kNN search; prints the strategies the convolution took.
SCRIPT = r"""
import json, sys, torch
import tlkernels
from tlkernels.ops import gated_conv2d, knn_search
print(json.dumps({"loaded": list(torch.ops.tlkernels._measured_choices())}))
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 8, 7, 7, generator=g)
wp, wf = torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, 8, 3, 3, generator=g)
with torch.no_grad():
    gated_conv2d(x, wp, wf, torch.rand(4, 16, generator=g), padding=1)
q = torch.rand(9, 12, generator=g)
knn_search(q, torch.rand(50, 12, generator=g), 3)
print(json.dumps({"used": list(torch.ops.tlkernels._gated_conv2d_last_strategies())}))
"""


def run(cache):
    env = {**os.environ, "TLKERNELS_CHOICE_CACHE": str(cache), "TLKERNELS_GATED_CONV": "auto",
           "TLKERNELS_KNN_GEMM": "auto"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        out.update(json.loads(line))
    return out, r.stderr


def test_choices_are_saved_and_taken_by_the_next_process(tmp_path):
    cache = tmp_path / "sub" / "choices.json"
    first, _ = run(cache)
    assert first["loaded"] == []
    data = json.loads(cache.read_text())
    assert data["format"] == 2 and data["host"]["cpu"] and data["host"]["torch"]
    fwd = [k for k in data["picks"] if k.startswith("fwd|")]
    assert len(fwd) == 1 and data["picks"][fwd[0]] == first["used"][0]
    assert any(k.startswith("('knn_gemm'") for k in data["picks"])
    # a pick edited in the file is what the next process runs (it is not measured again)
    other = "concat" if first["used"][0] != "concat" else "blended"
    data["picks"][fwd[0]] = other
    cache.write_text(json.dumps(data))
    second, _ = run(cache)
    assert fwd[0] in second["loaded"] and second["used"][0] == other
    assert json.loads(cache.read_text())["picks"][fwd[0]] == other  # kept on disk


def test_another_hosts_or_an_unreadable_file_is_ignored_and_rewritten(tmp_path):
    cache = tmp_path / "choices.json"
    run(cache)
    data = json.loads(cache.read_text())
    data["host"]["cpu"] = "some other CPU"
    cache.write_text(json.dumps(data))
    out, _ = run(cache)
    assert out["loaded"] == []
    assert json.loads(cache.read_text())["host"]["cpu"] != "some other CPU"
    cache.write_text('{"format": 1, "cpp": [')
    out, err = run(cache)
    assert out["loaded"] == [] and f"choice cache {cache}: cannot be read" in err
    assert json.loads(cache.read_text())["format"] == 2
