"""Any torchvision or timm CNN as the pre-trained backbone: the classifier found through the model's own
description, preprocessing from its metadata, weights from .pt/.pth/.safetensors files with or without the
classifier, and each method trained a few steps and exported on timm and torchvision families (weights saved by
the test: no download)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from tlkernels.train import backbones, loop

from conftest import like_pretrained_bns  # noqa: E402
from test_train_real import write_folder  # noqa: E402  (real PNG files, 3 classes)

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402  (timm's weight format; installed with timm)

FAST = ["--epochs", "1", "--eval_every", "1", "--batch_size", "6", "--image_size", "32", "--quiet", "--threads", "2",
        "--selective_k", "4", "--selective_bins", "8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("imgs")), per_class=6, extra_modes=False)


def weights(tmp_path_factory, arch, fmt="safetensors", drop_classifier=False):
    """The state_dict of an initialised --arch model in a file (stands in for pre-trained weights)."""
    torch.manual_seed(0)
    model = backbones.create(arch, pretrained=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if drop_classifier:
        head = backbones.classifier_name(model) + "."
        sd = {k: v for k, v in sd.items() if not k.startswith(head)}
    path = str(tmp_path_factory.mktemp("w") / f"{arch.replace('/', '_')}.{fmt}")
    save_file(sd, path) if fmt == "safetensors" else torch.save(sd, path)
    return path


# ----------------------------------------------------------------------------- classifier and preprocessing
@pytest.mark.parametrize("arch,name,features", [
    ("resnet18", "fc", 512), ("convnext_tiny", "classifier.2", 768), ("efficientnet_b0", "classifier.1", 1280),
    ("mobilenet_v3_small", "classifier.3", 1024), ("densenet121", "classifier", 1024), ("regnet_y_400mf", "fc", 440),
    ("vgg11_bn", "classifier.6", 4096), ("shufflenet_v2_x0_5", "fc", 1024), ("mnasnet0_5", "classifier.1", 1280),
    ("googlenet", "fc", 1024),
    ("timm/resnet50d", "fc", 2048), ("timm/convnext_atto", "head.fc", 320), ("timm/efficientnet_b0", "classifier", 1280),
    ("timm/mobilenetv3_small_050", "classifier", 1024), ("timm:regnety_002", "head.fc", 368),
])
def test_the_classifier_is_found_and_the_trunk_returns_its_features(arch, name, features):
    model = backbones.create(arch, pretrained=False).eval()
    assert backbones.classifier_name(model) == name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        trunk, fc, got = backbones.split_classifier(model)
        f = trunk(x)
    assert got == name and f.shape == (2, features) and isinstance(fc, nn.Linear)
    torch.testing.assert_close(fc(f), full)  # trunk + classifier = the original model


def test_a_model_without_a_linear_classifier_is_refused_clearly():
    model = backbones.create("squeezenet1_0", pretrained=False)
    with pytest.raises(ValueError, match="SqueezeNet: no linear classifier found"):
        backbones.classifier_name(model)


def test_preprocessing_and_classes_come_from_the_weights_metadata():
    t = backbones.preprocessing("timm/convnext_tiny")
    assert t.interpolation == "bicubic" and t.crop_pct == pytest.approx(0.95) and t.mean == (0.485, 0.456, 0.406)
    v = backbones.preprocessing("efficientnet_b0")  # torchvision: resize 256, crop 224, bicubic
    assert v.interpolation == "bicubic" and v.crop_pct == pytest.approx(224 / 256)
    assert backbones.preprocessing("resnet18").interpolation == "bilinear"
    tv, tm = backbones.pretrained_classes("resnet18"), backbones.pretrained_classes("timm/resnet50d")
    # (timm's: the WordNet ids, the folder names of an ImageNet-1k --source: its classifier is then reused)
    assert len(tv) == len(tm) == 1000 and tv[0] == "tench" and tm[0] == "n01440764"


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth"])
@pytest.mark.parametrize("drop", [False, True])
def test_checkpoints_with_or_without_the_classifier(tmp_path_factory, fmt, drop):
    path = weights(tmp_path_factory, "timm/convnext_atto", fmt, drop_classifier=drop)
    model = backbones.create("timm/convnext_atto", pretrained=False)
    missing = backbones.load_checkpoint(model, path)
    assert missing == (["head.fc.weight", "head.fc.bias"] if drop else [])
    torch.manual_seed(0)
    ref = backbones.create("timm/convnext_atto", pretrained=False)
    for k, v in ref.state_dict().items():
        if not (drop and k.startswith("head.fc.")):
            assert torch.equal(model.state_dict()[k], v), k


def test_a_checkpoint_of_another_arch_or_not_a_state_dict_is_refused(tmp_path_factory, tmp_path):
    path = weights(tmp_path_factory, "timm/resnet18")
    with pytest.raises(SystemExit, match=r"--checkpoint .* is not a state_dict of this model \(ConvNeXt\): missing"):
        backbones.load_checkpoint(backbones.create("timm/convnext_atto", pretrained=False), path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match=r"--checkpoint .*bad.safetensors: cannot read it"):
        backbones.load_checkpoint(backbones.create("timm/convnext_atto", pretrained=False), str(bad))
    with pytest.raises(SystemExit, match="no such file"):
        backbones.load_checkpoint(backbones.create("resnet18", pretrained=False), str(tmp_path / "none.safetensors"))


def test_a_classifier_over_other_classes_loads_with_its_shape(tmp_path):
    m = backbones.create("resnet18", pretrained=False)
    m.fc = nn.Linear(512, 7)
    path = str(tmp_path / "ft.pth")
    torch.save({"model": m.state_dict()}, path)  # (a training checkpoint's wrapper)
    model = backbones.create("resnet18", pretrained=False)
    assert backbones.load_checkpoint(model, path) == [] and model.fc.out_features == 7


# ----------------------------------------------------------------------------- the trainer
FAMILIES = {  # arch: the methods trained on it (every method on a ResNet-D; on the other families the ones whose
    # model depends on the backbone's structure: the wrappers, L2-SP's penalised tensors, plain.pt's classifier)
    "timm/resnet18d": "finetune,l2sp,soft,selective,adafilter,spottune",
    "timm/convnext_atto": "adafilter,spottune",
    "timm/efficientnet_b0": "finetune,l2sp",
    "efficientnet_b0": "spottune",  # (torchvision's MBConv blocks)
    "timm/mobilenetv3_small_050": "adafilter,spottune_global",
}
if os.environ.get("TLKERNELS_TEST_ALL_FAMILIES") == "1":  # every method on every family (slower; CI trains the set above)
    FAMILIES = {arch: "finetune,l2sp,soft,selective,adafilter,spottune,spottune_global" for arch in FAMILIES}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_methods_train_and_export_on_timm_and_torchvision_families(settings, tmp_path, tmp_path_factory, folder, arch,
                                                                  monkeypatch):
    settings(gated_conv="heuristic")  # (no strategy timing for every conv shape)
    ck = weights(tmp_path_factory, arch)
    source = write_folder(str(tmp_path / "src"), per_class=6, extra_modes=False)
    res = loop.main(["--target", folder, "--source", source, "--arch", arch, "--checkpoint", ck,
                     "--out_dir", str(tmp_path / "run"), "--compare", FAMILIES[arch], *FAST])
    for m in FAMILIES[arch].split(","):
        summary = res[m][0][0]
        assert summary["status"] == "done" and summary["final_val_acc"] is not None, (m, summary)
        assert "model.pt2" in str(summary.get("export")), (m, summary)
        assert summary["export"]["max_abs_diff"] < 1e-3, (m, summary["export"])  # the program computes the model
    if "finetune" in FAMILIES[arch]:  # plain.pt loads into the unmodified architecture, classifier = target head
        code = ("import sys, torch; from tlkernels.train import backbones; "
                "m = backbones.create(sys.argv[1], pretrained=False); "
                "name = backbones.classifier_name(m); fc = m.get_submodule(name); "
                "backbones._replace(m, name, torch.nn.Linear(fc.in_features, 3)); "
                "m.load_state_dict(torch.load(sys.argv[2], weights_only=True)); print('ok')")
        r = subprocess.run([sys.executable, "-c", code, arch, str(tmp_path / "run" / "finetune" / "plain.pt")],
                           capture_output=True, text=True, timeout=300)
        assert r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("method", ["spottune", "adafilter"])
def test_programs_of_timm_bn_act_models_compute_the_model(method):
    """timm's BatchNormAct2d (batch norm, then activation, in one module; inside the routed blocks of SpotTune):
    the export splits it, folds the batch norm where a convolution precedes it and keeps the activation, so the
    program (routing included) computes the eager eval's outputs."""
    from tlkernels.methods import AdaFilter, SpotTune
    from tlkernels.train.export import export_program, fold_batchnorm
    torch.manual_seed(0)
    b = like_pretrained_bns(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5), affine=False)
    assert any(type(m).__name__ == "BatchNormAct2d" for m in b.modules())
    model = (SpotTune(b) if method == "spottune" else AdaFilter(b, hidden_size=16)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        got = export_program(folded, x).module()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _timm_with_bn_stats(arch):
    torch.manual_seed(0)
    return like_pretrained_bns(timm.create_model(arch, pretrained=False, num_classes=5))


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "regnetx_002"])
def test_adafilter_gates_the_batch_norm_of_timm_bn_act_layers(arch):
    """timm's BatchNormAct2d behind a conv (every one in these models) becomes the layer's gated BN pair, its
    activation stays in its place: at initialisation the wrapped model computes the backbone, in eval (fused and
    the papers' way) and in training mode (batch statistics)."""
    import copy
    from tlkernels.methods import AdaFilter
    from tlkernels.methods._blocks import is_bn_act
    b = _timm_with_bn_stats(arch)
    n_bn_act = sum(is_bn_act(m) for m in b.modules())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want_eval = b.eval()(x)
        want_train = copy.deepcopy(b).train()(x)
    model = AdaFilter(b, hidden_size=16)
    assert n_bn_act > 0 and sum(l.bn_ft is not None for _, l in model.layers) == n_bn_act
    assert not any(is_bn_act(m) for m in model.modules())
    assert all(type(l.bn_ft) is nn.BatchNorm2d for _, l in model.layers if l.bn_ft is not None)
    with torch.no_grad():
        model.controller.heads[0].bias.fill_(-1.0)  # (mixed gates: both branches used)
        for fused in (True, False):
            torch.testing.assert_close(model.set_fused(fused).eval()(x), want_eval, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.set_fused(True).train()(x), want_train, rtol=1e-4, atol=1e-4)


