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
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    a.set(xlabel="step", ylabel="training loss", title=title)
    ev = [h for h in history if "val_acc" in h]
    b.plot([h["step"] for h in ev], [h["val_acc"] for h in ev], marker="o", ms=3)
    b.set(xlabel="step", ylabel="validation accuracy", title=title)
    _save(fig, path)


def gates(usage, path, title):
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(usage)), 3.5))
    ax.bar(range(len(usage)), list(usage.values()))
    ax.set_xticks(range(len(usage)), list(usage.keys()), rotation=90, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="fraction using fine-tuned", title=f"{title}: gate usage per layer")
    _save(fig, path)


def retrieval_grid(target, source, neighbours, path, rows=6, cols=6):
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.2 * (cols + 1), 1.2 * rows))
    picks = [int(i) for i in torch.linspace(0, len(target) - 1, rows)]  # spread over the (class-sorted) set
    for r, t in enumerate(picks):
        x, _ = target[t]
        axes[r, 0].imshow(x[0].numpy(), cmap="gray")
        for c in range(cols):
            s, _ = source[int(neighbours[t][c])]
            axes[r, c + 1].imshow(s[0].numpy(), cmap="gray")
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("target", fontsize=8)
    axes[0, 1].set_title("retrieved source images", fontsize=8, loc="left")
    _save(fig, path)


def comparison(histories, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, h in histories.items():
        ev = [x for x in h if "val_acc" in x]
        ax.plot([x["step"] for x in ev], [x["val_acc"] for x in ev], label=m)
    ax.set(xlabel="step", ylabel="validation accuracy", title="methods on the same split and seed")
    ax.legend(fontsize=8)
    _save(fig, path)
