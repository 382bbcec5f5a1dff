"""The list of Triton kernels with representative specialisations, for AOT compilation in CI."""


def aot_cases():
    """(name, kernel, pointer types, constexprs) of every Triton kernel specialisation compiled ahead of time."""
    from tlkernels.triton import gated_conv2d as gc

    cases = []
    for dt in ("fp32", "bf16", "fp16", "fp64"):  # fp64: the gradcheck dtype (fp64 accumulators, fp64 dot)
        io = {"*": f"*{dt}"}
        f64 = dt == "fp64"
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, DOT_PREC="tf32" if dt == "fp32" else "ieee")
        cases.append((f"gated_conv2d.fwd[{dt}]", gc._gated_conv_fwd_kernel, io,
                      dict(KH=3, KW=3, HAS_BIAS=True, HARD=False, IS_F64=f64, CL=False, **blocks)))
        cases.append((f"gated_conv2d.dx[{dt}]", gc._gated_conv_dx_kernel, io,
                      dict(KH=3, KW=3, HARD=True, IS_F64=f64, **blocks)))
        cases.append((f"gated_conv2d.dw[{dt}]", gc._gated_conv_dw_kernel, io,
                      dict(KH=3, KW=3, HARD=False, NEED_P=True, NEED_F=True, IS_F64=f64, CL=False, **blocks)))
        cases.append((f"gated_conv2d.dgate[{dt}]", gc._gated_conv_dgate_kernel,
                      {**io, "dg_ptr": "*fp64" if f64 else "*fp32"},
                      dict(KH=1, KW=1, HAS_BIAS=True, IS_F64=f64, CL=False, **blocks)))
        if dt in ("fp32", "bf16"):  # channels_last activations (the reduction ordered (kh, kw, ci)): compiled at
            # the default tile; the autotune table is the NCHW variants' (the same tiles, other index math)
            cases.append((f"gated_conv2d.fwd[{dt}, channels_last]", gc._gated_conv_fwd_kernel, io,
                          dict(KH=3, KW=3, HAS_BIAS=True, HARD=True, IS_F64=False, CL=True, **blocks)))
            cases.append((f"gated_conv2d.dw[{dt}, channels_last]", gc._gated_conv_dw_kernel, io,
                          dict(KH=3, KW=3, HARD=False, NEED_P=False, NEED_F=True, IS_F64=False, CL=True, **blocks)))
            cases.append((f"gated_conv2d.dgate[{dt}, channels_last]", gc._gated_conv_dgate_kernel,
                          {**io, "dg_ptr": "*fp32"}, dict(KH=3, KW=3, HAS_BIAS=False, IS_F64=False, CL=True, **blocks)))

    # float32 with TF32 off (torch.backends.cudnn.allow_tf32 = False): IEEE float32 dots
    cases.append(("gated_conv2d.fwd[fp32, ieee]", gc._gated_conv_fwd_kernel, {"*": "*fp32"},
                  dict(KH=3, KW=3, HAS_BIAS=True, HARD=False, IS_F64=False, CL=False, BLOCK_M=64, BLOCK_N=64,
                       BLOCK_K=32, DOT_PREC="ieee")))

    from tlkernels.triton import cross_entropy as ce
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        for soft in (False, True):
            acc = "*fp64" if dt == "fp64" else "*fp32"
            types = {"*": acc, "x_ptr": f"*{dt}", "q_ptr": f"*{dt}", "g_ptr": f"*{dt}", "t_ptr": "*i64",
                     "scale": "fp32"}
            cases.append((f"cross_entropy[{dt}, soft={soft}]", ce._ce_kernel, types,
                          dict(SOFT=soft, HAS_W=True, MEAN=True, COMPUTE_GRAD=True, BLOCK=1024, IS_F64=dt == "fp64")))

    from tlkernels.triton import histogram as hist
    cases.append(("filterbank_histogram.bin_rows[100 bins]", hist._bin_rows_kernel, {"*": "*fp32"},
                  dict(NB=100, NB_POW2=128, STEPS=7, BLOCK=1024)))
    return cases