def test_spottune_routed_eval_folds_the_batch_norm_of_timm_bn_act_layers():
    """The folded copies that SpotTune's routed eval runs have no batch norm left (timm's BatchNormAct2d split,
    its batch norm folded into the conv before it, its activation kept) and compute the blocks' own modules."""
    from tlkernels.methods import SpotTune
    b = _timm_with_bn_stats("mobilenetv3_small_050")
    model = SpotTune(b).eval()
    with torch.no_grad():  # (fine-tuned copies unlike the frozen ones)
        for blk in model.blocks:
            for p in blk.finetuned.parameters():
                p.mul_(1.1)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
    with torch.enable_grad():  # (with autograd on, routing runs the blocks' own modules)
        want = model(x).detach()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    blk = next(blk for blk in model.blocks if any(isinstance(m, nn.BatchNorm2d) for m in blk.finetuned.modules()))
    copies = blk._folded.copies
    assert copies is not None and not any(isinstance(m, nn.BatchNorm2d) for c in copies for m in c.modules())
    assert not any("batch_norm" in str(n.target) for c in copies for n in c.graph.nodes)  # (nor a functional one)
    acts = [type(m) for m in blk.finetuned.modules() if isinstance(m, (nn.ReLU, nn.Hardswish))]
    assert acts and [type(m) for m in copies[0].modules() if isinstance(m, (nn.ReLU, nn.Hardswish))] == acts


def test_spottune_on_a_backbone_without_residual_blocks_says_so(tmp_path, tmp_path_factory, folder):
    ck = weights(tmp_path_factory, "densenet121", "pt")
    with pytest.raises(ValueError, match="SpotTune: found no residual blocks in DenseNet"):
        loop.main(["--target", folder, "--arch", "densenet121", "--checkpoint", ck,
                   "--out_dir", str(tmp_path / "run"), "--method", "spottune", *FAST])
