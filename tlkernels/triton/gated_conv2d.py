"""Triton kernels of the gated convolution (implicit GEMM), forward and backward.

Forward: one program per (image, tile of output pixels) x (group, tile of output filters). The
weight operand is blended per image inside the K loop, W_b = Wp + g[b, n] * (Wf - Wp), so a soft or
hard gate costs one convolution's FLOPs and no per-branch output is ever written.
Backward:
  dx   implicit GEMM of dy with the per-image blended weights (transposed conv)
  dW   one kernel for dWf = sum (g*dy) x_col and, only when asked, dWp = sum ((1-g)*dy) x_col
  dg   dg[b, c] = sum_hw dy * (conv(x, Wf - Wp) + bf - bp): the forward tile with the difference
       weight and a multiply-reduce epilogue; one program loops over an image's pixel tiles, so the
       sum is deterministic (no atomics) and nothing full-size is stored.
"""
import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from tlkernels.ops._utils import conv_output_hw
from tlkernels.triton._common import device_of, gemm_configs, prune_to_fitting


@triton.jit
def _tile(pid, size, BLOCK: tl.constexpr):
    """Split a grid index running over (outer, tiles of `size`): returns outer, the tile's offsets, their mask.
    Every kernel here lays one grid axis out this way (image x pixel tiles, group x filter tiles)."""
    n_tiles = tl.cdiv(size, BLOCK)
    offs = (pid % n_tiles) * BLOCK + tl.arange(0, BLOCK)
    # outer (an image or group index) as int64: b * stride_n exceeds 2^31 in tensors above 2^31 elements
    return (pid // n_tiles).to(tl.int64), offs, offs < size


@triton.jit
def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_F64: tl.constexpr):
    """The accumulator tile: float64 for the gradcheck dtype, float32 for every other input dtype."""
    return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if IS_F64 else tl.float32)


@triton.jit
def _k_parts(offs_k, C_in_g, KH: tl.constexpr, KW: tl.constexpr, CL: tl.constexpr):
    """(ci, kh, kw) of reduction indices k: ordered (ci, kh, kw) for NCHW activations, (kh, kw, ci) for
    channels_last ones (CL), so that neighbouring k read neighbouring addresses (coalesced loads); the weights
    are passed in the same order (_k_ordered)."""
    if CL:
        ci = offs_k % C_in_g
        r = offs_k // C_in_g
    else:
        ci = offs_k // (KH * KW)
        r = offs_k % (KH * KW)
    return ci, r // KW, r % KW


