"""`python -m tlkernels.selfcheck`: the command a GPU user runs to verify the library, run here on the CPU."""
import json
import subprocess
import sys

import pytest
import torch

from tlkernels import selfcheck

OPS = {"gated_conv2d", "cross_entropy", "joint_cross_entropy", "l2sp_penalty", "l2sp_value_and_grad",
       "optim.SGD(l2sp=)", "optim.AdamW(l2sp=)", "filterbank_histogram", "knn_search", "SpotTune eval",
       "AdaFilter eval"}


def test_quick_cpu_selfcheck_passes_and_covers_every_op(tmp_path):
    out = tmp_path / "check.json"
    assert selfcheck.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {r["op"] for r in res["checks"]} == OPS
    assert res["device"] == "cpu" and res["torch"] == torch.__version__
    cases = " ".join(r["case"] for r in res["checks"])
    for needle in ("channels_last", "N=0", "bfloat16", "routed", "concat", "blended", "s2", "label_smoothing"):
        assert needle in cases, needle


def test_a_wrong_kernel_fails_the_selfcheck(monkeypatch, capsys):
    import tlkernels.ops as ops
    real = ops.gated_conv2d
    monkeypatch.setattr(ops, "gated_conv2d", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    assert selfcheck.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "gated_conv2d" in out.split("FAIL")[0].splitlines()[-1]


def test_bench_reports_ratios(capsys):
    rows = selfcheck.bench(torch.device("cpu"), quick=True)
    assert len(rows) == 9 and all(r["naive_ms"] > 0 and r["tlkernels_ms"] > 0 for r in rows)
    assert [r["case"].rsplit(", ", 1)[1] for r in rows if "1x1" in r["case"]] == ["auto", "concat", "bmm", "blended"]


def test_command_line_and_bad_device():
    r = subprocess.run([sys.executable, "-m", "tlkernels.selfcheck", "--device", "tpu"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in r.stderr
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device is visible"):
            selfcheck.resolve_device("cuda")
