"""PNG plots of the trainer (matplotlib, Agg backend: no display needed)."""
import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path):
    from tlkernels._io import atomic_write
    try:  # atomic: a reader never sees half a PNG
        atomic_write(path, "wb", ".png", lambda fh: fig.savefig(fh, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def curves(history, path, title):
    """Training loss and validation accuracy over steps (PNG)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    a.set(xlabel="step", ylabel="training loss", title=title)
    ev = [h for h in history if "val_acc" in h]
    b.plot([h["step"] for h in ev], [h["val_acc"] for h in ev], marker="o", ms=3)
    b.set(xlabel="step", ylabel="validation accuracy", title=title)
    _save(fig, path)


def gates(usage, path, title):
    """Per layer/block, the fraction of gates on the fine-tuned filter or block (PNG)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(usage)), 3.5))
    ax.bar(range(len(usage)), list(usage.values()))
    ax.set_xticks(range(len(usage)), list(usage.keys()), rotation=90, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="fraction using fine-tuned", title=f"{title}: gate usage per layer")
    _save(fig, path)


def _show(ax, x, mean, std):
    """An image tensor (C, H, W), normalised with mean/std (or in [0, 1] when they are None)."""
    if mean is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(x.permute(1, 2, 0).numpy())


def retrieval_grid(target, source, neighbours, path, mean=None, std=None, rows=6, cols=6):
    """Some target images beside their nearest retrieved source images (PNG)."""
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.2 * (cols + 1), 1.2 * rows))
    picks = [int(i) for i in torch.linspace(0, len(target) - 1, rows)]  # spread over the (class-sorted) set
    for r, t in enumerate(picks):
        _show(axes[r, 0], target[t][0], mean, std)
        for c in range(min(cols, len(neighbours[t]))):
            _show(axes[r, c + 1], source[int(neighbours[t][c])][0], mean, std)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("target", fontsize=8)
    axes[0, 1].set_title("retrieved source images", fontsize=8, loc="left")
    _save(fig, path)


def comparison(histories, path):
    """histories: {method: [history of each seed]}. Left: validation accuracy over steps (mean over seeds,
    shaded +- std); right: final validation accuracy, mean with +- std error bars."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names, means, stds = [], [], []
    for m, runs in histories.items():
        evs = [[x for x in h if "val_acc" in x] for h in runs]
        steps = [x["step"] for x in evs[0]]
        acc = torch.tensor([[x["val_acc"] for x in ev] for ev in evs if len(ev) == len(steps)], dtype=torch.float64)
        mu = acc.mean(0)
        sd = acc.std(0) if len(acc) > 1 else torch.zeros_like(mu)
        a.plot(steps, mu.tolist(), label=m)
        a.fill_between(steps, (mu - sd).tolist(), (mu + sd).tolist(), alpha=0.2)
        names.append(m)
        means.append(float(acc[:, -1].mean()))
        stds.append(float(acc[:, -1].std()) if len(acc) > 1 else 0.0)
    n_seeds = max(len(r) for r in histories.values())
    a.set(xlabel="step", ylabel="validation accuracy", title=f"mean over {n_seeds} seed(s)")
    a.legend(fontsize=8)
    b.bar(range(len(names)), means, yerr=stds, capsize=4)
    b.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    lo = min(m - s for m, s in zip(means, stds))
    b.set(ylim=(max(0.0, lo - 0.05), 1.0), ylabel="final validation accuracy", title="mean +- std over seeds")
    _save(fig, path)
