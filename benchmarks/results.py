"""Benchmark results as data: every pytest-benchmark run appends one row per (case, provider) to
benchmarks/results.csv with the run's hardware and software context (the model: Liger-Kernel's
benchmark/data/all_benchmark_data.csv). `python benchmarks/report.py` renders the README tables from it.

Columns: run (id of one pytest session), date, commit, benchmark (file), case (the benchmark group), provider,
median_ms, iqr_ms, rounds, baseline (the provider ratios are taken against: extra_info "baseline", default
naive), ratio (baseline median / this median, same run; the baseline's median over this provider's rounds where
it was paired with them, see conftest.run), extra (other extra_info as JSON, incl. paired_ms: {provider: median
ms over this provider's rounds}), and the context:
cpu, isa, cores, threads, isa_cap (the ISA_CAPS set), torch, mkl, onednn, gpu, malloc (`steady`: glibc set to
keep freed memory, conftest.steady_allocator; `default`: glibc's defaults or another allocator), device (cpu or
cuda: the tensors' device; on cuda the times are CUDA events', conftest.clock).
"""
import csv
import datetime
import json
import os
import platform
import subprocess
import uuid

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.csv")
COLUMNS = ["run", "date", "commit", "benchmark", "case", "provider", "median_ms", "iqr_ms", "rounds", "baseline",
           "ratio", "extra", "cpu", "isa", "cores", "threads", "isa_cap", "torch", "mkl", "onednn", "gpu", "malloc",
           "device"]
# x86 ISA features that decide which kernels run (oneDNN's, MKL's and ours), in order of generation.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
# The variables that cap the instruction set of a run's kernels: ours first, then the libraries'.
ISA_CAPS = (("TLKERNELS_CPU_ISA", "tlkernels"), ("ATEN_CPU_CAPABILITY", "ATen"), ("ONEDNN_MAX_CPU_ISA", "oneDNN"),
            ("MKL_ENABLE_INSTRUCTIONS", "MKL"))


def isa_cap():
    """The caps set: TLKERNELS_CPU_ISA's value alone when only ours is capped, else each cap named."""
    caps = [(name, os.environ[var]) for var, name in ISA_CAPS if os.environ.get(var)]
    if [name for name, _ in caps] == ["tlkernels"]:
        return caps[0][1]
    return ", ".join(f"{name} {value}" for name, value in caps)


def cpu_model_and_isa():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, "+".join(f for f in ISA_FLAGS if f in flags) or "unknown"


def _versions():
    cfg = torch.__config__.show()

    def find(key):
        for line in cfg.splitlines():
            if key in line:
                return line.split(key, 1)[1].strip(" :,").split(" for ")[0].split(" (")[0]
        return ""

    return find("Intel(R) oneAPI Math Kernel Library Version"), find("Intel(R) MKL-DNN v")


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        # (the results file, which every run appends to, is data: it alone does not make the code dirty)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude)results.csv"], cwd=HERE, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def context(steady_malloc=False):
    cpu, isa = cpu_model_and_isa()
    mkl, onednn = _versions()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), commit=_commit(),
                cpu=cpu, isa=isa, cores=os.cpu_count(), threads=torch.get_num_threads(),
                isa_cap=isa_cap(), torch=torch.__version__, mkl=mkl, onednn=onednn,
                gpu=gpu, malloc="steady" if steady_malloc else "default")


def reference_ms(paired_ms, reference, medians_ms):
    """A reference provider's time for one provider's ratio: its median over that provider's own rounds where
    the two were paired (conftest.run, paired_ms), else its own median in the run; None when it has neither."""
    return paired_ms.get(reference, medians_ms.get(reference))


def rows_of(benchmarks, steady_malloc=False):
    """CSV rows from pytest-benchmark's Metadata objects of one session."""
    ctx = context(steady_malloc)
    run = uuid.uuid4().hex[:10]
    by_case = {}
    for b in benchmarks:
        if b.has_error or not b:
            continue
        info = dict(b.extra_info)
        provider = info.pop("provider", b.name)
        baseline = info.pop("baseline", "naive")
        device = info.pop("device", "cpu")
        bench = os.path.splitext(os.path.basename(b.fullname.split("::")[0]))[0]
        by_case.setdefault((bench, b.group, device), []).append((provider, baseline, b.stats, info))
    rows = []
    for (bench, case, device), entries in by_case.items():
        medians_ms = {p: s.median * 1e3 for p, _, s, _ in entries}
        for provider, baseline, s, info in entries:
            base = reference_ms(info.get("paired_ms", {}), baseline, medians_ms)
            ratio = base / (s.median * 1e3) if base and s.median > 0 else ""
            rows.append(dict(ctx, run=run, benchmark=bench, case=case, provider=provider,
                             median_ms=f"{s.median * 1e3:.4f}", iqr_ms=f"{s.iqr * 1e3:.4f}", rounds=s.rounds,
                             baseline=baseline, ratio=f"{ratio:.4f}" if ratio != "" else "",
                             extra=json.dumps(info, sort_keys=True) if info else "", device=device))
    return rows


def append(rows, path=RESULTS):
    """Append rows (header written for a new file); one write per run, so a run's rows stay together. A file
    with an older header (fewer columns) is first rewritten atomically with today's (new cells empty)."""
    if not rows:
        return
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != COLUMNS:
            old = load(path)
            tmp = path + ".tmp"
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())


def load(path=RESULTS):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
