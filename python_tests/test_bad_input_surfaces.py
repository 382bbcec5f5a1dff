"""Bad and edge inputs over the surfaces around the ops: the trainer's options, real image folders and files,
the environment and the caches, the exports, selfcheck's command line, meta tensors, estimate_fisher and the
method wrappers on torchvision's non-ResNet models. Each case either raises (or warns) with a message naming
the option, file or argument, what was expected and what came, or gives the correct result. Runs of the
trainer itself (reruns on warm caches, resumes, non-finite losses) are in test_train_reruns.py."""
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from tlkernels import _choices
from tlkernels._extension import HAS_C
from tlkernels.nn import GatedConv2d, estimate_fisher
from tlkernels.ops import cross_entropy, gated_conv2d
from tlkernels.train import data, parse_args
from tlkernels.train.backbones import torchvision_archs


# ----------------------------------------------------------------------------- trainer options
def _file(tmp_path):
    p = tmp_path / "a_file"
    p.write_text("x")
    return str(p)


# (id, argv builder (tmp_path -> argv), message pattern): parse_args must exit with the message on stderr.
OPTION_ERRORS = [
    ("std-nan", lambda d: ["--target", "x", "--std", "nan,1,1"], r"--std must be finite numbers, got 'nan,1,1'"),
    ("std-inf", lambda d: ["--target", "x", "--std", "0.2,inf,0.2"], r"--std must be finite numbers"),
    ("mean-nan", lambda d: ["--target", "x", "--mean", "0.5,nan,0.5"], r"--mean must be finite numbers"),
    ("mean-text", lambda d: ["--target", "x", "--mean", "0.5,red,0.5"], r"--mean must be comma-separated numbers"),
    ("lr-nan", lambda d: ["--lr", "nan"], r"--lr must be a finite number, got nan"),
    ("lr-inf", lambda d: ["--lr", "inf"], r"--lr must be a finite number, got inf"),
    ("lr-neg-inf", lambda d: ["--lr=-inf"], r"--lr must be a finite number"),
    ("lr-zero", lambda d: ["--lr", "0"], r"--lr must be > 0.0, got 0.0"),
    ("lr-negative", lambda d: ["--lr", "-0.1"], r"--lr must be > 0.0, got -0.1"),
    ("momentum-one", lambda d: ["--momentum", "1.0"], r"--momentum must be in \[0, 1\), got 1.0"),
    ("momentum-negative", lambda d: ["--momentum", "-0.5"], r"--momentum must be in \[0, 1\)"),
    ("momentum-nan", lambda d: ["--momentum", "nan"], r"--momentum must be a finite number"),
    ("weight-decay-negative", lambda d: ["--weight_decay=-1e-4"], r"--weight_decay must be >= 0.0"),
    ("l2sp-alpha-negative", lambda d: ["--method", "l2sp", "--l2sp_alpha", "-0.1"], r"--l2sp_alpha must be >= 0.0"),
    ("l2sp-beta-nan", lambda d: ["--method", "l2sp", "--l2sp_beta", "nan"], r"--l2sp_beta must be a finite number"),
    ("soft-lambda0-negative", lambda d: ["--method", "soft", "--soft_lambda0", "-1"], r"--soft_lambda0 must be >= 0.0"),
    ("soft-lambda0-inf", lambda d: ["--method", "soft", "--soft_lambda0", "inf"], r"--soft_lambda0 must be a finite"),
    ("spottune-tau-zero", lambda d: ["--method", "spottune", "--spottune_tau", "0"], r"--spottune_tau must be > 0.0"),
    ("policy-lr-negative", lambda d: ["--method", "spottune", "--policy_lr", "-1"], r"--policy_lr must be >= 0.0"),
    ("label-smoothing-nan", lambda d: ["--label_smoothing", "nan"], r"--label_smoothing must be a finite number"),
    ("entropy-quantile-nan", lambda d: ["--selective_entropy_quantile", "nan"],
     r"--selective_entropy_quantile must be a finite number"),
    ("adafilter-hidden-zero", lambda d: ["--method", "adafilter", "--adafilter_hidden", "0"],
     r"--adafilter_hidden must be >= 1, got 0"),
    ("image-size-negative", lambda d: ["--image_size", "-5"], r"--image_size must be >= 1, got -5"),
    ("seeds-twice", lambda d: ["--seeds", "0,1,0"], r"--seeds lists 0 more than once, got '0,1,0'"),
    ("compare-twice", lambda d: ["--compare", "finetune,soft,finetune"], r"--compare lists finetune more than once"),
    ("seeds-text", lambda d: ["--seeds", "1,,x"], r"--seeds must be comma-separated integers"),
    ("seeds-float", lambda d: ["--seeds", "0.5"], r"--seeds must be comma-separated integers"),
    ("compare-unknown", lambda d: ["--compare", "finetune,nope"], r"unknown method 'nope'"),
    ("method-plus-other", lambda d: ["--method", "soft+adafilter"], r"unknown method 'soft\+adafilter'"),
    ("out-dir-is-a-file", lambda d: ["--out_dir", _file(d)], r"--out_dir .*a_file: .*a_file' is a file, expected a "
                                                              r"directory"),
    ("out-dir-below-a-file", lambda d: ["--out_dir", os.path.join(_file(d), "runs")],
     r"--out_dir .*: .*a_file' is a file, so nothing can be created below it"),
    ("cache-dir-below-a-file", lambda d: ["--cache_dir", os.path.join(_file(d), "c")],
     r"--cache_dir .*is a file, so nothing can be created below it"),
    ("out-dir-read-only-fs", lambda d: ["--out_dir", "/proc/tlkernels-runs"], r"--out_dir /proc/tlkernels-runs: "
                                                                              r"directory '/proc' is not writable"),
    ("arch-bogus", lambda d: ["--target", "x", "--arch", "bogus_net"],
     r"--arch 'bogus_net' is not a torchvision classification model; accepted: .*resnet18.*"),
    ("arch-typo", lambda d: ["--target", "x", "--arch", "resnt18"], r"--arch 'resnt18' .*did you mean resnet18"),
    ("arch-timm-typo", lambda d: ["--target", "x", "--arch", "timm/convnext_tinyy"],
     r"--arch 'timm/convnext_tinyy' is not a timm model \(did you mean timm/convnext_tiny"),
    ("arch-detection-model", lambda d: ["--target", "x", "--arch", "fasterrcnn_resnet50_fpn"],
     r"--arch 'fasterrcnn_resnet50_fpn' is not a torchvision classification model"),
    ("device-cuda-letters", lambda d: ["--device", "cuda:one"], r"--device must be auto, cpu, cuda or cuda:N"),
    ("workers-below-minus-one", lambda d: ["--workers", "-2"], r"--workers must be >= 0, or -1"),
]


