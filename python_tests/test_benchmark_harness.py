"""The benchmark harness (benchmarks/conftest.py, results.py, report.py): paired rounds and the ratios taken
from them in a real pytest-benchmark session (pytester), the results file's columns, the allocator setting."""
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

# Two providers sleeping 30 ms and 10 ms: the paired ratio is about 3x whatever else the machine does.
SLEEPS = """
import time
import pytest
from conftest import run

@pytest.mark.parametrize("provider", ["naive", "fast"])
def test_sleep(benchmark, provider):
    benchmark.group = "sleep"
    benchmark.extra_info["provider"] = provider
    d = 0.03 if provider == "naive" else 0.01
    run(benchmark, lambda: time.sleep(d), rounds=3, iterations=ITERATIONS,
        pair=None if provider == "naive" else ("naive", "absent"))  # (None: the default, the baseline itself)
"""


def _bench_module(name):
    """benchmarks/<name>.py as a fresh module (python_tests has a conftest module of its own); sys.path as
    it was (report.py puts its directory first to import results)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def _session(pytester, monkeypatch, iterations=1):
    """A pytest-benchmark session over SLEEPS with the benchmarks' harness; (its result, its results file)."""
    for f in ("conftest.py", "results.py", "report.py"):
        shutil.copy(os.path.join(BENCH, f), pytester.path / f)
    pytester.makepyfile(test_sleeps=SLEEPS.replace("ITERATIONS", str(iterations)))
    path = pytester.path / "results.csv"
    pytester.syspathinsert()
    monkeypatch.setenv("TLKERNELS_RESULTS", str(path))
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider"), path


def test_paired_rounds_give_the_ratio(pytester, monkeypatch):
    res, path = _session(pytester, monkeypatch)
    res.assert_outcomes(passed=2)
    report, results = _bench_module("report"), _bench_module("results")
    rows = results.load(str(path))
    fast = next(r for r in rows if r["provider"] == "fast")
    naive = next(r for r in rows if r["provider"] == "naive")
    paired = json.loads(fast["extra"])["paired_ms"]
    assert set(paired) == {"naive"}  # a provider not timed in the session is left out
    assert 25 < paired["naive"] < 60 and 8 < float(fast["median_ms"]) < 30
    assert 1.8 < float(fast["ratio"]) < 4.0
    assert float(fast["ratio"]) == pytest.approx(paired["naive"] / float(fast["median_ms"]), rel=1e-3)
    assert "paired_ms" not in (naive["extra"] or "")
    text = report.table(rows)
    cell = text.splitlines()[-1].split("|")[4].strip()  # the "fast vs naive" column
    assert cell.endswith("x") and "(u)" not in cell and 1.8 < float(cell[:-1]) < 4.0


def test_unpaired_ratio_is_marked():
    report = _bench_module("report")
    rows = [dict(benchmark="b", case="c", provider=p, median_ms=ms, baseline="naive", extra="")
            for p, ms in (("naive", "30"), ("fast", "10"))]
    assert report.table(rows).splitlines()[-1].split("|")[4].strip() == "3.00x (u)"


def test_pairing_needs_one_call_per_round(pytester, monkeypatch):
    res, _ = _session(pytester, monkeypatch, iterations=2)
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*pair needs iterations == 1*got iterations=2*"])


def test_results_file_with_older_header_is_rewritten(tmp_path):
    results = _bench_module("results")
    path = tmp_path / "results.csv"
    old_cols = [c for c in results.COLUMNS if c != "malloc"]
    old_row = {c: f"{c}-0" for c in old_cols}
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_cols)
        w.writeheader()
        w.writerow(old_row)
    new_row = {c: f"{c}-1" for c in results.COLUMNS}
    results.append([new_row], str(path))
    rows = results.load(str(path))
    assert open(path).readline().strip().split(",") == results.COLUMNS
    assert rows[0] == dict(old_row, malloc="") and rows[1] == new_row
    assert not os.path.exists(str(path) + ".tmp")


def test_steady_allocator_is_recorded(monkeypatch):
    monkeypatch.setenv("TLKERNELS_BENCH_MALLOC", "default")  # (before the import: it applies the setting)
    conftest = _bench_module("conftest")
    results = _bench_module("results")
    assert conftest.STEADY_ALLOCATOR is False
    assert conftest.steady_allocator() is False
    assert results.context(False)["malloc"] == "default" and results.context(True)["malloc"] == "steady"
    monkeypatch.delenv("TLKERNELS_BENCH_MALLOC")
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        # (in a child process: the setting is process-wide)
        code = f"import sys; sys.path.insert(0, {BENCH!r}); import conftest; print(conftest.STEADY_ALLOCATOR)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "True", out.stderr  # glibc accepts both settings


def test_isa_caps_are_recorded_and_name_the_table(monkeypatch):
    results, report = _bench_module("results"), _bench_module("report")
    for var, _ in results.ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    assert results.context()["isa_cap"] == ""
    monkeypatch.setenv("TLKERNELS_CPU_ISA", "avx2")
    assert results.context()["isa_cap"] == "avx2"  # (ours alone: the value, as rows before the libraries' caps)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    row = results.context()
    assert row["isa_cap"] == "tlkernels avx2, ATen avx2, oneDNN AVX2"
    assert "ISA capped at tlkernels avx2, ATen avx2, oneDNN AVX2" in report.hardware(dict(row, device="cpu"))


def test_commit_is_dirty_for_changed_code_not_for_the_results_file(tmp_path, monkeypatch):
    results = _bench_module("results")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "results.csv").write_text("run\n")
    (bench / "code.py").write_text("x = 1\n")
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    monkeypatch.setattr(results, "HERE", str(bench))
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (bench / "results.csv").write_text("run\n1\n")  # a run appended its rows
    assert results._commit() == head
    (bench / "code.py").write_text("x = 2\n")
    assert results._commit() == head + "+dirty"
