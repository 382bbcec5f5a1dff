"""Turn a pytest-benchmark JSON file into a markdown table of speed ratios against a baseline provider.

    python benchmarks/report.py .benchmarks/gated.json [--baseline naive]

Each benchmark's group names one case (op, shape, mode); `extra_info["provider"]` names who ran it.
Ratio = baseline median / provider median (above 1 = faster than the baseline, in the same run).
"""
import argparse
import json
from collections import OrderedDict


def table(path, baseline="naive"):
    data = json.load(open(path))
    groups = OrderedDict()
    providers = []
    for b in data["benchmarks"]:
        p = b["extra_info"].get("provider", b["name"])
        groups.setdefault(b["group"], {})[p] = b["stats"]["median"]
        extra = {f"{k} ({p})": v for k, v in b["extra_info"].items() if k != "provider"}
        if extra:
            groups[b["group"]].setdefault("_extra", {}).update(extra)
        if p not in providers:
            providers.append(p)
    extra_keys = sorted({k for g in groups.values() for k in g.get("_extra", {})})
    head = ["case"] + [f"{p} ms" for p in providers] + [f"{p} vs {baseline}" for p in providers if p != baseline]
    head += extra_keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in groups.items():
        row = [name] + [f"{g[p] * 1e3:.2f}" if p in g else "" for p in providers]
        for p in providers:
            if p != baseline:
                row.append(f"{g[baseline] / g[p]:.2f}x" if p in g and baseline in g else "")
        row += [str(g.get("_extra", {}).get(k, "")) for k in extra_keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--baseline", default="naive")
    a = ap.parse_args()
    print(table(a.json, a.baseline))