def _config(d, values):
    p = d / "cfg.json"
    p.write_text(values)
    return ["--config", str(p)]


OPTION_ERRORS += [
    ("config-nan", lambda d: _config(d, '{"lr": NaN}'), r"--lr must be a finite number, got nan"),
    ("config-infinity", lambda d: _config(d, '{"l2sp_alpha": Infinity}'), r"--l2sp_alpha must be a finite number"),
    ("config-momentum-two", lambda d: _config(d, '{"momentum": 2}'), r"--momentum must be in \[0, 1\), got 2"),
    ("config-seeds-twice", lambda d: _config(d, '{"seeds": "3,3"}'), r"--seeds lists 3 more than once"),
    ("config-bool-for-int", lambda d: _config(d, '{"epochs": true}'), r"option 'epochs' must be int, got True"),
]


@pytest.mark.parametrize("argv,pattern", [pytest.param(a, p, id=i) for i, a, p in OPTION_ERRORS])
def test_bad_option_is_refused_naming_it(argv, pattern, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv(tmp_path))
    err = capsys.readouterr().err
    assert re.search(pattern, err), err


def test_the_arch_list_is_torchvisions_classification_models():
    archs = torchvision_archs()
    assert "resnet18" in archs and "convnext_tiny" in archs and "mobilenet_v3_large" in archs
    assert "fasterrcnn_resnet50_fpn" not in archs and "deeplabv3_resnet50" not in archs


