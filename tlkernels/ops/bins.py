"""Per-channel histogram bin edges fitted on the target set, streaming over a DataLoader."""
import torch

from tlkernels.ops.histogram import filterbank_histogram


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def fit_bin_edges(loader, bank, bins=100, fine_bins=2000, mode="equal_mass"):
    """One (F_i, bins + 1) edge tensor per stage of `bank` (a tlkernels.filters.FilterBank).

    Pass 1 scans each channel's response range; "uniform" stops there. "equal_mass" (the paper's) then
    builds a fine histogram (fine_bins uniform bins, fused op, nothing materialised) and cuts it into
    `bins` bins holding equal pixel mass. `loader` is iterated twice (a DataLoader or a list of batches)."""
    if mode not in ("equal_mass", "uniform"):
        raise ValueError(f"fit_bin_edges: mode must be 'equal_mass' or 'uniform', got {mode!r}")
    if bins < 1 or fine_bins < bins:
        raise ValueError(f"fit_bin_edges: need 1 <= bins <= fine_bins, got bins={bins}, fine_bins={fine_bins}")
    lo = [None] * len(bank.stages)
    hi = [None] * len(bank.stages)
    seen = False
    for batch in loader:
        seen = True
        for i, (s, x) in enumerate(bank.stage_inputs(_images(batch))):
            r = torch.nn.functional.conv2d(x, s["weight"].to(x.device), None, s["stride"], s["padding"])
            mn, mx = r.amin((0, 2, 3)).cpu(), r.amax((0, 2, 3)).cpu()
            lo[i] = mn if lo[i] is None else torch.minimum(lo[i], mn)
            hi[i] = mx if hi[i] is None else torch.maximum(hi[i], mx)
    if not seen:
        raise ValueError("fit_bin_edges: the loader yielded no batch")
    for i in range(len(bank.stages)):
        if not (torch.isfinite(lo[i]).all() and torch.isfinite(hi[i]).all()):
            c = int((~(torch.isfinite(lo[i]) & torch.isfinite(hi[i]))).nonzero()[0])
            raise ValueError(f"fit_bin_edges: the responses of filter {c} of stage {i} range over "
                             f"[{lo[i][c].item()}, {hi[i][c].item()}]: the images hold NaN or infinite values")
    out = []
    for i in range(len(bank.stages)):
        l, h = lo[i].double(), hi[i].double()
        h = torch.where(h > l, h, l + 1e-6)
        if mode == "uniform":
            out.append((l[:, None] + (h - l)[:, None] * torch.linspace(0, 1, bins + 1, dtype=torch.float64)).float())
            continue
        t = torch.linspace(0, 1, fine_bins + 1, dtype=torch.float64)
        fine_edges = (l[:, None] + (h - l)[:, None] * t).float()
        out.append(fine_edges)
    if mode == "uniform":
        return out
    mass = [torch.zeros(e.shape[0], fine_bins, dtype=torch.float64) for e in out]
    for batch in loader:
        for i, (s, x) in enumerate(bank.stage_inputs(_images(batch))):
            mass[i] += filterbank_histogram(x, s["weight"].to(x.device), out[i].to(x.device), s["stride"],
                                            s["padding"]).double().sum(0).cpu()
    edges = []
    for i, fe in enumerate(out):
        cdf = torch.cat([torch.zeros(fe.shape[0], 1, dtype=torch.float64), mass[i].cumsum(1)], 1)
        cdf = cdf / cdf[:, -1:].clamp(min=1e-300)
        q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
        e = torch.empty(fe.shape[0], bins + 1, dtype=torch.float64)
        for c in range(fe.shape[0]):  # invert the piecewise-linear CDF at the quantiles
            j = torch.searchsorted(cdf[c], q, right=False).clamp(1, fine_bins)
            c0, c1 = cdf[c, j - 1], cdf[c, j]
            frac = torch.where(c1 > c0, (q - c0) / (c1 - c0), torch.zeros_like(q))
            x0 = fe[c, j - 1].double()
            x1 = fe[c, j].double()
            e[c] = x0 + frac * (x1 - x0)
        e[:, 0], e[:, -1] = fe[:, 0].double(), fe[:, -1].double()
        # strictly increasing (mass piles on a value: split the tie by the smallest step that float32 keeps)
        e = e.float()
        for j in range(1, bins + 1):
            e[:, j] = torch.maximum(e[:, j], torch.nextafter(e[:, j - 1], torch.full_like(e[:, j - 1], float("inf"))))
        edges.append(e)
    return edges
