"""Ahead-of-time compile every Triton kernel for real GPU targets (sm80 Ampere, sm90 Hopper) without a GPU.

The interpreter (TRITON_INTERPRET=1) executes the kernels' logic on the CPU but never runs Triton's
compiler; this catches what only the compiler sees (layout, dot shapes, dtype rules). Run as
`python -m tlkernels.triton._aot` with TRITON_INTERPRET unset; CI does (python_tests/test_gated_conv2d_triton.py).
"""
import os
import sys

CONSTEXPR = "constexpr"


def _unwrap(kernel):
    """The JITFunction under autotuner / heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def uncovered_kernels(cases):
    """Names of launched kernels (module-level `*_kernel` objects of tlkernels.triton) that no AOT case compiles,
    so that adding a kernel without an AOT case (aot_cases.py) fails CI instead of shipping uncompiled."""
    import importlib
    import pkgutil

    import tlkernels.triton as pkg
    from triton.runtime.jit import JITFunction
    covered = {id(_unwrap(k)) for _, k, _, _ in cases}
    missing = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in sorted(vars(mod).items()):
            launched = name.endswith("_kernel") and (isinstance(obj, JITFunction) or hasattr(obj, "fn"))
            if not launched:
                continue
            if id(_unwrap(obj)) not in covered:
                missing.append(f"{info.name}.{name}")
    return missing


# Shared memory one block may use (opt-in maximum): sm80 (A100) 163 KB, sm90 (H100) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


# Integer arguments as the launch of a ResNet layer1 3x3 convolution passes them (batch 32, 64 channels, 56x56,
# stride/padding/dilation 1, NCHW contiguous, gate (N, C_out)): at launch Triton specialises an int that is
# 1 to a constant and one divisible by 16 with a divisibility hint, and every tensor pointer is 16-byte
# aligned, so the AOT compile gives each kernel the same hints as that launch.
RESNET_LAYER1 = dict(C_in_g=64, C_IN_G=64, C_OUT=64, C_OUT_G=64, H=56, W=56, OH=56, OW=56, K_TOTAL=576, P=3136,
                     P_IN=3136, sxn=200704, sxc=3136, sxh=56, sxw=1, syn=200704, syc=3136, syh=56, syw=1,
                     sgn=64, sgc=1, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1,
                     # split reductions: rows per split are a multiple of 64 (row_splits), 100352 rows in 4 splits
                     N=32, W_NUMEL=36864, ROWS_PER_SPLIT=25088, PIX_PER_SPLIT=1600)


def _source(kernel, types, constexprs):
    from triton.compiler import ASTSource
    fn = _unwrap(kernel)
    realistic = fn.__name__.startswith("_gated_conv_")
    if realistic:  # R_TOTAL: C_out*KH*KW (dx) or N*P (dw); 576 and 100352 both divide by 16
        ints = dict(RESNET_LAYER1, R_TOTAL=576)
        constexprs = dict({n: 1 for n in fn.arg_names if ints.get(n) == 1 and n not in types}, **constexprs)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = CONSTEXPR
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = types.get("*", "*fp32")
        else:
            sig[name] = "i32"
    attrs = {}
    if realistic:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != CONSTEXPR
                 and (sig[n].startswith("*") or ints.get(n, 0) % 16 == 0 and n in ints)}
    return ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()},
                     attrs=attrs)


def compile_kernel(kernel, types, constexprs, ccs=(80, 90)):
    """Compile one specialisation for each target; returns the cubin sizes (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    src = _source(kernel, types, constexprs)
    return [len(triton.compile(src, target=GPUTarget("cuda", cc, 32)).asm["cubin"]) for cc in ccs]


def resource_usage(kernel, types, constexprs, num_warps, num_stages, cc):
    """{shared, registers, spills} of one kernel specialisation compiled for sm_<cc>: shared memory from
    Triton's metadata, registers and spill stores from ptxas -v (Triton's own ptxas) on the same PTX."""
    import re
    import subprocess
    import tempfile

    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    k = triton.compile(_source(kernel, types, constexprs), target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{cc}a" if cc == 90 else f"--gpu-name=sm_{cc}", f.name,
                            "-o", os.devnull], capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    return dict(shared=int(k.metadata.shared), registers=int(regs.group(1)) if regs else None,
                spills=int(spills.group(1)) if spills else 0)


def config_cases(dtypes=("fp32", "bf16", "fp16", "fp64")):
    """(name, kernel, types, constexprs without the tile sizes, dtype) of each implicit-GEMM kernel, for the
    autotune-config sweep."""
    return [(n, k, t, {c: v for c, v in cs.items() if not c.startswith("BLOCK_")}, n.split("[")[1].split("]")[0])
            for n, k, t, cs in all_kernels() if n.startswith("gated_conv2d.") and "," not in n
            and n.split("[")[1].split("]")[0] in dtypes]


def sweep(dtypes=("fp32", "bf16", "fp16", "fp64"), ccs=(80, 90)):
    """Every autotune config of every implicit-GEMM kernel and dtype compiled for every target: yields a dict
    each with its shared memory, registers and spills, and whether it fits (shared memory within the
    target's limit, no spills)."""
    from tlkernels.triton._common import GEMM_CONFIGS
    for name, kernel, types, consts, dt in config_cases(dtypes):
        for (m, n, kk, w, st) in GEMM_CONFIGS:
            for cc in ccs:
                use = resource_usage(kernel, types, dict(consts, BLOCK_M=m, BLOCK_N=n, BLOCK_K=kk), w, st, cc)
                fits = use["shared"] <= SHARED_LIMIT[cc] and use["spills"] == 0
                yield dict(kernel=name.split(".")[1].split("[")[0], dtype=dt, config=[m, n, kk, w, st], cc=cc,
                           fits=fits, **use)


def fitting_table(rows, ccs=(80, 90)):
    """{"fits": {kernel: {dtype: [configs that fit on every target]}}, "measured": the rows} of a sweep."""
    ok = {}
    for r in rows:
        ok.setdefault((r["kernel"], r["dtype"], tuple(r["config"])), []).append(r["fits"])
    fits = {}
    for (k, d, c), f in sorted(ok.items()):
        if len(f) == len(ccs) and all(f):
            fits.setdefault(k, {}).setdefault(d, []).append(list(c))
    return {"fits": fits, "measured": rows}


def _check_one(job):
    """(line, failure or None) of one fitting config compiled for one target (run in a worker process)."""
    i, config, cc = job
    name, kernel, types, consts, _ = config_cases()[i]
    m, n, kk, w, st = config
    use = resource_usage(kernel, types, dict(consts, BLOCK_M=m, BLOCK_N=n, BLOCK_K=kk), w, st, cc)
    ok = use["shared"] <= SHARED_LIMIT[cc] and use["spills"] == 0
    line = f"{'ok  ' if ok else 'FAIL'} {name} config {config} sm{cc}: {use}"
    return line, None if ok else line


def check_fitting(dtypes=("fp32", "bf16", "fp16", "fp64"), ccs=(80, 90), jobs=2):
    """Compile every config the fitting table keeps for `dtypes`, for every target (`jobs` processes); returns
    the failures: a kept config that spills or exceeds shared memory, or a kernel and dtype without a config."""
    import multiprocessing as mp

    from tlkernels.triton._common import fitting_configs
    table = fitting_configs()
    failures, work = [], []
    for i, (name, _, _, _, dt) in enumerate(config_cases()):
        keep = sorted(table.get((name.split(".")[1].split("[")[0], dt), ()))
        if not keep:
            failures.append(f"{name}: no fitting config")
        if dt in dtypes:
            work += [(i, c, cc) for c in keep for cc in ccs]
    with mp.get_context("spawn").Pool(jobs) as pool:
        for line, failure in pool.imap(_check_one, work):
            print(line, flush=True)
            if failure:
                failures.append(failure)
    return failures


def all_kernels():
    """(name, kernel, pointer-type map, constexprs) for every Triton kernel of the package."""
    from tlkernels.triton.aot_cases import aot_cases
    return aot_cases()


def main():
    """python -m tlkernels.triton._aot [--sweep [--write] | --configs]: compile and check the kernels."""
    from tlkernels._extension import interpret_mode
    if interpret_mode():
        sys.exit("tlkernels.triton._aot: unset TRITON_INTERPRET; the interpreter replaces the compiler")
    if "--sweep" in sys.argv:  # measure every candidate config; --write: keep those that fit
        import json
        rows = []
        for r in sweep():
            print(json.dumps(r), flush=True)
            rows.append(r)
        if "--write" in sys.argv:
            from tlkernels._io import atomic_write_text
            from tlkernels.triton._common import FITTING_FILE
            atomic_write_text(json.dumps(fitting_table(rows), indent=1) + "\n", FITTING_FILE)
        return
    if "--configs" in sys.argv:  # every config autotuning may launch, compiled and checked (every dtype)
        dts = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--dtypes=")]
        failures = check_fitting(tuple(dts[0].split(",")) if dts else ("fp32", "bf16", "fp16", "fp64"))
        print(f"{len(failures)} failed")
        sys.exit(1 if failures else 0)
    cases = all_kernels()
    missing = uncovered_kernels(cases)
    for name in missing:
        print(f"FAIL {name}: launched kernel without an AOT case in tlkernels/triton/aot_cases.py", flush=True)
    failures = len(missing)
    for name, kernel, types, consts in cases:
        try:
            sizes = compile_kernel(kernel, types, consts)
            print(f"ok   {name}: cubin bytes sm80/sm90 = {sizes}", flush=True)
        except Exception as e:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    print(f"{failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