# (id, argv, the option the warning must name): options set away from their default in a run they do nothing in.
UNUSED = [
    ("source-with-distill", ["--target", "t", "--source", "s", "--method", "soft", "--soft_source", "distill"],
     "--source acts only with a run that reads source images"),
    ("fisher-without-l2sp", ["--method", "finetune", "--l2sp_fisher", "10"], "--l2sp_fisher acts only with a method "
                                                                             "with the L2-SP penalty"),
    ("l2sp-alpha-with-finetune", ["--method", "finetune", "--l2sp_alpha", "0.5"], "--l2sp_alpha acts only"),
    ("tau-with-finetune", ["--method", "finetune", "--spottune_tau", "2"], "--spottune_tau acts only with --method "
                                                                           "spottune or spottune_global"),
    ("selective-k-with-adafilter", ["--method", "adafilter", "--selective_k", "5"], "--selective_k acts only with "
                                                                                    "--method selective"),
    ("image-size-on-the-demo", ["--image_size", "64"], "--image_size acts only with --target image folders"),
    ("arch-on-the-demo", ["--arch", "resnet50"], "--arch acts only with --target"),
    ("seed-with-seeds", ["--seed", "3", "--seeds", "0,1"], "--seed acts only with a run without --seeds"),
    ("method-with-compare", ["--method", "l2sp", "--compare", "finetune,soft"], "--method acts only with a run "
                                                                                "without --compare"),
    ("entropy-quantile-misclassified", ["--method", "selective", "--selective_entropy_quantile", "0.5"],
     "--selective_entropy_quantile acts only with --method selective with --selective_hardness entropy"),
    ("pretrain-with-checkpoint", ["--checkpoint", "ck.pt", "--pretrain_epochs", "3"], "--pretrain_epochs acts only"),
    ("budget-with-spottune", ["--method", "spottune", "--spottune_budget", "2"], "--spottune_budget acts only with "
                                                                                 "--method spottune_global"),
    ("policy-with-global", ["--method", "spottune_global", "--spottune_policy", "resnet"],
     "--spottune_policy acts only with --method spottune"),
    ("soft-schedule-with-selective", ["--method", "selective", "--soft_schedule", "linear"], "--soft_schedule acts"),
    ("hidden-with-spottune", ["--method", "spottune", "--adafilter_hidden", "8"], "--adafilter_hidden acts only"),
    ("skip-bad-on-the-demo", ["--skip_bad_images"], "--skip_bad_images acts only with --target"),
    ("source-limit-with-distill", ["--target", "t", "--method", "soft", "--soft_source", "distill",
                                   "--source_limit", "5"], "--source_limit acts only"),
]


@pytest.mark.parametrize("argv,says", [pytest.param(a, s, id=i) for i, a, s in UNUSED])
def test_option_that_does_nothing_is_warned(argv, says, tmp_path):
    with pytest.warns(UserWarning, match="options that do nothing in this run") as rec:
        parse_args(["--out_dir", str(tmp_path), *argv])
    assert any(says in str(w.message) for w in rec), [str(w.message) for w in rec]


