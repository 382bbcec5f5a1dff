"""The fine-tuning controls of the trainer: learning-rate scales per parameter (--head_lr_mult, --layer_decay,
frozen parameters and the methods' own modules), the warm-up + cosine schedule, --opt adamw, --grad_accum (and
a resume in the middle of an accumulation), --clip_grad, --model_ema, --freeze_bn, --sync_bn's checks, and the
files and figures a run reports (summary.csv, top-5)."""
import csv
import math
import pathlib

import pytest
import torch
import torch.nn as nn
import torchvision

from tlkernels.train import backbones, loop, optimize
from tlkernels.train.config import parse_args
from tlkernels.train.recipes import recipe

from test_train import cache, run  # noqa: F401  (the demo runner and its shared cache fixture)


def built(method, **options):
    """(config, recipe, net) of `method` on a torchvision ResNet-18 with 5 classes."""
    cfg = parse_args(["--target", "x", "--quiet", *[a for k, v in options.items() for a in (f"--{k}", str(v))]])
    rec = recipe(cfg, method, False)
    return cfg, rec, rec.build(torchvision.models.resnet18(num_classes=10), 5)


def test_layer_decay_scales_by_block_depth_and_head_lr_mult_scales_the_new_head():
    cfg, rec, net = built("finetune", layer_decay=0.5, head_lr_mult=10)
    scales = optimize.lr_scales(cfg, net, rec.units, rec.new)
    by_name = {n: scales[id(p)] for n, p in net.named_parameters()}
    assert len(rec.units) == 8  # BasicBlocks: depth 1..8, stem 0, head 9
    assert by_name["trunk.conv1.weight"] == by_name["trunk.bn1.bias"] == 0.5 ** 9
    assert by_name["trunk.layer1.0.conv1.weight"] == 0.5 ** 8
    assert by_name["trunk.layer2.0.downsample.0.weight"] == by_name["trunk.layer2.0.conv2.weight"] == 0.5 ** 6
    assert by_name["trunk.layer4.1.bn2.weight"] == 0.5 ** 1
    assert by_name["head.weight"] == by_name["head.bias"] == 10.0
    groups = optimize.scaled_groups(rec.param_groups(net, 1e-4), scales, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert sorted({round(g["lr"], 12) for g in groups}) == sorted({round(0.1 * v, 12) for v in by_name.values()})
    assert all(g["weight_decay"] == 1e-4 for g in groups)


def test_layer_decay_keeps_the_depths_through_the_methods_wrappers():
    import re
    for method, extra in (("finetune", None), ("spottune", "trunk.policy."), ("adafilter", "trunk.controller.")):
        cfg, rec, net = built(method, layer_decay=0.8)
        scales = optimize.lr_scales(cfg, net, rec.units, rec.new)
        for n, p in net.named_parameters():
            if not p.requires_grad:  # SpotTune's frozen copy: no scale, no place in the depth order
                assert id(p) not in scales, n
            elif (extra and n.startswith(extra)) or n.startswith("head."):
                assert scales[id(p)] == 1.0, n
            else:  # ResNet-18's block layerX.Y (wrapped or not) at depth 2(X - 1) + Y + 1, the stem at 0
                m = re.search(r"layer(\d)\.(\d)\.", n)
                depth = 2 * (int(m[1]) - 1) + int(m[2]) + 1 if m else 0
                assert scales[id(p)] == pytest.approx(0.8 ** (9 - depth)), n


def test_frozen_batchnorms_take_no_place_in_the_depth_order():
    # (timm's layer decay counts parameters that do not require grad and shifts the scales: its issue 2691)
    cfg, rec, net = built("finetune", layer_decay=0.5)
    before = {n: s for n, p in net.named_parameters() for s in [optimize.lr_scales(cfg, net, rec.units, rec.new)[id(p)]]}
    frozen = optimize.freeze_batchnorm(net, rec.new)
    assert len(frozen) == 20 and all(not p.requires_grad for m in frozen for p in m.parameters())
    after = {n: optimize.lr_scales(cfg, net, rec.units, rec.new).get(id(p)) for n, p in net.named_parameters()}
    assert {n: s for n, s in after.items() if s is not None} == {n: s for n, s in before.items() if "bn" not in n
                                                                 and "downsample.1" not in n}


def test_a_backbone_without_blocks_decays_per_convolution():
    net = torchvision.models.vgg11(num_classes=3).features
    units = backbones.depth_units(net)
    assert len(units) == 8 and all(isinstance(u, nn.Conv2d) for u in units)
    depths = backbones.parameter_depths(net, units)
    assert [depths[id(u.weight)] for u in units] == list(range(1, 9))


def test_warmup_then_cosine():
    f = [optimize.lr_factor(s, 10, 4) for s in range(11)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and f[10] == 0.0
    assert f[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert [optimize.lr_factor(s, 8, 0) for s in (0, 4, 8)] == [1.0, 0.5, 0.0]


def test_model_ema_follows_timms_warmup_formula():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = optimize.ModelEMA(net, 0.99)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 3
    ema.update(net)  # update 0: decay min(0.99, 1/10)
    torch.testing.assert_close(ema.module[0].weight, 0.1 * w0 + 0.9 * (w0 + 1))
    assert int(ema.module[1].num_batches_tracked) == 3
    prev = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)  # update 1: decay 2/11
    torch.testing.assert_close(ema.module[0].weight, 2 / 11 * prev + 9 / 11 * (w0 + 2))
    for _ in range(199):
        ema.update(net)
    assert ema.updates == 201  # (from update 989 on, the decay is 0.99 itself)
    state = ema.state_dict()
    again = optimize.ModelEMA(net, 0.99)
    again.load_state_dict(state)
    assert again.updates == 201 and torch.equal(again.module[0].weight, ema.module[0].weight)


def test_clip_grad_clips_the_global_norm():
    cfg = parse_args(["--clip_grad", "0.5", "--quiet"])
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    opt = torch.optim.SGD([p], lr=1.0)
    norm = optimize.clip_gradients(cfg, opt, torch.amp.GradScaler("cpu", enabled=False))
    assert float(norm) == 5.0 and float(p.grad.norm()) == pytest.approx(0.5)


@pytest.mark.parametrize("argv,msg", [
    (["--layer_decay", "0"], r"--layer_decay must be in \(0, 1\]"),
    (["--layer_decay", "1.5"], r"--layer_decay must be in \(0, 1\]"),
    (["--model_ema", "1"], r"--model_ema must be in \[0, 1\)"),
    (["--warmup_epochs", "3", "--epochs", "3"], r"--warmup_epochs must be less than --epochs \(3\), got 3"),
    (["--grad_accum", "0"], r"--grad_accum must be >= 1, got 0"),
    (["--head_lr_mult", "0"], r"--head_lr_mult must be > 0.0, got 0.0"),
    (["--clip_grad=-1"], r"--clip_grad must be >= 0.0 \(0: off\), got -1.0"),
    (["--opt", "lamb"], r"invalid choice: 'lamb'"),
])
def test_bad_control_values_are_refused_naming_the_option(argv, msg, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv + ["--quiet"])
    assert __import__("re").search(msg, capsys.readouterr().err)


def test_options_that_do_nothing_are_named(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match=r"--momentum acts only with --opt sgd; --sync_bn acts only with several "
                                         r"processes \(torchrun\)"):
        parse_args(["--opt", "adamw", "--momentum", "0.5", "--sync_bn", "--quiet"])


def test_sync_bn_on_cpu_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = parse_args(["--sync_bn", "--device", "cpu", "--quiet"])
    monkeypatch.setattr(loop.dist, "is_initialized", lambda: True)  # (as under torchrun; nothing initialised)
    with pytest.raises(SystemExit, match=r"--sync_bn needs GPUs .* on cpu"):
        loop.setup_processes(cfg)


# ----------------------------------------------------------------------------- on the demo
CONTROLS = ("--method", "finetune", "--opt", "adamw", "--lr", "0.001", "--weight_decay", "0.05", "--head_lr_mult", "10",
            "--warmup_epochs", "1", "--layer_decay", "0.7", "--clip_grad", "1.0", "--grad_accum", "3", "--batch_size",
            "8", "--model_ema", "0.9", "--freeze_bn")


def test_every_control_together_on_the_demo_and_a_resume_inside_an_accumulation(tmp_path, cache):
    res = run(tmp_path / "full", cache, *CONTROLS, "--export")
    summary, history = res["finetune"][0]
    assert summary["status"] == "done" and summary["steps"] == 8  # 4 batches per epoch, 2 epochs
    out = tmp_path / "full" / "finetune"
    ck = torch.load(out / "last.pt", weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    # AdamW, each tensor updated once per 3 batches and at the epoch's end: 2 steps per epoch
    assert all(s["step"] == 4 for s in ck["optimizer"]["state"].values())
    assert {g["lr_scale"] for g in groups} == {10.0} | {0.7 ** k for k in range(1, 10)}
    assert all(g["initial_lr"] == pytest.approx(0.001 * g["lr_scale"]) for g in groups)
    assert [h["lr"] for h in history[:4]] == pytest.approx([0.001 * f for f in (0.5, 0.75, 1.0, 1.0)])
    # --freeze_bn: the pre-trained BN statistics and affine parameters are where pre-training left them
    pre = torch.load(sorted(pathlib.Path(cache).glob("pretrained-demo-*.pt"))[0], weights_only=True)
    for k in ("bn1.running_mean", "bn1.weight", "layer3.1.bn2.running_var", "layer4.0.downsample.1.bias"):
        assert torch.equal(ck["model"][f"trunk.{k}"], pre[k]), k
    assert not torch.equal(ck["model"]["trunk.conv1.weight"], pre["conv1.weight"])
    # --model_ema: validated beside the model, exported beside it
    ev = [h for h in history if "val_acc" in h]
    assert all(0 <= h["ema_val_acc"] <= 1 and 0 <= h["val_top5"] <= 1 and h["val_top5"] >= h["val_acc"] for h in ev)
    assert ck["ema"]["updates"] == 4 and summary["ema_final_val_acc"] == ev[-1]["ema_val_acc"]
    assert (out / "model.pt2").exists() and (out / "ema" / "model.pt2").exists() and (out / "ema" / "plain.pt").exists()
    # summary.csv: one row per epoch, timm's columns
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "ema_eval_top1"]
    assert float(rows[1]["eval_top1"]) == pytest.approx(ev[-1]["val_acc"], abs=1e-6)
    assert float(rows[0]["train_loss"]) == pytest.approx(sum(h["loss"] for h in history[:4]) / 4, rel=1e-5)
    # interrupted after 2 of an accumulation's 3 batches, resumed: the uninterrupted run's numbers (the
    # accumulated gradients come back from last.pt)
    part = run(tmp_path / "part", cache, *CONTROLS, "--stop_after", "2")["finetune"][0]
    assert part[0]["status"] == "interrupted"
    resumed = run(tmp_path / "part", cache, *CONTROLS, "--resume")["finetune"][0][1]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in history]
    assert resumed[-1]["ema_val_acc"] == history[-1]["ema_val_acc"]


# ----------------------------------------------------------------------------- comparison.md
def fake_results(finals):
    """{method: {seed: (summary, history)}} with the given final accuracies per seed."""
    return {m: {s: ({"final_val_acc": a, "best_val_acc": a, "seconds": 1.0}, []) for s, a in enumerate(accs)}
            for m, accs in finals.items()}


def test_comparison_tells_a_gain_from_seed_noise():
    from tlkernels.train import compare
    # the demo's case: L2-SP 4.4 points below fine-tuning on one seed, 1.1 above on another
    text, base, seeds = compare.table(fake_results({"finetune": [0.500, 0.400], "l2sp": [0.456, 0.411],
                                                    "spottune": [0.530, 0.431]}))
    assert base == "finetune" and seeds == [0, 1]
    rows = {r.split("|")[1].strip(): r for r in text.splitlines()[2:]}
    assert "(baseline)" in rows["finetune"]
    mean, sd = (-0.044 + 0.011) / 2, abs(-0.044 - 0.011) / math.sqrt(2)
    half = 12.706 * sd / math.sqrt(2)
    assert f"{100 * mean:+.1f} pts [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]: not distinguishable" \
        in rows["l2sp"]
    assert "+3.0 pts [+2.4, +3.7]: better" in rows["spottune"]  # 3.0 and 3.1 points: a consistent gain
    one, _, _ = compare.table(fake_results({"finetune": [0.5], "soft": [0.4]}))
    assert "-10.0 pts (one seed: no interval; use --seeds)" in one


def test_t_quantiles():
    from tlkernels.train import compare
    assert compare.t975(1) == 12.706 and compare.t975(30) == 2.042
    assert compare.t975(31) == pytest.approx(2.0395, abs=1e-4) and compare.t975(1000) == pytest.approx(1.9623, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom must be >= 1, got 0"):
        compare.t975(0)


# ----------------------------------------------------------------------------- shipped recipes
@pytest.mark.parametrize("name,env", [("small_target_gpu", {}), ("large_target_torchrun", {"WORLD_SIZE": "2"}),
                                      ("cpu_demo", {})])
def test_shipped_recipes_are_valid_and_every_option_acts(name, env, monkeypatch):
    import dataclasses
    import warnings
    from tlkernels.train.config import shipped_configs
    assert set(shipped_configs()) == {"small_target_gpu", "large_target_torchrun", "cpu_demo"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an option that does nothing in the run it describes would warn)
        cfg = parse_args(["--config", name, *(["--target", "data/x"] if name != "cpu_demo" else [])])
    assert cfg.config == name
    if name == "cpu_demo":  # the README's demo command (on the CPU), as a recipe
        readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
        cmd = readme.split("python -m tlkernels.train ", 1)[1].splitlines()[0].split()
        assert dataclasses.replace(parse_args(cmd), config=name, device="cpu") == cfg


def test_a_flag_wins_over_the_recipe_and_an_unknown_name_is_refused(capsys):
    assert parse_args(["--config", "small_target_gpu", "--target", "x", "--epochs", "3", "--amp", "off"]).epochs == 3
    with pytest.raises(SystemExit):
        parse_args(["--config", "tiny"])
    assert "--config tiny: no such file, and not a shipped recipe (cpu_demo, large_target_torchrun, " \
           "small_target_gpu)" in capsys.readouterr().err
