"""The trainer on real image files: an ImageFolder written by the test (the demo digits as RGB PNG, plus
grayscale, palette and RGBA files), DataLoader workers, normalised and augmented batches, unreadable files,
mixed precision, exports loaded back, seeds, --help, TensorBoard."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

from tlkernels.train import backbones, data, loop, parse_args

from conftest import background_result, start_background

FAST = ["--epochs", "2", "--eval_every", "1", "--batch_size", "8", "--image_size", "32", "--quiet", "--threads", "2",
        "--no-export"]


@pytest.fixture(autouse=True)
def _fixed_strategies(settings):
    """The gated convolution's fixed rules: these runs test files, options, precision and exports, every strategy
    exact; the measured choice (timing each convolution's strategies) is test_train.py's subject."""
    settings(gated_conv="heuristic")


def write_folder(root, per_class=6, classes=3, extra_modes=True):
    """root/{train,val}/<class>/*.png from the demo digits (RGB, tinted per class) + one L, P and RGBA file."""
    from sklearn.datasets import load_digits
    d = load_digits()
    for part, offset in (("train", 0), ("val", 500)):
        for c in range(classes):
            os.makedirs(os.path.join(root, part, f"class{c}"), exist_ok=True)
            idx = [i for i in range(offset, len(d.target)) if d.target[i] == c][:per_class]
            for k, i in enumerate(idx):
                g = (d.images[i] * 15).astype("uint8")
                rgb = Image.fromarray(g).resize((40, 40)).convert("RGB")
                rgb.save(os.path.join(root, part, f"class{c}", f"{k}.png"))
    if extra_modes:
        base = Image.fromarray((d.images[0] * 15).astype("uint8")).resize((40, 40))
        base.convert("L").save(os.path.join(root, "train", "class0", "gray.png"))
        base.convert("RGB").convert("P").save(os.path.join(root, "train", "class1", "palette.png"))
        base.convert("RGBA").save(os.path.join(root, "train", "class2", "rgba.png"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("birds")))


def write_checkpoint(path):
    """A 3-channel torchvision resnet18 state_dict (no network here: stands in for the pre-trained weights)."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("ck") / "resnet18.pt"))


def run(tmp_path, folder, checkpoint, *args):
    return loop.main(["--target", folder, "--checkpoint", checkpoint, "--out_dir", str(tmp_path), *FAST, *args])


def test_folder_with_workers_trains_and_reads_every_image_mode(tmp_path, folder, checkpoint):
    res = run(tmp_path, folder, checkpoint, "--method", "finetune", "--workers", "2")
    summary, history = res["finetune"][0]
    assert summary["status"] == "done" and summary["skipped_images"] == 0
    assert summary["steps"] == 2 * 3  # 18 + 3 images / 8 per batch, 2 epochs
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def _first_batches(cfg, epochs, workers):
    target, _ = data.load_data(cfg, cfg.seed)
    plan = data.StepPlan(len(target.train), 64, cfg.seed, 0, 1)
    loader = data.train_loader(target, None, plan, workers, torch.device("cpu"))
    out = []
    for e in epochs:
        plan.set_epoch(e)
        out.append(next(iter(loader))[0])
    return target, out


def test_training_batches_are_normalised_and_augmented(folder, checkpoint):
    cfg = parse_args(["--target", folder, "--checkpoint", checkpoint, "--image_size", "32"])
    target, (e0, e1) = _first_batches(cfg, [0, 1], workers=0)
    mean, std = backbones.IMAGENET.mean, backbones.IMAGENET.std
    assert target.mean == mean and target.std == std  # resnet18's weights: ImageNet's
    assert e0.shape[1:] == (3, 32, 32)
    x = torch.cat([e0, e1])
    raw = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # normalisation is exactly the inverse of this
    assert abs(float(x.mean())) < 1.5 and 0.3 < float(x.std()) < 3  # near 0/1 (dark digits: mean below 0)
    # the same images (the same permutation positions hold other images, so compare each image's crops)
    _, (again,) = _first_batches(cfg, [0], workers=2)
    torch.testing.assert_close(again, e0)  # seeded per image: the same crops whatever the workers
    plan = data.StepPlan(len(target.train), 64, cfg.seed, 0, 1)
    crops = []
    for epoch in (0, 1):  # image 0 as each epoch's plan has it: another seed, another crop
        plan.set_epoch(epoch)
        key = next(k for batch in plan for k in batch if k[0] == 0)
        crops.append(data.PairDataset(target.train).__getitems__([key])[0][0])
    assert not torch.equal(crops[0], crops[1])
    ev = target.val[0][0]
    torch.testing.assert_close(ev, target.val[0][0])  # validation: deterministic Resize + CenterCrop


def test_mean_std_override_and_weights_metadata(folder, checkpoint):
    cfg = parse_args(["--target", folder, "--checkpoint", checkpoint, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    pre = data.preprocessing(cfg)
    assert (pre.mean, pre.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    cfg = parse_args(["--target", folder, "--arch", "resnet50"])
    pre = data.preprocessing(cfg)  # torchvision's weights metadata (no download needed)
    w = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    assert pre.mean == tuple(w.mean) and pre.std == tuple(w.std) and pre.crop_pct == w.crop_size[0] / w.resize_size[0]


def test_unreadable_image_is_named_or_skipped(tmp_path, checkpoint):
    root = write_folder(str(tmp_path / "t"), per_class=4, extra_modes=False)
    bad = os.path.join(root, "train", "class1", "broken.png")
    with open(bad, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    with pytest.raises(Exception, match=r"--target: cannot read image .*broken.png.*--skip_bad_images"):
        run(tmp_path / "o1", root, checkpoint, "--method", "finetune")
    res = run(tmp_path / "o2", root, checkpoint, "--method", "finetune", "--skip_bad_images")
    assert res["finetune"][0][0]["skipped_images"] == 2  # one per epoch
    assert res["finetune"][0][0]["status"] == "done"


def test_amp_bf16_three_steps_match_float32(tmp_path, folder, checkpoint):
    """Three training steps under --amp bf16 against float32. The first step's loss is the forward pass of the
    same weights on the same batch: within 2% (bf16 keeps 8 mantissa bits). Later steps follow weights updated
    from bf16 gradients, whose differences BN with small batches amplifies (ATen's ops alone do so for plain
    fine-tuning): they are checked finite; the per-op budgets are in test_autocast.py."""
    steps = ("--epochs", "1", "--stop_after", "3", "--batch_size", "8", "--image_size", "64")
    for method in ("finetune", "adafilter", "spottune"):
        f32 = run(tmp_path / f"{method}32", folder, checkpoint, "--method", method, *steps)[method][0][1]
        b16 = run(tmp_path / f"{method}16", folder, checkpoint, "--method", method, *steps, "--amp", "bf16")[method][0][1]
        assert len(f32) == len(b16) == 3
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in b16)
        rel = abs(f32[0]["loss"] - b16[0]["loss"]) / abs(f32[0]["loss"])
        assert 0 < rel < 0.02, (method, f32[0]["loss"], b16[0]["loss"])  # 0: bf16 really ran


def test_amp_fp16_uses_a_grad_scaler_and_channels_last(tmp_path, folder, checkpoint):
    res = run(tmp_path, folder, checkpoint, "--method", "l2sp", "--amp", "fp16", "--channels_last",
              "--stop_after", "2")
    assert res["l2sp"][0][0]["status"] == "interrupted"
    ck = torch.load(tmp_path / "l2sp" / "last.pt", weights_only=True)
    assert ck["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res["l2sp"][0][1])


@pytest.mark.parametrize("method", ["finetune", "adafilter", "spottune"])
def test_exports_load_and_match_the_trained_model(tmp_path, folder, checkpoint, method):
    res = run(tmp_path, folder, checkpoint, "--method", method, "--export", "--epochs", "1")
    out = tmp_path / method
    info = json.loads((out / "summary.json").read_text())["export"]
    assert info["num_classes"] == 3 and info["max_abs_diff"] < 1e-4
    best = torch.load(out / "last.pt", weights_only=True)["model"]
    target, _ = data.load_data(parse_args(["--target", folder, "--checkpoint", checkpoint, "--image_size", "32"]), 0)
    x, _ = data.take(target.val, list(range(7)))  # a batch size other than the export's example
    # the trained model, rebuilt from its checkpoint
    from tlkernels.train.recipes import recipe
    cfg = parse_args(["--target", folder, "--checkpoint", checkpoint, "--method", method])
    rec = recipe(cfg, method, False)
    net = rec.build(torchvision.models.resnet18(), 3)
    net.load_state_dict(best)
    net.eval()
    with torch.no_grad():
        want = net(x)
    program = torch.export.load(str(out / "model.pt2"))
    if method == "spottune":
        assert any(str(n.target) == "aten.nonzero.default" for n in program.graph.nodes)  # it routes
    torch.testing.assert_close(program.module()(x), want, rtol=1e-4, atol=1e-4)
    if method == "finetune":  # plain.pt: the unmodified torchvision model, loaded without tlkernels
        code = ("import sys, torch, torchvision; m = torchvision.models.resnet18(num_classes=3); "
                "m.load_state_dict(torch.load(sys.argv[1], weights_only=True)); m.eval(); "
                "x = torch.load(sys.argv[2], weights_only=True); "
                "print('tlkernels' in sys.modules); torch.save(m(x).detach(), sys.argv[3])")
        torch.save(x, tmp_path / "x.pt")
        r = subprocess.run([sys.executable, "-c", code, str(out / "plain.pt"), str(tmp_path / "x.pt"),
                            str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == "False"
        torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), want, rtol=1e-4, atol=1e-4)
    else:
        assert not (out / "plain.pt").exists()


def test_spottune_export_routes_mixed_batches(tmp_path):
    """A policy whose choices differ between the images of one batch: the exported routing == eager model."""
    from tlkernels.methods import SpotTune
    from tlkernels.train.export import export_program, fold_batchnorm
    torch.manual_seed(0)
    m = SpotTune(torchvision.models.resnet18(num_classes=4)).eval()
    for p in m.policy.parameters():
        p.data.normal_(0, 0.5)
    program = export_program(fold_batchnorm(m), torch.randn(3, 3, 32, 32))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    mixed = False
    for b in (1, 6, 9):
        x = torch.randn(b, 3, 32, 32) * 3
        with torch.no_grad():
            want = m(x)
        g = m.last_gates
        mixed |= bool(((g.sum(0) > 0) & (g.sum(0) < b)).any())
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4)
    assert mixed, "the test needs batches in which some block is taken by some images only"


def test_seeds_compare_mean_std_table_and_plot(tmp_path, folder, checkpoint):
    res = run(tmp_path, folder, checkpoint, "--compare", "finetune,l2sp", "--seeds", "0,1", "--epochs", "1")
    assert set(res["finetune"]) == {0, 1}
    table = (tmp_path / "comparison.md").read_text()
    assert "seeds 0, 1" in table and " +- " in table
    for m in ("finetune", "l2sp"):
        fin = [res[m][s][0]["final_val_acc"] for s in (0, 1)]
        mean, std = torch.tensor(fin).mean(), torch.tensor(fin).std()
        assert f"| {m} | {mean:.4f} +- {std:.4f} |" in table
        assert (tmp_path / m / "seed1" / "summary.json").exists()
    assert (tmp_path / "comparison.png").stat().st_size > 1000


def test_tensorboard_log(tmp_path, folder, checkpoint):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package (requirements.txt)")
    run(tmp_path, folder, checkpoint, "--method", "finetune", "--tensorboard", "--epochs", "1")
    files = os.listdir(tmp_path / "finetune" / "tensorboard")
    assert any(f.startswith("events.out.tfevents") for f in files)


def compile_run(work):
    """The run test_compile checks, on its own copy of this file's data (in the process start_compile_run starts)."""
    run(pathlib.Path(work), write_folder(os.path.join(work, "birds")), write_checkpoint(os.path.join(work, "r18.pt")),
        "--method", "adafilter", "--compile", "--stop_after", "2")


def start_compile_run():
    """compile_run in a process of its own beside the suite (inductor compiles the model's forward and backward)."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_train_real; test_train_real.compile_run(sys.argv[2])"
    start_background("train-compile", [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                     env=dict(os.environ, TLKERNELS_GATED_CONV="heuristic"), workdir=True)  # (_fixed_strategies)


@pytest.mark.background.with_args(start_compile_run)
def test_compile():
    start_compile_run()  # (run alone, the test starts it now)
    with background_result("train-compile", timeout=1200) as (returncode, _, stderr, work):
        assert returncode == 0, stderr[-4000:]
        history = [json.loads(line) for line in (work / "adafilter" / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [1, 2] and all(math.isfinite(h["loss"]) for h in history), history


def test_help_lists_every_option_and_method(capsys):
    from tlkernels.train.config import METHODS, Config
    import dataclasses
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in out
    for m in METHODS:
        assert f"  {m} " in out
    assert "{off,bf16,fp16}" in out and "(default: 'off')" in out


@pytest.mark.parametrize("argv,msg", [
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    (["--workers", "-3"], "--workers must be >= 0"),
    (["--seeds", "0,a"], "--seeds must be comma-separated integers"),
    (["--target", "x", "--std", "0.2,0,0.2"], "--std must be > 0"),
    (["--mean", "0.5,0.5,0.5"], "--mean/--std apply to --target image folders"),
])
def test_bad_new_options(argv, msg, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert msg in capsys.readouterr().err


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, folder, checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
        run(tmp_path, folder, checkpoint, "--device", "cuda")


def test_soft_distill_needs_no_source_set(tmp_path, folder, checkpoint):
    res = run(tmp_path, folder, checkpoint, "--method", "soft", "--soft_source", "distill", "--epochs", "1")
    summary, history = res["soft"][0]
    assert summary["status"] == "done"
    assert history[0]["source_ce"] > 0 and history[-1]["lambda"] == 0.0  # distillation term, decaying


def test_source_heads_fresh_unless_the_classes_provably_match(tmp_path, folder, checkpoint):
    """--checkpoint records no class names: soft/selective train a fresh head over the --source classes."""
    from tlkernels.train.recipes import Soft, source_head
    fc = torch.nn.Linear(8, 1000)
    head, fresh = source_head(fc, ["a", "b"], None)
    assert fresh and head.out_features == 2 and float(head.weight.detach().std()) < 0.02
    assert source_head(fc, ["a", "b"], ["a", "b"]) == (fc, False)
    assert source_head(fc, ["a", "b"], ["b", "a"])[1]  # same names, other order: not the same head
    cfg = parse_args(["--target", folder, "--checkpoint", checkpoint, "--source", folder, "--method", "soft"])
    net = Soft(cfg, False).build(torchvision.models.resnet18(), 3, ["x", "y", "z", "w"], None)
    assert net.source_head.out_features == 4
    res = run(tmp_path, folder, checkpoint, "--method", "soft", "--source", folder, "--epochs", "1")
    assert res["soft"][0][0]["status"] == "done"


def test_selective_rounds_model_bank_and_levels(tmp_path, folder, checkpoint):
    res = run(tmp_path, folder, checkpoint, "--method", "selective", "--source", folder, "--selective_bank", "model",
              "--selective_k", "2", "--selective_bins", "4", "--epochs", "3", "--selective_rounds", "3",
              "--selective_hardness", "entropy", "--selective_entropy_quantile", "0.5")
    hist = res["selective"][0][1]
    mined = [h for h in hist if "hard" in h]
    assert [h["epoch"] for h in mined] == [0, 1]  # after each round but the last
    assert all(h["hard"] > 0 for h in mined) and mined[1]["mean_level"] > mined[0]["mean_level"] > 1.0
    ck = torch.load(tmp_path / "selective" / "last.pt", weights_only=True)
    assert int(ck["recipe"]["levels"].max()) <= 3
    # the --source folder's descriptors are a store in the cache; a second run reads it, writing nothing
    root = tmp_path / "cache" / "selective-model-seed0" / "descriptors-source"
    m = json.loads((root / "manifest.json").read_text())
    assert m["rows"] == 21 and m["dims"] == 128 * 4 and all(s["sha256"] for s in m["shards"])
    stamp = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    again = run(tmp_path, folder, checkpoint, "--method", "selective", "--source", folder, "--selective_bank", "model",
                "--selective_k", "2", "--selective_bins", "4", "--epochs", "1", "--out_dir", str(tmp_path / "again"),
                "--cache_dir", str(tmp_path / "cache"))
    assert again["selective"][0][0]["status"] == "done"
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamp


def test_spottune_global_trains_and_exports_a_plain_network(tmp_path, folder, checkpoint):
    res = run(tmp_path, folder, checkpoint, "--method", "spottune_global", "--spottune_budget", "4", "--export",
              "--epochs", "1")
    summary, history = res["spottune_global"][0]
    assert summary["status"] == "done" and sum(history[-1]["gates"].values()) == 4
    out = tmp_path / "spottune_global"
    m = torchvision.models.resnet18(num_classes=3)
    m.load_state_dict(torch.load(out / "plain.pt", weights_only=True))  # the unmodified architecture
    m.eval()
    target, _ = data.load_data(parse_args(["--target", folder, "--checkpoint", checkpoint, "--image_size", "32"]), 0)
    x, _ = data.take(target.val, list(range(5)))
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), m(x), rtol=1e-4, atol=1e-4)
