"""Ahead-of-time compile every Triton kernel for real GPU targets (sm80 Ampere, sm90 Hopper) without a GPU.

The interpreter (TRITON_INTERPRET=1) executes the kernels' logic on the CPU but never runs Triton's
compiler; this catches what only the compiler sees (layout, dot shapes, dtype rules). Run as
`python -m tlkernels.triton._aot` with TRITON_INTERPRET unset; CI does (python_tests/test_triton_aot.py).
"""
import os
import sys

CONSTEXPR = "constexpr"


def compile_kernel(kernel, types, constexprs, ccs=(80, 90)):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)  # unwrap the autotuner
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
    failures = 0
    for name, kernel, types, consts in all_kernels():
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
