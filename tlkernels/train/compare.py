"""comparison.md: methods trained on the same splits and seeds, and whether their differences exceed seed noise.

Each method's final validation accuracy is paired with the baseline's (`finetune`, else the first method) on
the same seed (same split, same initial head), and the mean paired difference gets a 95% Student-t interval
with the seeds as the unit (n - 1 degrees of freedom). An interval that spans 0 is reported as "not
distinguishable": over these seeds the gap is within what changing the seed alone does."""
import math

import torch

from tlkernels._io import atomic_write_text
from tlkernels.train import plots

# Student's t 0.975 quantile for 1..30 degrees of freedom (two-sided 95%), to 3 decimals.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t975(df):
    """Student's t 0.975 quantile: the table up to 30 degrees of freedom, beyond it the Cornish-Fisher expansion
    around the normal quantile (within 1e-4 from 30 on)."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


def paired_interval(diffs):
    """(mean, low, high) of the 95% t interval of the mean of paired differences; low = high = None for one pair."""
    d = torch.tensor(diffs, dtype=torch.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, None, None
    half = t975(len(d) - 1) * float(d.std(unbiased=True)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def verdict(mean, low, high):
    """The paired difference cell: points with its interval, and whether it tells a gain or a loss from noise."""
    if low is None:
        return f"{100 * mean:+.1f} pts (one seed: no interval; use --seeds)"
    say = "not distinguishable" if low <= 0 <= high else ("better" if low > 0 else "worse")
    return f"{100 * mean:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]: {say}"


def table(results):
    """The comparison table: per method mean +- std of the final and best validation accuracy over seeds, the
    per-seed finals, the paired difference to the baseline with its 95% interval, and train seconds."""
    names = list(results)
    base = "finetune" if "finetune" in results else names[0]
    seeds = sorted(set.intersection(*(set(runs) for runs in results.values())))
    rows = [f"| method | final val acc | best val acc | per-seed final | vs {base} (paired, 95% CI) | train seconds |",
            "|---|---|---|---|---|---|"]
    for m, runs in results.items():
        fin = torch.tensor([runs[s][0]["final_val_acc"] for s in seeds], dtype=torch.float64)
        bst = torch.tensor([runs[s][0]["best_val_acc"] for s in seeds], dtype=torch.float64)
        pm = (lambda t: f"{t.mean():.4f} +- {t.std(unbiased=True):.4f}" if len(t) > 1 else f"{t.mean():.4f}")
        secs = sum(runs[s][0]["seconds"] for s in seeds) / len(seeds)
        vs = "(baseline)" if m == base else verdict(*paired_interval(
            [runs[s][0]["final_val_acc"] - results[base][s][0]["final_val_acc"] for s in seeds]))
        rows.append(f"| {m} | {pm(fin)} | {pm(bst)} | {', '.join(f'{v:.4f}' for v in fin.tolist())} | {vs} | "
                    f"{secs:.0f} |")
    return "\n".join(rows), base, seeds


def write(cfg, results, out_dir):
    """comparison.md and comparison.png in out_dir; returns the table."""
    text, base, seeds = table(results)
    what = "demo digits" if not cfg.target else cfg.target
    atomic_write_text(f"Target: {what}; seeds {', '.join(map(str, seeds))}; {cfg.epochs} epochs; std over seeds "
                      f"(n - 1). Paired differences: each method's final accuracy minus {base}'s on the same seed and "
                      f"split, mean with a 95% Student-t interval over the seeds; \"not distinguishable\" where the "
                      f"interval spans 0.\n\n{text}\n", f"{out_dir}/comparison.md")
    plots.comparison({m: [h for _, h in runs.values()] for m, runs in results.items()}, f"{out_dir}/comparison.png")
    return text
