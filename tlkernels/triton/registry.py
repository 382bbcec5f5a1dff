"""The list of Triton kernels with representative specialisations, for AOT compilation in CI."""


def aot_cases():
    from tlkernels.triton import gated_conv2d as gc

    cases = []
    blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    for dt in ("fp32", "bf16", "fp16"):
        io = {"*": f"*{dt}"}
        cases.append((f"gated_conv2d.fwd[{dt}]", gc._gated_conv_fwd_kernel, io,
                      dict(KH=3, KW=3, HAS_BIAS=True, HARD=False, IS_F64=False, **blocks)))
        cases.append((f"gated_conv2d.dx[{dt}]", gc._gated_conv_dx_kernel, io,
                      dict(KH=3, KW=3, HARD=True, IS_F64=False, **blocks)))
        cases.append((f"gated_conv2d.dw[{dt}]", gc._gated_conv_dw_kernel, io,
                      dict(KH=3, KW=3, HARD=False, NEED_P=True, NEED_F=True, IS_F64=False, **blocks)))
        cases.append((f"gated_conv2d.dgate[{dt}]", gc._gated_conv_dgate_kernel, {**io, "dg_ptr": "*fp32"},
                      dict(KH=1, KW=1, HAS_BIAS=True, IS_F64=False, **blocks)))
    return cases
