#!/usr/bin/env bash
# One run that records what tlkernels does on a GPU, sized for a short slot (under 10 minutes on one H100, the
# build included) on a machine with no network and a CUDA build of torch already installed:
#
#   bash tools/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--stages env,build,selfcheck,tests,bench]
#
# Stages, each stopped at its budget (seconds; GPU_CHECK_BUDGET_<STAGE> overrides) so that the rest still run:
#   env        the GPU, driver, Python packages                          -> OUT_DIR/env.txt
#   build      the extension against the torch already there, for the visible GPU's arch only, all cores
#              (python setup.py build_ext --inplace: nothing is installed or downloaded) -> OUT_DIR/build.log
#   selfcheck  python -m tlkernels.selfcheck --device D --bench --json OUT_DIR/selfcheck.json
#   tests      the tests with CUDA cases (pytest -m cuda)                  -> OUT_DIR/tests.log, tests.xml
#   bench      the pytest-benchmark files on device D (CUDA events), rows appended to OUT_DIR/results.csv
# Prints one summary line per stage ("stage NAME: ok|FAIL (rc N)|TIMEOUT|SKIP (why), S s of B s") and exits
# non-zero when a stage did not pass. --device cpu runs the same stages on the CPU (how CI tests this script);
# --quick takes selfcheck --quick, a few tests and two benchmark cases (a gated convolution, the joint cross-entropy).
set -u

usage() {
  echo "usage: bash tools/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--stages LIST]" >&2
  echo "  LIST: comma-separated among env,build,selfcheck,tests,bench (default: all, in that order)" >&2
  exit 2
}

STAGES_ALL="env build selfcheck tests bench"
declare -A BUDGET=([env]=20 [build]=300 [selfcheck]=90 [tests]=90 [bench]=90)

OUT="" DEVICE=cuda QUICK=0 STAGES="$STAGES_ALL"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || usage; DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --stages) [ $# -ge 2 ] || usage; STAGES="${2//,/ }"; shift 2 ;;
    --stages=*) STAGES="${1#*=}"; STAGES="${STAGES//,/ }"; shift ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUT_DIR, got '$OUT' and '$1'" >&2; usage; }; OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: OUT_DIR is missing" >&2; usage; }
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; usage ;; esac
for s in $STAGES; do
  case " $STAGES_ALL " in *" $s "*) ;; *) echo "gpu_check.sh: unknown stage '$s' (stages: $STAGES_ALL)" >&2; usage ;; esac
done
for s in $STAGES_ALL; do
  v="GPU_CHECK_BUDGET_${s^^}"
  if [ -n "${!v:-}" ]; then
    [[ "${!v}" =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || { echo "gpu_check.sh: $v must be a positive number of seconds, got '${!v}'" >&2; exit 2; }
    BUDGET[$s]="${!v}"
  fi
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT_DIR $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, whatever is installed
export TLKERNELS_RESULTS="$OUT/results.csv"             # benchmark rows go to OUT_DIR, not the repository
export TLKERNELS_BENCH_DEVICE="$DEVICE"
NPROC="$(nproc 2>/dev/null || echo 4)"
PY="${PYTHON:-python}"
FAILED=0
SUMMARY=()

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# run_stage NAME CMD...: runs CMD under the stage's budget; its output goes to OUT_DIR/NAME.log and the screen.
run_stage() {
  local name="$1"; shift
  local budget="${BUDGET[$name]}" t0 rc secs status
  echo "=== $name (budget ${budget} s): $*"
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then status="ok"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; FAILED=1
  else status="FAIL (rc $rc)"; FAILED=1
  fi
  SUMMARY+=("stage $name: $status, $secs s of $budget s")
  echo "stage $name: $status, $secs s of $budget s"
}

skip_stage() {
  SUMMARY+=("stage $1: SKIP ($2)")
  echo "stage $1: SKIP ($2)"
  FAILED=1
}

stage_env() {
  {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    echo "device $DEVICE, $NPROC cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "| sm", f"{p.major}{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1), "| visible", torch.cuda.device_count())
for m in ("triton", "torchvision", "numpy", "pytest", "pytest_benchmark", "threadpoolctl", "tqdm", "ninja"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except ImportError:
        print(m, "MISSING")
EOF
  } | tee "$OUT/env.txt"
}

for stage in $STAGES; do
  case "$stage" in
    env) export -f stage_env; export OUT DEVICE NPROC PY; run_stage env bash -c stage_env ;;
    build)
      if [ "$DEVICE" = cpu ]; then  # (the CPU run checks the stages, not nvcc: CPU kernels only)
        run_stage build env TLKERNELS_NO_CUDA=1 MAX_JOBS="$NPROC" "$PY" setup.py build_ext --inplace
      else  # tools/find_cuda.py: the visible GPU's arch (+PTX)
        run_stage build env MAX_JOBS="$NPROC" "$PY" setup.py build_ext --inplace
      fi ;;
    selfcheck)
      q=(); [ $QUICK -eq 1 ] && q=(--quick)
      run_stage selfcheck "$PY" -m tlkernels.selfcheck --device "$DEVICE" --bench "${q[@]}" --json "$OUT/selfcheck.json" ;;
    tests)
      if has_module pytest; then
        k=(); [ $QUICK -eq 1 ] && k=(-k "split_reductions or nan_hard or never_sync")
        run_stage tests "$PY" -m pytest -m cuda python_tests -q -p no:cacheprovider --junitxml "$OUT/tests.xml" "${k[@]}"
      else skip_stage tests "pytest is not installed"; fi ;;
    bench)
      if has_module pytest_benchmark; then
        k=(); [ $QUICK -eq 1 ] && k=(-k "(512ch7px1x1 and fwd_hard_filter) or joint_cross_entropy")
        run_stage bench "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" "${k[@]}"
      else skip_stage bench "pytest-benchmark is not installed"; fi ;;
  esac
done

echo "=== summary ($DEVICE, results in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit $FAILED
