"""The trainer: a few steps of every method on the demo, resume == uninterrupted, torchrun 2 processes,
bad options and missing directories."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tlkernels import train

FAST = ["--epochs", "2", "--eval_every", "1", "--batch_size", "16", "--target_per_class", "3", "--source_limit", "400",
        "--pretrain_epochs", "1", "--selective_k", "8", "--selective_bins", "8", "--quiet", "--threads", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(tmp_path, cache, *args):
    return train.main(["--out_dir", str(tmp_path), "--cache_dir", cache, *FAST, *args])


@pytest.mark.parametrize("method", ["finetune", "l2sp", "soft", "selective", "adafilter", "spottune", "adafilter+l2sp"])
def test_every_method_trains_on_the_demo(tmp_path, cache, method):
    res = run(tmp_path, cache, "--method", method)
    summary, history = res[method]
    assert summary["status"] == "done" and summary["steps"] == 2 * 2  # 30 images / 16 per batch, 2 epochs
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert 0.0 <= summary["final_val_acc"] <= 1.0
    out = tmp_path / method.replace("+", "_")
    for f in ("metrics.jsonl", "summary.json", "last.pt", "best.pt", "curves.png"):
        assert (out / f).exists(), f
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "val_acc" in json.loads(lines[-1])
    if method in ("adafilter", "spottune"):
        assert (out / "gates.png").exists() and "gates" in json.loads(lines[-1])
    if method == "selective":
        assert (out / "retrieved.png").exists()
    if method in ("l2sp", "adafilter+l2sp"):
        assert "l2sp" in json.loads(lines[-1])
    if method == "soft":  # lambda decays to 0 over training
        lams = [json.loads(l)["lambda"] for l in lines]
        assert lams[0] > lams[-1] and lams[-1] == 0.0


def test_same_seed_same_numbers_and_compare_table(tmp_path, cache):
    a = run(tmp_path / "a", cache, "--compare", "finetune,spottune")
    b = run(tmp_path / "b", cache, "--compare", "finetune,spottune")
    for m in ("finetune", "spottune"):
        assert [h["loss"] for h in a[m][1]] == [h["loss"] for h in b[m][1]]
    table = (tmp_path / "a" / "comparison.md").read_text()
    assert "| finetune |" in table and "| spottune |" in table
    assert (tmp_path / "a" / "comparison.png").exists()


@pytest.mark.parametrize("method", ["spottune", "soft"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, cache, method):
    full = run(tmp_path / "full", cache, "--method", method, "--epochs", "3")[method][1]
    part = run(tmp_path / "part", cache, "--method", method, "--epochs", "3", "--stop_after", "5")[method]
    assert part[0]["status"] == "interrupted" and part[0]["steps"] == 5
    resumed = run(tmp_path / "part", cache, "--method", method, "--epochs", "3", "--resume")[method][1]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert resumed[-1]["val_acc"] == full[-1]["val_acc"]


@pytest.mark.parametrize("argv,msg", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--epochs", "zero"], "invalid int value"),
    (["--no_such_option", "1"], "unrecognized arguments"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--soft_schedule", "sigmoid"], "--soft_schedule must be"),
])
def test_bad_options_give_clear_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_bad_config_file_and_missing_directories(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": "many"}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg)])
    assert "option 'epochs' must be int" in capsys.readouterr().err
    cfg.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg)])
    assert "unknown option 'epochz'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--target: directory '/nonexistent/birds' does not exist"):
        train.main(["--target", "/nonexistent/birds", "--source", "/nonexistent/src", "--checkpoint", "x.pt",
                    "--out_dir", str(tmp_path)])
    (tmp_path / "t" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="expected .*t/val"):
        train.main(["--target", str(tmp_path / "t"), "--checkpoint", "x.pt", "--out_dir", str(tmp_path)])


def test_torchrun_two_processes(tmp_path, cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "-m", "tlkernels.train", "--compare", "finetune,selective", "--out_dir", str(tmp_path),
                        "--cache_dir", cache, *FAST], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for m in ("finetune", "selective"):
        s = json.loads((tmp_path / m / "summary.json").read_text())
        assert s["status"] == "done" and s["steps"] == 4


def test_pretraining_is_identical_across_processes(tmp_path):
    """The demo's cached pre-trained model must not depend on the process (a README number depends on it)."""
    code = """
import hashlib, os, sys, torch
from tlkernels import train
cfg = train.parse_args(["--out_dir", sys.argv[1], "--source_limit", "300", "--pretrain_epochs", "1", "--quiet",
                        "--threads", "2"])
cfg.cache_dir = sys.argv[1]
os.makedirs(cfg.cache_dir, exist_ok=True)
t, s = train.load_data(cfg)
torch.rand(int(sys.argv[2]))  # different earlier RNG use in each process
m = train.pretrained_backbone(cfg, s, print)
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest())
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    digests = []
    for i, n in enumerate((1, 7)):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"p{i}"), str(n)], capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        digests.append(r.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]
