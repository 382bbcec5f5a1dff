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


def test_on_cuda_every_check_runs_with_tf32_off_and_the_conv_paths_again_with_it_on(monkeypatch):
    """The plan of `run` for a CUDA device, with the checks replaced by recorders (no GPU here): float32 budgets
    hold only with TF32 off, so every check runs so; the TF32 rows carry a 10-bit format's budget."""
    seen = []

    def recorder(name):
        def check(rep, device, *args):
            seen.append((name, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            rep.add(name, "case", 1e-3, 2e-4 if name != "devices" else 1.0)
        return check

    for name in ("gated_conv2d", "cross_entropy", "l2sp", "histogram_knn", "methods", "devices"):
        monkeypatch.setattr(selfcheck, f"check_{name}", recorder(name))
    rep = selfcheck.run(torch.device("cuda"))
    off = [n for n, cudnn, mm in seen if not cudnn and not mm]
    on = [n for n, cudnn, mm in seen if cudnn and mm]
    assert off == ["gated_conv2d", "cross_entropy", "l2sp", "histogram_knn", "methods", "devices"], seen
    assert on == ["gated_conv2d", "methods", "histogram_knn"], seen
    tf32_rows = [r for r in rep.rows if r["case"].endswith("TF32")]
    assert len(tf32_rows) == 3 and all(r["ok"] and r["budget"] == selfcheck.TF32_BUDGET for r in tf32_rows)
    assert not any(r["ok"] for r in rep.rows if not r["case"].endswith("TF32") and r["op"] != "devices")


def test_the_cuda_only_checks_run_on_cpu_tensors_too():
    """check_l2sp_many (several multi-tensor launches on a GPU) is device-generic code: it passes on the CPU."""
    rep = selfcheck.Report()
    selfcheck.check_l2sp_many(rep, torch.device("cpu"))
    assert len(rep.rows) == 2 * 61 and all(r["ok"] for r in rep.rows), [r for r in rep.rows if not r["ok"]][:3]