@triton.jit
def _conv_tile(x_ptr, wp_ptr, wf_ptr, b, grp, offs_m, m_mask, co, n_mask, g, C_in_g, H, W, OW, K_TOTAL,
               sxn, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
               KH: tl.constexpr, KW: tl.constexpr, DIFF: tl.constexpr, IS_F64: tl.constexpr, CL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """acc[m, n] = sum_k x_col[b, m, k] * W[n, k], W blended per image (DIFF=False) or Wf - Wp (DIFF=True)."""
    oh = offs_m // OW
    ow = offs_m % OW
    acc = _acc_zeros(BLOCK_M, BLOCK_N, IS_F64)
    x_base = x_ptr + b * sxn + grp * C_in_g * sxc
    for k0 in range(0, K_TOTAL, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K_TOTAL
        ci, kh, kw = _k_parts(offs_k, C_in_g, KH, KW, CL)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        xm = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_base + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=xm, other=0.0)
        woff = co[None, :] * K_TOTAL + offs_k[:, None]
        wm = k_mask[:, None] & n_mask[None, :]
        wpt = tl.load(wp_ptr + woff, mask=wm, other=0.0).to(acc.dtype)
        wft = tl.load(wf_ptr + woff, mask=wm, other=0.0).to(acc.dtype)
        if DIFF:
            wt = wft - wpt
        else:
            wt = wpt + g[None, :] * (wft - wpt)
        acc += tl.dot(xt, wt.to(xt.dtype), out_dtype=acc.dtype, input_precision=DOT_PREC)
    return acc


@triton.jit
def _load_gate(g_ptr, b, co, n_mask, sgn, sgc, HARD: tl.constexpr, IS_F64: tl.constexpr):
    g = tl.load(g_ptr + b * sgn + co * sgc, mask=n_mask, other=0.0).to(tl.float64 if IS_F64 else tl.float32)
    if HARD:
        g = _binarise(g)
    return g


@triton.jit
def _binarise(g):
    """Hard gates: (g >= 0.5) as 0/1 in g's dtype, a NaN gate staying NaN (its outputs are NaN, as the blend's)."""
    return tl.where(g != g, g, tl.where(g >= 0.5, 1.0, 0.0)).to(g.dtype)


@triton.autotune(configs=gemm_configs(), key=["C_OUT_G", "K_TOTAL", "P"],
                 prune_configs_by=prune_to_fitting("fwd", "x_ptr"))
@triton.jit
def _gated_conv_fwd_kernel(x_ptr, wp_ptr, wf_ptr, g_ptr, bp_ptr, bf_ptr, y_ptr,
                           C_in_g, H, W, OW, C_OUT_G, K_TOTAL, P,
                           sxn, sxc, sxh, sxw, sgn, sgc, syn, syc, syh, syw,
                           stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                           KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HARD: tl.constexpr,
                           IS_F64: tl.constexpr, CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    b, offs_m, m_mask = _tile(tl.program_id(0), P, BLOCK_M)
    grp, offs_nl, n_mask = _tile(tl.program_id(1), C_OUT_G, BLOCK_N)
    co = grp * C_OUT_G + offs_nl
    g = _load_gate(g_ptr, b, co, n_mask, sgn, sgc, HARD, IS_F64)
    acc = _conv_tile(x_ptr, wp_ptr, wf_ptr, b, grp, offs_m, m_mask, co, n_mask, g, C_in_g, H, W, OW, K_TOTAL,
                     sxn, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     KH, KW, False, IS_F64, CL, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
    if HAS_BIAS:
        bp = tl.load(bp_ptr + co, mask=n_mask, other=0.0).to(acc.dtype)
        bf = tl.load(bf_ptr + co, mask=n_mask, other=0.0).to(acc.dtype)
        acc += (bp + g * (bf - bp))[None, :]
    oh = offs_m // OW
    ow = offs_m % OW
    yoff = b * syn + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=gemm_configs(), key=["C_OUT_G", "K_TOTAL", "P"],
                 prune_configs_by=prune_to_fitting("dgate", "x_ptr"))
@triton.jit
def _gated_conv_dgate_kernel(x_ptr, wp_ptr, wf_ptr, bp_ptr, bf_ptr, dy_ptr, dg_ptr, C_OUT, N, PIX_PER_SPLIT,
                             C_in_g, H, W, OW, C_OUT_G, K_TOTAL, P,
                             sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                             KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, IS_F64: tl.constexpr,
                             CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_PREC: tl.constexpr):
    # program (split, image): the image's pixels [split * PIX_PER_SPLIT, ...) into dg's partial sum of that split
    b = (tl.program_id(0) % N).to(tl.int64)  # (int64 offsets, as in _tile)
    split = tl.program_id(0) // N
    grp, offs_nl, n_mask = _tile(tl.program_id(1), C_OUT_G, BLOCK_N)
    co = grp * C_OUT_G + offs_nl
    total = tl.zeros((BLOCK_N,), dtype=tl.float64 if IS_F64 else tl.float32)
    m_end = tl.minimum(P, (split + 1) * PIX_PER_SPLIT)
    for m0 in range(split * PIX_PER_SPLIT, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        acc = _conv_tile(x_ptr, wp_ptr, wf_ptr, b, grp, offs_m, m_mask, co, n_mask, total, C_in_g, H, W, OW,
                         K_TOTAL, sxn, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         KH, KW, True, IS_F64, CL, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
        if HAS_BIAS:
            bp = tl.load(bp_ptr + co, mask=n_mask, other=0.0).to(acc.dtype)
            bf = tl.load(bf_ptr + co, mask=n_mask, other=0.0).to(acc.dtype)
            acc += (bf - bp)[None, :]
        oh = offs_m // OW
        ow = offs_m % OW
        dy = tl.load(dy_ptr + b * syn + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(acc.dtype)
        total += tl.sum(acc * dy, axis=0)
    tl.store(dg_ptr + (split * N + b) * C_OUT + co, total, mask=n_mask)


@triton.autotune(configs=gemm_configs(), key=["C_IN_G", "R_TOTAL", "P_IN"],
                 prune_configs_by=prune_to_fitting("dx", "dy_ptr"))
@triton.jit
def _gated_conv_dx_kernel(dy_ptr, wp_ptr, wf_ptr, g_ptr, dx_ptr,
                          C_IN_G, H, W, OH, OW, C_OUT_G, R_TOTAL, P_IN, HP, WP,
                          syn, syc, syh, syw, sgn, sgc, sxn, sxc, sxh, sxw,
                          stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                          KH: tl.constexpr, KW: tl.constexpr, HARD: tl.constexpr, IS_F64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """dx[b, ci, ih, iw] = sum_{co, kh, kw} dy[b, co, oh, ow] * W_b[co, ci, kh, kw], ih = oh*s - p + kh*d.

    Strided convolutions: a program takes the input pixels of one phase (ih % s_h, iw % s_w), for which a tap
    (kh, kw) either reaches an output pixel for every pixel or for none, so only the reaching taps are
    multiplied (stride 2: a quarter of the taps per phase instead of every tap with 3/4 masked). Per tap the
    reduction runs over output channels: neighbouring addresses in channels_last dy."""
    n_phases = stride_h * stride_w
    bq, offs_m, m_mask = _tile(tl.program_id(0), HP * WP, BLOCK_M)  # bq = image * n_phases + phase
    b = bq // n_phases
    phase = bq % n_phases
    ph = phase // stride_w
    pw = phase % stride_w
    ih = ph + (offs_m // WP) * stride_h
    iw = pw + (offs_m % WP) * stride_w
    m_mask = m_mask & (ih < H) & (iw < W)
    grp, offs_n, n_mask = _tile(tl.program_id(1), C_IN_G, BLOCK_N)
    acc = _acc_zeros(BLOCK_M, BLOCK_N, IS_F64)
    for tap in range(0, KH * KW):  # (a loop, not unrolled: one copy of the body keeps registers for the tiles)
        kh = tap // KW
        kw = tap % KW
        if ((ph + pad_h - kh * dil_h) % stride_h == 0) & ((pw + pad_w - kw * dil_w) % stride_w == 0):
            th = ih + pad_h - kh * dil_h  # stride_h * oh: the tap reaches an output pixel
            tw = iw + pad_w - kw * dil_w
            oh = th // stride_h
            ow = tw // stride_w
            pix = m_mask & (th >= 0) & (tw >= 0) & (oh < OH) & (ow < OW)
            for c0 in range(0, C_OUT_G, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_mask = offs_c < C_OUT_G
                co = grp * C_OUT_G + offs_c
                dyt = tl.load(dy_ptr + b * syn + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
                              mask=pix[:, None] & c_mask[None, :], other=0.0)
                gk = _load_gate(g_ptr, b, co, c_mask, sgn, sgc, HARD, IS_F64)
                woff = co[:, None] * (C_IN_G * KH * KW) + offs_n[None, :] * (KH * KW) + tap
                wm = c_mask[:, None] & n_mask[None, :]
                wpt = tl.load(wp_ptr + woff, mask=wm, other=0.0).to(acc.dtype)
                wft = tl.load(wf_ptr + woff, mask=wm, other=0.0).to(acc.dtype)
                wt = wpt + gk[:, None] * (wft - wpt)
                acc += tl.dot(dyt, wt.to(dyt.dtype), out_dtype=acc.dtype, input_precision=DOT_PREC)
    xoff = b * sxn + (grp * C_IN_G + offs_n)[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw
    tl.store(dx_ptr + xoff, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=gemm_configs(), key=["C_OUT_G", "K_TOTAL", "R_TOTAL"],
                 prune_configs_by=prune_to_fitting("dw", "x_ptr"))
@triton.jit
def _gated_conv_dw_kernel(x_ptr, dy_ptr, g_ptr, dwp_ptr, dwf_ptr, W_NUMEL, ROWS_PER_SPLIT,
                          C_in_g, H, W, OW, C_OUT_G, K_TOTAL, P, R_TOTAL,
                          sxn, sxc, sxh, sxw, syn, syc, syh, syw, sgn, sgc,
                          stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                          KH: tl.constexpr, KW: tl.constexpr, HARD: tl.constexpr, NEED_P: tl.constexpr,
                          NEED_F: tl.constexpr, IS_F64: tl.constexpr, CL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """dWf[co, k] = sum_r g*dy[r, co] * x_col[r, k]; dWp likewise with (1 - g), computed only if NEED_P. Split-K:
    program axis 2 sums rows [split * ROWS_PER_SPLIT, ...) into slice `split` of the outputs (W_NUMEL each)."""
    grp, offs_cl, c_mask = _tile(tl.program_id(0), C_OUT_G, BLOCK_M)
    co = grp * C_OUT_G + offs_cl
    _, offs_k, k_mask = _tile(tl.program_id(1), K_TOTAL, BLOCK_N)
    ci, kh, kw = _k_parts(offs_k, C_in_g, KH, KW, CL)  # (dW's columns in that order: _k_ordered)
    acc_f = _acc_zeros(BLOCK_M, BLOCK_N, IS_F64)
    acc_p = tl.zeros_like(acc_f)
    split = tl.program_id(2)
    dwp_ptr += split.to(tl.int64) * W_NUMEL  # (this split's slice of the partial sums)
    dwf_ptr += split.to(tl.int64) * W_NUMEL
    r_end = tl.minimum(R_TOTAL, (split + 1) * ROWS_PER_SPLIT)
    for r0 in range(split * ROWS_PER_SPLIT, r_end, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_mask = offs_r < r_end
        b = (offs_r // P).to(tl.int64)  # (int64 offsets, as in _tile)
        m = offs_r % P
        oh = m // OW
        ow = m % OW
        dm = c_mask[:, None] & r_mask[None, :]
        dyt = tl.load(dy_ptr + b[None, :] * syn + co[:, None] * syc + oh[None, :] * syh + ow[None, :] * syw,
                      mask=dm, other=0.0).to(acc_f.dtype)
        gt = tl.load(g_ptr + b[None, :] * sgn + co[:, None] * sgc, mask=dm, other=0.0).to(acc_f.dtype)
        if HARD:
            gt = _binarise(gt)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        xm = r_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_ptr + b[:, None] * sxn + (grp * C_in_g + ci)[None, :] * sxc + ih * sxh + iw * sxw,
                     mask=xm, other=0.0)
        if NEED_F:
            acc_f += tl.dot((gt * dyt).to(xt.dtype), xt, out_dtype=acc_f.dtype, input_precision=DOT_PREC)
        if NEED_P:
            acc_p += tl.dot(((1 - gt) * dyt).to(xt.dtype), xt, out_dtype=acc_f.dtype, input_precision=DOT_PREC)
    woff = co[:, None] * K_TOTAL + offs_k[None, :]
    wm = c_mask[:, None] & k_mask[None, :]
    if NEED_F:
        tl.store(dwf_ptr + woff, acc_f.to(dwf_ptr.dtype.element_ty), mask=wm)
    if NEED_P:
        tl.store(dwp_ptr + woff, acc_p.to(dwp_ptr.dtype.element_ty), mask=wm)


# ----------------------------------------------------------------------------- launchers


def _channels_last(t):
    """Laid out channels_last and not also contiguous: the kernels then order their reduction (kh, kw, ci)."""
    return suggest_memory_format(t) == torch.channels_last and not t.is_contiguous()


def _k_ordered(w, cl):
    """Weights (C_out, C_in/G, KH, KW) flattened along k in the kernels' order (_k_parts): (ci, kh, kw), or
    (kh, kw, ci) for channels_last activations (cl)."""
    return w.permute(0, 2, 3, 1).contiguous() if cl else w.contiguous()


def _gate2d(gate, c_out):
    return gate[:, None].expand(gate.shape[0], c_out) if gate.dim() == 1 else gate


def _biases(bias_pre, bias_ft, weight):
    if bias_pre is None and bias_ft is None:
        return False, weight, weight  # dummies, never read (HAS_BIAS=False)
    z = weight.new_zeros(weight.shape[0])
    return True, (z if bias_pre is None else bias_pre.contiguous()), (z if bias_ft is None else bias_ft.contiguous())


# Split reductions (weight and gate gradients): at least this many rows per split, a multiple of every BLOCK_K.
MIN_SPLIT_ROWS = 1024
INTERPRETER_SMS = 4  # (the interpreter's stand-in for the SM count, so that splits run there too)


def row_splits(rows, tiles, device):
    """(splits, rows per split) for a reduction over `rows` computed by `tiles` programs per split: enough splits
    for two programs per SM, each split at least MIN_SPLIT_ROWS rows (rounded to a multiple of 64)."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
           else INTERPRETER_SMS)
    want = max(1, -(-2 * sms // max(tiles, 1)))
    splits = max(1, min(want, rows // MIN_SPLIT_ROWS))
    per = -(-rows // splits)
    per = -(-per // 64) * 64
    return -(-rows // per) if rows else 1, max(per, 64)


def dot_precision(dtype):
    """tl.dot's input_precision: TF32 for float32 only where PyTorch allows it for convolutions
    (torch.backends.cudnn.allow_tf32, on by default, as cuDNN's own convolutions), else IEEE float32;
    other dtypes compute exactly in their own precision ("ieee")."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def gated_conv2d_forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups,
                         hard, save_diff=False):
    """The gated_conv2d op by the Triton implicit GEMM: (y, diff or an empty tensor)."""
    with device_of(input, "gated_conv2d"):  # Triton launches on the current device: make it the tensors' device
        y = _forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard)
        if not save_diff:  # (the Python front end never asks this path for diff; the op contract holds anyway)
            return y, input.new_empty(0)
        has_bias, bp, bf = _biases(bias_pre, bias_ft, weight_pre)
        diff = torch.nn.functional.conv2d(input, weight_ft - weight_pre, bf - bp if has_bias else None, stride,
                                          padding, dilation, groups)
        return y, diff.contiguous(memory_format=suggest_memory_format(input))


def _forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard):
    N, _, H, W = input.shape
    C_out, C_in_g, KH, KW = weight_pre.shape
    OH, OW = conv_output_hw(input, weight_pre, stride, padding, dilation)
    y = torch.empty((N, C_out, OH, OW), device=input.device, dtype=input.dtype).contiguous(
        memory_format=suggest_memory_format(input))
    if N == 0 or OH * OW == 0:
        return y
    g = _gate2d(gate, C_out)
    has_bias, bp, bf = _biases(bias_pre, bias_ft, weight_pre)
    c_out_g = C_out // groups
    P = OH * OW
    grid = lambda meta: (N * triton.cdiv(P, meta["BLOCK_M"]), groups * triton.cdiv(c_out_g, meta["BLOCK_N"]))  # noqa
    cl = _channels_last(input)
    _gated_conv_fwd_kernel[grid](
        input, _k_ordered(weight_pre, cl), _k_ordered(weight_ft, cl), g, bp, bf, y,
        C_in_g, H, W, OW, c_out_g, C_in_g * KH * KW, P,
        *input.stride(), *g.stride(), *y.stride(), *stride, *padding, *dilation,
        KH=KH, KW=KW, HAS_BIAS=has_bias, HARD=bool(hard), IS_F64=input.dtype == torch.float64, CL=cl,
        DOT_PREC=dot_precision(input.dtype))
    return y


def gated_conv2d_backward(grad_output, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, diff, stride, padding,
                          dilation, groups, hard, output_mask):
    """The gated_conv2d_backward op by the Triton kernels: the six gradients of output_mask."""
    with device_of(input, "gated_conv2d"):  # Triton launches on the current device: make it the tensors' device
        N, C_in, H, W = input.shape
        C_out, C_in_g, KH, KW = weight_pre.shape
        OH, OW = grad_output.shape[2:]
        P = OH * OW
        c_out_g = C_out // groups
        is_f64 = input.dtype == torch.float64
        acc_dtype = torch.float64 if is_f64 else torch.float32  # (the partial sums')
        dy = grad_output
        g = _gate2d(gate, C_out)
        wp, wf = weight_pre.contiguous(), weight_ft.contiguous()
        cl = _channels_last(input)
        conv = (*stride, *padding, *dilation)
        empty = input.new_empty(0)
        dx = dwp = dwf = dg = dbp = dbf = empty
        if output_mask[0]:
            dx = torch.empty_like(input)
            if N:
                # per image and phase (ih % stride_h, iw % stride_w), the phase's HP x WP pixels
                phases, hp, wpx = stride[0] * stride[1], triton.cdiv(H, stride[0]), triton.cdiv(W, stride[1])
                grid = lambda meta: (N * phases * triton.cdiv(hp * wpx, meta["BLOCK_M"]),  # noqa
                                     groups * triton.cdiv(C_in_g, meta["BLOCK_N"]))
                _gated_conv_dx_kernel[grid](dy, wp, wf, g, dx, C_in_g, H, W, OH, OW, c_out_g, c_out_g * KH * KW, H * W,
                                            hp, wpx, *dy.stride(), *g.stride(), *dx.stride(), *conv, KH=KH, KW=KW,
                                            HARD=bool(hard), IS_F64=is_f64, DOT_PREC=dot_precision(input.dtype))
        if output_mask[1] or output_mask[2]:
            K = C_in_g * KH * KW
            # split-K over the N * P rows: a layer's few weight tiles alone would leave most SMs idle; the
            # splits' partial sums are added in a second pass (deterministic: no atomics)
            splits, per = row_splits(N * P, groups * triton.cdiv(c_out_g, 64) * triton.cdiv(K, 64), input.device)
            parts = [torch.zeros((splits, C_out, K), device=input.device, dtype=acc_dtype) if m else wp
                     for m in output_mask[1:3]]
            if N:
                grid = lambda meta: (groups * triton.cdiv(c_out_g, meta["BLOCK_M"]),  # noqa
                                     triton.cdiv(K, meta["BLOCK_N"]), splits)
                _gated_conv_dw_kernel[grid](input, dy, g, *parts, C_out * K, per, C_in_g, H, W, OW, c_out_g, K, P,
                                            N * P, *input.stride(), *dy.stride(), *g.stride(), *conv, KH=KH, KW=KW,
                                            HARD=bool(hard), NEED_P=bool(output_mask[1]), NEED_F=bool(output_mask[2]),
                                            IS_F64=is_f64, CL=cl, DOT_PREC=dot_precision(input.dtype))

            def weight_grad(part):  # the splits added, columns from the kernels' k order back to (ci, kh, kw)
                w = part.sum(0)
                w = w.view(C_out, KH, KW, C_in_g).permute(0, 3, 1, 2) if cl else w.view(wp.shape)
                return w.to(wp.dtype)
            dwp = weight_grad(parts[0]) if output_mask[1] else empty
            dwf = weight_grad(parts[1]) if output_mask[2] else empty
        if output_mask[3]:
            # each image's pixels split so that images x filter tiles x splits fill the GPU; partial sums added
            # in a second pass (deterministic)
            splits, per = row_splits(P, N * groups * triton.cdiv(c_out_g, 64), input.device)
            dg2 = torch.zeros((splits, N, C_out), device=input.device, dtype=acc_dtype)
            if N:
                has_bias, bp, bf = _biases(bias_pre, bias_ft, weight_pre)
                grid = lambda meta: (splits * N, groups * triton.cdiv(c_out_g, meta["BLOCK_N"]))  # noqa
                _gated_conv_dgate_kernel[grid](input, _k_ordered(wp, cl), _k_ordered(wf, cl), bp, bf, dy, dg2, C_out,
                                               N, per, C_in_g, H, W, OW, c_out_g, C_in_g * KH * KW, P,
                                               *input.stride(), *dy.stride(), *conv, KH=KH, KW=KW,
                                               HAS_BIAS=has_bias, IS_F64=is_f64, CL=cl,
                                               DOT_PREC=dot_precision(input.dtype))
            dg2 = dg2.sum(0)
            dg = (dg2.sum(1) if gate.dim() == 1 else dg2).to(gate.dtype)
        if output_mask[4] or output_mask[5]:
            s = dy.sum((2, 3), dtype=torch.float64 if is_f64 else torch.float32)
            ge = torch.where(g.isnan(), g, (g >= 0.5).to(g.dtype)).to(s.dtype) if hard else g.to(s.dtype)
            if output_mask[4]:
                dbp = ((1 - ge) * s).sum(0).to(input.dtype)
            if output_mask[5]:
                dbf = (ge * s).sum(0).to(input.dtype)
        # each gradient dense in its tensor's suggested memory format (the op's fake says so); masked-out ones
        # empty and each its own tensor (outputs of an op never alias one another)
        likes = (input, weight_pre, weight_ft, gate, dbp, dbf)
        return tuple(input.new_empty(0) if t is empty else t.contiguous(memory_format=suggest_memory_format(l))
                     for t, l in zip((dx, dwp, dwf, dg, dbp, dbf), likes))