@pytest.mark.parametrize("argv", [
    ["--method", "l2sp", "--l2sp_alpha", "0.2", "--l2sp_fisher", "20"],
    ["--compare", "finetune,adafilter+l2sp", "--l2sp_beta", "0.1", "--adafilter_hidden", "8"],
    ["--target", "t", "--source", "s", "--method", "soft", "--soft_source", "images", "--source_limit", "9"],
    ["--target", "t", "--source", "s", "--method", "l2sp", "--l2sp_fisher", "9"],
    ["--method", "selective", "--selective_hardness", "entropy", "--selective_entropy_quantile", "0.5"],
    ["--method", "spottune_global", "--spottune_budget", "2", "--spottune_tau", "1"],
    ["--source_limit", "100", "--pretrain_epochs", "3"],  # the demo's pre-training reads them
    ["--method", "finetune", "--l2sp_alpha", "0.1"],  # the default value: nothing changes
])
def test_options_that_act_draw_no_warning(argv, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        parse_args(["--out_dir", str(tmp_path), *argv])


# ----------------------------------------------------------------------------- image folders and files
def _png(path, size=(12, 10), mode="RGB", value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


def _folder(root, classes=("a", "b"), per_class=2, parts=("train", "val")):
    for part in parts:
        for c in classes:
            for k in range(per_class):
                _png(os.path.join(root, part, c, f"{k}.png"), value=40 * k + 10)
    return str(root)


def test_empty_class_folder_names_option_and_folder(tmp_path):
    root = _folder(tmp_path / "t")
    os.makedirs(tmp_path / "t" / "train" / "empty")
    os.makedirs(tmp_path / "t" / "val" / "empty")
    with pytest.raises(SystemExit, match=r"--target: class folder '.*train/empty' holds no image file \(extensions "
                                         r"\.jpg, .*\); remove the folder or add its images"):
        data.list_image_folder(os.path.join(root, "train"), "--target")


def test_val_holding_only_non_image_files(tmp_path):
    root = _folder(tmp_path / "t", parts=("train",))
    for c in ("a", "b"):
        os.makedirs(tmp_path / "t" / "val" / c)
        (tmp_path / "t" / "val" / c / "notes.txt").write_text("not an image")
    cfg = parse_args(["--target", root, "--checkpoint", "x.pt", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--target: class folder '.*val/a' holds no image file"):
        data.load_data(cfg, 0)


def test_folder_without_class_folders(tmp_path):
    _png(str(tmp_path / "t" / "train" / "loose.png"))
    with pytest.raises(SystemExit, match=r"--source: '.*train' has no class folders \(expected .*/<class>/\*.jpg\)"):
        data.list_image_folder(str(tmp_path / "t" / "train"), "--source")


def test_hidden_folders_and_files_are_no_classes_and_no_images(tmp_path):
    root = _folder(tmp_path / "t")
    _png(os.path.join(root, "train", ".ipynb_checkpoints", "0.png"))
    (tmp_path / "t" / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    classes, samples = data.list_image_folder(os.path.join(root, "train"), "--target")
    assert classes == ["a", "b"] and len(samples) == 4
    assert not any(os.path.basename(p).startswith(".") for p, _ in samples)


def test_listing_equals_torchvision_imagefolder_on_a_plain_folder(tmp_path):
    root = _folder(tmp_path / "t", classes=("zebra", "ant", "Moth"), per_class=3)
    _png(os.path.join(root, "train", "ant", "sub", "deep.PNG"))  # nested and upper-case extension
    want = torchvision.datasets.ImageFolder(os.path.join(root, "train"))
    classes, samples = data.list_image_folder(os.path.join(root, "train"), "--target")
    assert classes == want.classes and samples == want.samples


def test_directory_symlink_loop_counts_each_file_once(tmp_path):
    root = _folder(tmp_path / "t", per_class=4)
    os.symlink(os.path.join(root, "train", "a"), os.path.join(root, "train", "a", "loop"))
    with pytest.warns(UserWarning, match=r"--target: .* reached more than once through symbolic links; each image "
                                         r"counts once"):
        classes, samples = data.list_image_folder(os.path.join(root, "train"), "--target")
    assert len(samples) == 8 and len({os.path.realpath(p) for p, _ in samples}) == 8


def test_file_linked_into_two_classes_is_refused(tmp_path):
    root = _folder(tmp_path / "t")
    os.symlink(os.path.join(root, "train", "a", "0.png"), os.path.join(root, "train", "b", "also_a.png"))
    with pytest.raises(SystemExit, match=r"--target: '.*b/also_a.png' \(class 'b'\) is the file '.*a/0.png' of class "
                                         r"'a'; an image belongs to one class"):
        data.list_image_folder(os.path.join(root, "train"), "--target")


def test_symlinked_class_folder_outside_the_root_is_read(tmp_path):
    root = _folder(tmp_path / "t")
    _folder(tmp_path / "elsewhere", classes=("c",), parts=("store",))
    os.symlink(str(tmp_path / "elsewhere" / "store" / "c"), os.path.join(root, "train", "c"))
    classes, samples = data.list_image_folder(os.path.join(root, "train"), "--target")
    assert classes == ["a", "b", "c"] and [lbl for _, lbl in samples].count(2) == 2


def test_target_that_is_a_file(tmp_path):
    cfg = parse_args(["--target", _file(tmp_path), "--checkpoint", "x.pt", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--target: directory '.*a_file' does not exist"):
        data.load_data(cfg, 0)


def test_train_and_val_classes_differ(tmp_path):
    root = _folder(tmp_path / "t")
    _png(os.path.join(root, "val", "c", "0.png"))
    cfg = parse_args(["--target", root, "--checkpoint", "x.pt", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--target: train and val class folders differ"):
        data.load_data(cfg, 0)


@pytest.mark.parametrize("mode,values,white", [
    ("I;16", [0, 1000, 30000, 65535], 65535.0),
    ("I", [0, 1000, 30000, 65535], 65535.0),
    ("F", [0.0, 0.25, 0.5, 1.0], 1.0),
])
def test_high_bit_depth_image_is_scaled_not_clipped(tmp_path, mode, values, white):
    a = np.array(values * 6, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]).reshape(4, 6)
    path = str(tmp_path / ("x.png" if mode == "I;16" else "x.tif"))
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == mode
    img = data.read_rgb(path)
    assert isinstance(img, torch.Tensor) and img.shape == (3, 4, 6) and img.dtype == torch.float32
    torch.testing.assert_close(img[1], torch.as_tensor(a / white, dtype=torch.float32))
    assert 0.0 < float(img.mean()) < 1.0  # (8-bit clipping made nearly every pixel white)


def test_sixteen_bit_png_through_the_training_transforms(tmp_path):
    a = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)  # values up to ~64000
    path = str(tmp_path / "deep.png")
    Image.fromarray(a).save(path)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = data.eval_transform(32, mean, std)(data.read_rgb(path))
    assert x.shape == (3, 32, 32) and bool(torch.isfinite(x).all())
    raw = x * 0.25 + 0.5
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0 + 1e-5 and float(raw.std()) > 0.1
    torch.manual_seed(0)
    y = data.train_transform(16, mean, std)(data.read_rgb(path))
    assert y.shape == (3, 16, 16) and bool(torch.isfinite(y).all())


def test_eight_bit_and_palette_images_read_as_before(tmp_path):
    for mode in ("L", "RGB", "RGBA", "P", "1", "CMYK"):
        p = _png(str(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"), mode=mode, value=200 if mode != "1" else 1)
        img = data.read_rgb(p)
        assert img.mode == "RGB", mode


@pytest.mark.parametrize("content", [b"", b"GIF89a not really", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_unreadable_file_is_named_or_skipped(tmp_path, content):
    root = _folder(tmp_path / "t")
    bad = tmp_path / "t" / "train" / "a" / "bad.png"
    bad.write_bytes(content)
    tf = data.eval_transform(8, (0.5,) * 3, (0.5,) * 3)
    ds = data.ImageFolderSet(os.path.join(root, "train"), tf, skip_bad=False, what="--target")
    i = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(data.BadImageError, match=r"--target: cannot read image .*bad.png.*--skip_bad_images"):
        ds[i]
    ds.skip_bad = True
    assert ds[i] is None


def test_classes_without_readable_images(tmp_path):
    root = _folder(tmp_path / "t", classes=("a", "b", "c"))
    ds = data.ImageFolderSet(os.path.join(root, "train"), None)
    assert data.classes_without_images(ds, {2, 3}) == ["b"]
    assert data.classes_without_images(ds, {2, 4}) == []


@pytest.mark.parametrize("n,bs,steps", [(30, 16, 2), (17, 16, 1), (33, 16, 2), (16, 16, 1), (5, 8, 1), (9, 4, 2),
                                        (1, 16, 1)])
def test_a_last_batch_of_one_image_is_dropped(n, bs, steps):
    plan = data.StepPlan(n, bs, 0, 0, 1)
    assert plan.steps_per_epoch() == steps
    sizes = [len(b) for b in plan]
    assert len(sizes) == steps and (min(sizes) > 1 or n == 1)


# ----------------------------------------------------------------------------- environment and caches
def _cache_file(tmp_path, picks, fmt=_choices.FORMAT):
    p = tmp_path / "choices.json"
    sections = {"picks": picks} if fmt == _choices.FORMAT else picks  # (format 1: {"cpp": {...}, "python": {...}})
    p.write_text(json.dumps({"format": fmt, "host": _choices.host_key(), **sections}))
    return str(p)


@pytest.mark.skipif(not HAS_C, reason="the compiled ops register their candidate names")
def test_choice_cache_naming_unknown_strategies_warns_once_and_loads_the_rest(tmp_path):
    path = _cache_file(tmp_path, {"fwd|sig-a": "warp_drive", "fwd|sig-b": "concat", "('knn_gemm', 1)": "abacus",
                                  "('knn_gemm', 2)": "numpy"})
    _choices._WARNED.clear()
    with pytest.warns(RuntimeWarning, match=r"choice cache .*choices.json: unknown strategies: \('knn_gemm', 1\)=abacus, "
                                            r"fwd\|sig-a=warp_drive name no candidate of any op \(known: .*concat.*\)") as rec:
        taken = _choices.load(path)
        _choices.load(path)
    assert taken == 2 and len([w for w in rec if "unknown strategies" in str(w.message)]) == 1
    picks = _choices.current()
    assert picks.get("fwd|sig-b") == "concat" and "fwd|sig-a" not in picks
    assert picks.get("('knn_gemm', 2)") == "numpy" and "('knn_gemm', 1)" not in picks


@pytest.mark.skipif(not HAS_C, reason="the compiled ops register their candidate names")
def test_a_format_1_choice_cache_is_read_into_the_one_table(tmp_path):
    path = _cache_file(tmp_path, {"cpp": {"fwd|sig-c": "blended"}, "python": {"('knn_gemm', 3)": "torch"}}, fmt=1)
    assert _choices.load(path) == 2
    picks = _choices.current()
    assert picks.get("fwd|sig-c") == "blended" and picks.get("('knn_gemm', 3)") == "torch"
    assert _choices.save(path)  # rewritten in this format, the picks kept
    data = json.loads(open(path).read())
    assert data["format"] == _choices.FORMAT and data["picks"]["fwd|sig-c"] == "blended"


@pytest.mark.skipif(not HAS_C, reason="the compiled ops register their candidate names")
def test_every_registered_candidate_name_is_known():
    names = _choices.known_names()
    assert {"routed", "mix", "blended", "grouped", "concat", "brgemm", "bmm"} <= names
    assert {"separable", "direct"} <= names and {"torch", "numpy"} <= names


@pytest.mark.parametrize("where", ["directory", "below-a-file", "read-only-fs"])
def test_choice_cache_at_an_unusable_path_warns_and_never_raises(tmp_path, where):
    path = {"directory": str(tmp_path), "below-a-file": os.path.join(_file(tmp_path), "choices.json"),
            "read-only-fs": "/proc/tlkernels-choices.json"}[where]
    _choices._WARNED.clear()
    with pytest.warns(RuntimeWarning, match=r"choice cache .*: cannot be used: .*point TLKERNELS_CHOICE_CACHE at a "
                                            r"writable file path"):
        assert _choices.load(path) == 0
        assert _choices.save(path) is False


@pytest.mark.parametrize("where", ["directory", "below-a-file"])
def test_choice_cache_at_an_unusable_path_exits_cleanly(tmp_path, where):
    """At interpreter exit the process's picks are saved: a path that cannot take them is one warning, no
    traceback, exit code 0."""
    path = str(tmp_path) if where == "directory" else os.path.join(_file(tmp_path), "choices.json")
    code = ("import torch, tlkernels\nfrom tlkernels.ops import knn_search\n"
            "knn_search(torch.rand(3, 8), torch.rand(20, 8), 2)\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TLKERNELS_CHOICE_CACHE": path},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("cannot be used") == 1, r.stderr


def test_selector_keeps_the_source_count_from_a_warm_cache(tmp_path):
    from tlkernels.filters import gabor_bank
    from tlkernels.select import SourceSelector
    g = torch.Generator().manual_seed(0)
    target = torch.utils.data.TensorDataset(torch.rand(6, 1, 16, 16, generator=g))
    source = torch.utils.data.TensorDataset(torch.rand(10, 1, 16, 16, generator=g))
    picks = []
    for _ in range(2):  # the second selector reads every descriptor from the cache
        sel = SourceSelector(gabor_bank(scales=1, orientations=2, size=5, in_channels=1), bins=8, fine_bins=64,
                             cache_dir=str(tmp_path), progress=False)
        sel.fit(target)
        sel.describe(target, "target")
        sel.describe(source, "source")
        assert sel.source_count == 10 and not sel.sharded
        picks.append(sel.select(3))
        sel.set_levels(torch.full((6,), 2))
    assert torch.equal(picks[0], picks[1])


# ----------------------------------------------------------------------------- selfcheck's command line
@pytest.mark.parametrize("where,pattern", [
    ("directory", r"--json .*: '.*' is a directory, expected a file path"),
    ("below-a-file", r"--json .*: '.*a_file' is a file, so nothing can be created below it"),
    ("read-only-fs", r"--json /proc/x/selfcheck.json: directory '/proc' is not writable"),
])
def test_selfcheck_json_path_is_checked_before_the_checks_run(tmp_path, capsys, where, pattern):
    from tlkernels import selfcheck
    path = {"directory": str(tmp_path), "below-a-file": os.path.join(_file(tmp_path), "out.json"),
            "read-only-fs": "/proc/x/selfcheck.json"}[where]
    with pytest.raises(SystemExit) as e:
        selfcheck.main(["--quick", "--device", "cpu", "--json", path])
    out = capsys.readouterr()
    assert e.value.code == 2 and re.search(pattern, out.err), out.err
    assert "max error" not in out.out  # nothing ran


# ----------------------------------------------------------------------------- meta tensors and devices
@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2), dict(padding="same"), dict(dilation=2, padding=2),
                                dict(padding="valid"), dict(groups=2)])
def test_gated_conv2d_on_meta_tensors_propagates_shapes_as_conv2d(kw):
    x = torch.empty(3, 4, 11, 9, device="meta")
    w = torch.empty(6, 4 // kw.get("groups", 1), 3, 3, device="meta")
    for gate in (torch.empty(3, device="meta"), torch.empty(3, 6, device="meta")):
        y = gated_conv2d(x, w, w, gate, **kw)
        want = F.conv2d(x, w, **kw)
        assert y.device.type == "meta" and y.shape == want.shape and y.dtype == want.dtype


def test_gated_conv2d_on_meta_tensors_backward_shapes():
    x = torch.empty(2, 4, 8, 8, device="meta", requires_grad=True)
    wp = torch.empty(5, 4, 3, 3, device="meta")
    wf = torch.empty(5, 4, 3, 3, device="meta", requires_grad=True)
    g = torch.empty(2, 5, device="meta", requires_grad=True)
    y = gated_conv2d(x, wp, wf, g, padding=1)
    gx, gw, gg = torch.autograd.grad(y.sum(), (x, wf, g))
    assert gx.shape == x.shape and gw.shape == wf.shape and gg.shape == g.shape and gx.device.type == "meta"


def test_gated_conv_module_and_cross_entropy_on_meta():
    conv = GatedConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1)).to("meta")
    y = conv(torch.empty(2, 3, 10, 10, device="meta"), torch.empty(2, 8, device="meta"))
    assert y.shape == (2, 8, 10, 10) and y.device.type == "meta"
    loss = cross_entropy(torch.empty(4, 5, device="meta"), torch.empty(4, dtype=torch.long, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"


@pytest.mark.parametrize("moved,pattern", [
    ("weights", r"gated_conv2d: weight_pre must be on device meta \(the device of the first input\), got cpu"),
    ("gate", r"gated_conv2d: gate must be on device meta \(the device of the first input\), got cpu"),
    ("input", r"gated_conv2d: weight_pre must be on device cpu \(the device of the first input\), got meta"),
])
def test_gated_conv2d_device_mix_names_the_devices(moved, pattern):
    def dev(name):
        return "cpu" if name == moved else "meta"
    x = torch.empty(2, 4, 6, 6, device="cpu" if moved == "input" else "meta")
    w = torch.empty(5, 4, 3, 3, device=dev("weights") if moved != "input" else "meta")
    g = torch.empty(2, 5, device=dev("gate") if moved != "input" else "meta")
    with pytest.raises(ValueError, match=pattern):
        gated_conv2d(x, w, w, g)


# ----------------------------------------------------------------------------- estimate_fisher
def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 1, 8, 8, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(n)]


FISHER_ERRORS = [
    ("unknown-name", lambda m: estimate_fisher(m, _batches(), names=["nope"]), ValueError,
     r"estimate_fisher: names \['nope'\] are not parameters of the model \(its parameters: 0.weight, 0.bias"),
    ("name-as-a-string", lambda m: estimate_fisher(m, _batches(), names="0.weight"), TypeError,
     r"estimate_fisher: names must be a collection of parameter names \(str\), got '0.weight'"),
    ("name-not-a-string", lambda m: estimate_fisher(m, _batches(), names=[0]), TypeError, r"names must be a collection"),
    ("frozen-name", lambda m: (m[0].weight.requires_grad_(False), estimate_fisher(m, _batches(), names=["0.weight"])),
     ValueError, r"estimate_fisher: names \['0.weight'\] are frozen \(requires_grad=False\)"),
    ("max-samples-zero", lambda m: estimate_fisher(m, _batches(), max_samples=0), ValueError,
     r"estimate_fisher: max_samples must be an int >= 1 or None \(every sample\), got 0"),
    ("max-samples-float", lambda m: estimate_fisher(m, _batches(), max_samples=2.5), ValueError, r"max_samples must be"),
    ("max-samples-bool", lambda m: estimate_fisher(m, _batches(), max_samples=True), ValueError, r"max_samples must be"),
    ("no-batches", lambda m: estimate_fisher(m, []), ValueError, r"estimate_fisher: the batches held no sample"),
    ("tensor-batches", lambda m: estimate_fisher(m, [torch.rand(2, 1, 8, 8)]), TypeError,
     r"estimate_fisher: batches must yield \(images, labels\) pairs, got Tensor"),
    ("triple-batches", lambda m: estimate_fisher(m, [(1, 2, 3)]), TypeError, r"pairs, got tuple of 3"),
    ("not-a-module", lambda m: estimate_fisher(lambda x: x, _batches()), TypeError,
     r"estimate_fisher: model must be a torch.nn.Module, got function"),
    ("all-frozen", lambda m: estimate_fisher(m.requires_grad_(False), _batches()), ValueError,
     r"estimate_fisher: the model has no trainable parameter"),
]


@pytest.mark.parametrize("fn,exc,pattern", [pytest.param(f, e, p, id=i) for i, f, e, p in FISHER_ERRORS])
def test_estimate_fisher_bad_input(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(_tiny_classifier())


def test_estimate_fisher_max_samples_stops_reading():
    read = []

    def batches():
        for b in _batches(5):
            read.append(1)
            yield b
    m = _tiny_classifier()
    f = estimate_fisher(m, batches(), names=["4.weight"], max_samples=3)
    assert list(f) == ["4.weight"] and len(read) == 1
    x, y = _batches(1)[0]
    want = torch.zeros_like(m[4].weight, dtype=torch.float64)
    for i in range(3):
        m.zero_grad()
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        want += m[4].weight.grad.double() ** 2
    torch.testing.assert_close(f["4.weight"].double(), want / 3)


# ----------------------------------------------------------------------------- the wrappers on non-ResNet models
@pytest.mark.parametrize("arch", ["vgg11", "squeezenet1_0", "alexnet", "densenet121"])
def test_spottune_on_a_model_without_residual_blocks_names_what_it_needs(arch):
    from tlkernels.methods import SpotTune
    model = torchvision.models.get_model(arch, num_classes=3)
    with pytest.raises(ValueError, match=r"SpotTune: found no residual blocks in \w+; expected torchvision "
                                         r"or timm residual blocks \(ResNet, inverted residual / MBConv, ConvNeXt, "
                                         r"RegNet: methods._blocks.BLOCK_CLASSES\)"):
        SpotTune(model)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "vgg11_bn"])
def test_adafilter_equals_the_original_at_init_on_non_resnet_models(arch):
    from tlkernels.methods import AdaFilter
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=4).double().eval()
    for m in model.modules():  # non-trivial BN statistics, so that folding them is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        net = AdaFilter(model).double().eval()
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device,pattern", [
    ("tpu", r"tlkernels.selfcheck: --device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda:x", r"tlkernels.selfcheck: --device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("meta", r"tlkernels.selfcheck: --device must be auto, cpu, cuda or cuda:N, got 'meta'"),
])
def test_selfcheck_bad_device(device, pattern):
    from tlkernels import selfcheck
    with pytest.raises(SystemExit, match=pattern):
        selfcheck.main(["--quick", "--device", device])


# ----------------------------------------------------------------------------- L2-SP-Fisher
def _l2sp():
    from tlkernels.nn import L2SP
    torch.manual_seed(0)
    return L2SP(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), alpha=0.1, beta=0.01, head="1")


L2SP_ERRORS = [
    ("alpha-nan", lambda: _l2sp().__class__(nn.Linear(2, 2), alpha=float("nan")), ValueError,
     r"L2SP: alpha and beta must be finite and >= 0, got alpha=nan"),
    ("beta-inf", lambda: _l2sp().__class__(nn.Linear(2, 2), beta=float("inf")), ValueError,
     r"L2SP: alpha and beta must be finite and >= 0, got alpha=0.1, beta=inf"),
    ("alpha-string", lambda: _l2sp().__class__(nn.Linear(2, 2), alpha="0.1"), TypeError,
     r"L2SP: alpha must be a number, got str"),
    ("fisher-int", lambda: _l2sp().set_fisher({"0.weight": torch.ones(4, 3, dtype=torch.long)}), TypeError,
     r"L2SP: fisher\['0.weight'\] must be a floating-point tensor \(a Fisher diagonal\), got torch.int64"),
    ("fisher-bool", lambda: _l2sp().set_fisher({"0.weight": torch.ones(4, 3, dtype=torch.bool)}), TypeError,
     r"must be a floating-point tensor"),
    ("fisher-complex", lambda: _l2sp().set_fisher({"0.weight": torch.ones(4, 3, dtype=torch.complex64)}), TypeError,
     r"must be a floating-point tensor .*got torch.complex64"),
    ("fisher-meta", lambda: _l2sp().set_fisher({"0.weight": torch.ones(4, 3, device="meta")}), ValueError,
     r"L2SP: fisher\['0.weight'\] is a meta tensor \(no values\); expected it on cpu"),
    ("fisher-negative", lambda: _l2sp().set_fisher({"0.weight": -torch.ones(4, 3)}), ValueError,
     r"must hold finite values >= 0"),
    ("fisher-head", lambda: _l2sp().set_fisher({"1.weight": torch.ones(2, 4)}), ValueError,
     r"L2SP: fisher\['1.weight'\]: not a tensor this penalty pulls toward its start"),
]


@pytest.mark.parametrize("fn,exc,pattern", [pytest.param(f, e, p, id=i) for i, f, e, p in L2SP_ERRORS])
def test_l2sp_fisher_bad_input(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_l2sp_fisher_weighs_the_pull_toward_the_start():
    from tlkernels.nn import L2SP
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reg = L2SP(model, alpha=0.1, beta=0.01, head="1")
    with torch.no_grad():
        model[0].weight.add_(0.5)
    plain = float(reg.value())
    reg.set_fisher({"0.weight": torch.full((4, 3), 3.0)})
    assert float(reg.value()) - plain == pytest.approx(0.1 / 2 * 12 * 0.25 * (3.0 - 1.0), rel=1e-5)
