"""tools/gpu_check.sh, run here with --device cpu: its argument handling, its per-stage budgets (a stage that
overruns is stopped and the rest still run) and its stages end to end on the CPU."""
import csv
import json
import os
import subprocess

import pytest
from conftest import background_result, start_background

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def gpu_check(*args, env=None, timeout=900):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args,env,message", [
    ((), {}, "OUT_DIR is missing"),
    (("OUT", "--device", "tpu"), {}, "--device must be cuda or cpu, got 'tpu'"),
    (("OUT", "--stages", "env,fit"), {}, "unknown stage 'fit'"),
    (("OUT", "OTHER"), {}, "one OUT_DIR, got "),
    (("OUT", "--fast"), {}, "unknown option --fast"),
    (("OUT", "--stages"), {}, "usage"),
    (("OUT",), {"GPU_CHECK_BUDGET_BUILD": "ten"}, "GPU_CHECK_BUDGET_BUILD must be a positive number of seconds"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, env, message):
    args = tuple(str(tmp_path / a) if a in ("OUT", "OTHER") else a for a in args)
    r = gpu_check(*args, env=env, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "OUT" / "summary.txt").exists()


def test_a_stage_over_its_budget_is_stopped_and_the_rest_still_run(tmp_path):
    r = gpu_check(str(tmp_path), "--device", "cpu", "--stages", "selfcheck,env",
                  env={"GPU_CHECK_BUDGET_SELFCHECK": "2"}, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("stage selfcheck: TIMEOUT, ") and summary[0].endswith(" of 2 s"), summary
    assert summary[1].startswith("stage env: ok, "), summary
    env = (tmp_path / "env.txt").read_text()
    assert "torch" in env and "device cpu" in env


def start_stages():
    """The end-to-end run, started at collection at the lowest CPU priority (its stages' budgets raised: the run
    shares the CPU with the suite; the budgets' own test is above)."""
    budgets = {f"GPU_CHECK_BUDGET_{s}": "1500" for s in ("SELFCHECK", "TESTS", "BENCH")}
    start_background("gpu-check", ["bash", SCRIPT, "--device", "cpu", "--quick", "--stages", "selfcheck,tests,bench"],
                     env=dict(os.environ, **budgets), workdir=True)


@pytest.mark.background.with_args(start_stages)  # (runs beside the suite from its start)
def test_the_stages_end_to_end_on_the_cpu():
    """selfcheck, the tests marked cuda (Triton's interpreter here) and the benchmarks on the device, quick."""
    start_stages()  # (run alone, the test starts it now)
    with background_result("gpu-check", timeout=3000) as (returncode, stdout, stderr, out):
        summary = (out / "summary.txt").read_text().splitlines()
        assert returncode == 0 and [s.split(":")[1].split(",")[0].strip() for s in summary] == ["ok"] * 3, \
            stdout[-3000:] + stderr[-2000:]
        check = json.loads((out / "selfcheck.json").read_text())
        assert check["device"] == "cpu" and check["checks"] and all(c["ok"] for c in check["checks"]) and check["speed"]
        assert "passed" in (out / "tests.log").read_text()
        rows = list(csv.DictReader(open(out / "results.csv")))
        assert rows and {row["device"] for row in rows} == {"cpu"}
        assert {row["benchmark"] for row in rows} == {"test_bench_gated_conv2d", "test_bench_losses"}
