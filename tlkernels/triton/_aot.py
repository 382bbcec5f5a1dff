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
    so that adding a kernel without a registry entry fails CI instead of shipping uncompiled."""
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


def compile_kernel(kernel, types, constexprs, ccs=(80, 90)):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _unwrap(kernel)
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
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    return [len(triton.compile(src, target=GPUTarget("cuda", cc, 32)).asm["cubin"]) for cc in ccs]


def all_kernels():
    """(name, kernel, pointer-type map, constexprs) for every Triton kernel of the package."""
    from tlkernels.triton import registry
    return registry.aot_cases()


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("tlkernels.triton._aot: unset TRITON_INTERPRET; the interpreter replaces the compiler")
    cases = all_kernels()
    missing = uncovered_kernels(cases)
    for name in missing:
        print(f"FAIL {name}: launched kernel without an AOT case in tlkernels/triton/registry.py", flush=True)
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
