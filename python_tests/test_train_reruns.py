"""The trainer run again: every method interrupted, resumed and run a second time on warm caches; checkpoints of
another method; losses that turn non-finite; batches of one image; image sizes that cannot fit; unreadable
images in every split; the exported programs fed what they do not accept."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tlkernels._io import CheckpointError
from tlkernels.train import loop
from tlkernels.train.export import load_program

from conftest import gloo_ranks  # noqa: E402
from test_train import FAST  # noqa: E402  (the demo's few-step options)
from test_train_real import checkpoint, write_folder  # noqa: E402,F401  (checkpoint: the fixture)

EVERY_METHOD = "finetune,l2sp,soft,selective,adafilter,spottune,spottune_global"
REAL = ["--epochs", "2", "--eval_every", "1", "--batch_size", "8", "--image_size", "32", "--quiet", "--threads", "2",
        "--no-export"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def demo(out, cache, *args):
    return loop.main(["--out_dir", str(out), "--cache_dir", cache, *FAST, *args])


def real(out, folder, checkpoint, *args):
    return loop.main(["--target", str(folder), "--checkpoint", checkpoint, "--out_dir", str(out), *REAL, *args])


def losses(result, m):
    return [h.get("loss") for h in result[m][0][1]]


def test_every_method_interrupted_resumed_and_run_again_on_warm_caches(tmp_path, cache):
    """One cold-cache run interrupted after a step, resumed, then the same run again on the warm caches (the
    pre-trained model, descriptors, measured choices): every method finishes, and the rerun computes exactly
    what the resumed run did."""
    first = demo(tmp_path, cache, "--compare", EVERY_METHOD, "--stop_after", "1", "--eval_every", "2")
    assert all(first[m][0][0]["status"] == "interrupted" for m in EVERY_METHOD.split(","))
    resumed = demo(tmp_path, cache, "--compare", EVERY_METHOD, "--resume", "--eval_every", "2")
    again = demo(tmp_path, cache, "--compare", EVERY_METHOD, "--eval_every", "2")
    for m in EVERY_METHOD.split(","):
        assert resumed[m][0][0]["status"] == again[m][0][0]["status"] == "done", m
        assert losses(resumed, m) == losses(again, m), m
        assert resumed[m][0][0]["final_val_acc"] == again[m][0][0]["final_val_acc"], m
    assert os.path.exists(os.path.join(cache, "selective-gabor-seed0", "descriptors-source", "manifest.json"))


def test_resume_with_another_methods_checkpoint_is_refused(tmp_path, cache):
    demo(tmp_path, cache, "--method", "finetune", "--stop_after", "1")
    os.makedirs(tmp_path / "l2sp")
    os.replace(tmp_path / "finetune" / "last.pt", tmp_path / "l2sp" / "last.pt")
    with pytest.raises(SystemExit, match=r"--resume: .*l2sp/last.pt is a checkpoint of method 'finetune', and this "
                                         r"run trains 'l2sp'; resume it with --method finetune"):
        demo(tmp_path, cache, "--method", "l2sp", "--resume")


def test_checkpoint_that_records_no_method_is_refused(tmp_path, cache):
    demo(tmp_path, cache, "--method", "finetune", "--stop_after", "1")
    path = tmp_path / "finetune" / "last.pt"
    ck = torch.load(path, weights_only=True)
    del ck["method"]
    torch.save(ck, path)
    with pytest.raises(SystemExit, match=r"is not a tlkernels training checkpoint \(expected the keys .*'method'"):
        demo(tmp_path, cache, "--method", "finetune", "--resume")


@pytest.mark.parametrize("method", ["finetune", "adafilter"])
def test_a_loss_that_turns_non_finite_stops_the_run(tmp_path, cache, method):
    with pytest.raises(SystemExit, match=rf"tlkernels-train: {method}: non-finite loss at step \d+ \(epoch \d+\): "
                                         r".*= (nan|inf).*try a lower --lr"):
        demo(tmp_path, cache, "--method", method, "--lr", "1e30", "--momentum", "0")
    assert not (tmp_path / method / "summary.json").exists()  # the run did not end "done"


def test_balanced_class_weights_with_one_image_in_a_class_never_ends_with_a_nan(tmp_path, checkpoint):
    """One image in one class, five in the other, balanced class weights and a tiny image size: this run
    diverges (its validation loss is NaN from the first evaluation on). It must stop naming that, not end "done"
    with NaN in metrics.jsonl."""
    root = write_folder(str(tmp_path / "t"), per_class=5, classes=2, extra_modes=False)
    for f in sorted(os.listdir(os.path.join(root, "train", "class0")))[1:]:
        os.remove(os.path.join(root, "train", "class0", f))
    args = ["--class_weights", "balanced", "--image_size", "16", "--epochs", "4", "--batch_size", "4"]
    with pytest.raises(SystemExit, match=r"finetune: non-finite loss at step 2 \(epoch 0\): val_loss = nan"):
        real(tmp_path / "o", root, checkpoint, *args)


def test_a_last_batch_of_one_image_at_a_small_size_is_dropped(tmp_path, checkpoint):
    root = write_folder(str(tmp_path / "t"), per_class=3, classes=3, extra_modes=False)  # 9 images, batches of 8
    res = real(tmp_path / "o", root, checkpoint, "--image_size", "16")
    summary, history = res["finetune"][0]
    assert summary["status"] == "done" and summary["steps"] == 2  # one batch of 8 per epoch; the 9th image waits


def test_a_training_set_of_one_image_says_why_it_cannot_train(tmp_path, checkpoint):
    root = write_folder(str(tmp_path / "t"), per_class=1, classes=1, extra_modes=False)
    with pytest.raises(SystemExit, match=r"finetune: step 1 has a batch of one image, and BatchNorm in training mode "
                                         r"cannot normalise one image .*use a larger --batch_size, more training "
                                         r"images or a larger --image_size"):
        real(tmp_path / "o", root, checkpoint, "--image_size", "16")


@pytest.mark.parametrize("size,batch", [("100000", "32"), ("30000", "64")])
def test_an_image_size_that_cannot_fit_is_refused_before_allocating(tmp_path, checkpoint, size, batch):
    root = write_folder(str(tmp_path / "t"), per_class=2, classes=2, extra_modes=False)
    with pytest.raises(SystemExit, match=rf"--image_size {size} with --batch_size {batch}: one training batch needs "
                                         r"more than [\d.]+ GiB .* and cpu has [\d.]+ GiB; use a smaller --image_size"):
        real(tmp_path / "o", root, checkpoint, "--image_size", size, "--batch_size", batch)


def _break(path):
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)


def test_skip_bad_images_counts_validation_files_and_warns_of_an_emptied_class(tmp_path, checkpoint):
    root = write_folder(str(tmp_path / "t"), per_class=4, classes=3, extra_modes=False)  # batches of 8 and 4
    for f in os.listdir(os.path.join(root, "train", "class2")):
        _break(os.path.join(root, "train", "class2", f))
    _break(os.path.join(root, "val", "class1", "0.png"))
    with pytest.warns(UserWarning, match=r"every training image of class\(es\) 'class2' is unreadable \(skipped by "
                                         r"--skip_bad_images\): the model learns nothing of them"):
        res = real(tmp_path / "o", root, checkpoint, "--skip_bad_images")
    summary, history = res["finetune"][0]
    assert summary["status"] == "done" and summary["val_skipped_images"] == 1
    assert all(h["val_skipped_images"] == 1 for h in history if "val_acc" in h)
    assert summary["skipped_images"] == 4 * 2  # four unreadable training files in each of two epochs


def test_no_readable_validation_image_is_an_error(tmp_path, checkpoint):
    root = write_folder(str(tmp_path / "t"), per_class=2, classes=2, extra_modes=False)
    for c in ("class0", "class1"):
        for f in os.listdir(os.path.join(root, "val", c)):
            _break(os.path.join(root, "val", c, f))
    with pytest.raises(SystemExit, match=r"no validation image could be read \(4 unreadable, skipped by "
                                         r"--skip_bad_images\)"):
        real(tmp_path / "o", root, checkpoint, "--skip_bad_images")


# ----------------------------------------------------------------------------- exported programs
@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint):
    """model.pt2 of finetune at 48 px (a final feature map of 2 x 2: sizes may vary) and of AdaFilter at 32 px."""
    out = tmp_path_factory.mktemp("exports")
    root = write_folder(str(out / "t"), per_class=3, classes=3, extra_modes=False)
    real(out / "f", root, checkpoint, "--export", "--epochs", "1", "--image_size", "48")
    real(out / "a", root, checkpoint, "--export", "--epochs", "1", "--method", "adafilter")
    return out


def test_exported_program_accepts_other_image_sizes(exported):
    info = json.loads((exported / "f" / "finetune" / "summary.json").read_text())["export"]
    assert info["sizes"]["height"][0] == 33 and info["sizes"]["width"][0] == 33  # global pooling of > 1 x 1 maps
    model = load_program(str(exported / "f" / "finetune" / "model.pt2"))
    g = torch.Generator().manual_seed(0)
    for h, w in ((48, 48), (40, 64), (97, 33)):
        x = torch.randn(2, 3, h, w, generator=g)
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("x,pattern", [
    (torch.randn(2, 3, 32, 32), r"accepts images of 3 channels, height >= 33 and width >= 33 .*got shape "
                                r"\(2, 3, 32, 32\)"),
    (torch.randn(2, 1, 48, 48), r"accepts images of 3 channels, .*got shape \(2, 1, 48, 48\)"),
    (torch.randn(3, 48, 48), r"expects a batch of images \(N, C, H, W\), got 3-D shape \(3, 48, 48\)"),
    (torch.randn(2, 3, 48, 48, dtype=torch.float64), r"expects float32 images, got torch.float64"),
    ([1, 2], r"expects a batch of images \(N, C, H, W\), got list"),
])
def test_exported_program_names_what_it_accepts(exported, x, pattern):
    model = load_program(str(exported / "f" / "finetune" / "model.pt2"))
    with pytest.raises(ValueError, match=r"model.pt2 .*model.pt2: " + pattern):
        model(x)


def test_adafilter_program_at_a_fixed_size_says_so(exported):
    info = json.loads((exported / "a" / "adafilter" / "summary.json").read_text())["export"]
    model = load_program(str(exported / "a" / "adafilter" / "model.pt2"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    lo, hi = info["sizes"]["height"]
    with pytest.raises(ValueError, match=rf"height ({lo}|{lo} to {hi}) and width"):
        model(torch.randn(1, 3, (hi or 200) + 1, 32))


def test_adafilter_program_loads_in_a_fresh_process(exported, tmp_path):
    """The program calls the tlkernels ops: load_program registers them first (a fresh process that imported
    nothing else), and its outputs equal this process's."""
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    path = str(exported / "a" / "adafilter" / "model.pt2")
    code = ("import sys, torch\nfrom tlkernels.train.export import load_program\n"
            "m = load_program(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True)\n"
            "torch.save(m(x).detach(), sys.argv[3])")
    r = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), load_program(path)(x))


@pytest.mark.parametrize("content,pattern", [
    (None, r"model.pt2 .*missing.pt2: no such file"),
    (b"garbage", r"model.pt2 .*bad.pt2 cannot be loaded as a torch.export program"),
])
def test_load_program_of_a_missing_or_garbage_file(tmp_path, content, pattern):
    path = tmp_path / ("missing.pt2" if content is None else "bad.pt2")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern):
        load_program(str(path))


def test_load_program_of_a_program_written_elsewhere(tmp_path):
    prog = torch.export.export(torch.nn.Linear(3, 2).eval(), (torch.randn(1, 3),))
    torch.export.save(prog, str(tmp_path / "other.pt2"))
    with pytest.raises(CheckpointError, match=r"holds no tlkernels input contract \(tlkernels.json\); it was not "
                                              r"written by the tlkernels trainer"):
        load_program(str(tmp_path / "other.pt2"))


def test_sixteen_bit_pngs_train_with_their_full_range(tmp_path, checkpoint):
    """A folder of 16-bit grayscale PNGs: the batches span the images' range (no 8-bit clipping to white)."""
    import numpy as np
    from tlkernels.train import data, parse_args
    root = tmp_path / "t"
    for part in ("train", "val"):
        for c in range(2):
            os.makedirs(root / part / f"c{c}")
            for k in range(3):
                a = (np.linspace(0, 1, 40 * 40).reshape(40, 40) * (20000 + 20000 * c + 3000 * k)).astype(np.uint16)
                Image.fromarray(a).save(root / part / f"c{c}" / f"{k}.png")
    cfg = parse_args(["--target", str(root), "--checkpoint", checkpoint, "--image_size", "32", "--mean", "0,0,0",
                      "--std", "1,1,1", "--out_dir", str(tmp_path / "o")])
    target, _ = data.load_data(cfg, 0)
    x, _ = data.take(target.val, list(range(6)))
    assert float(x.max()) < 0.95 and float(x.mean()) < 0.5  # (clipping made nearly every pixel 1.0)
    res = real(tmp_path / "o", str(root), checkpoint)
    assert res["finetune"][0][0]["status"] == "done"


# ----------------------------------------------------------------------------- RNG states in last.pt
def test_checkpoint_rng_holds_the_gpu_generator_and_restores_it_on_its_device(monkeypatch):
    """A GPU run's last.pt keeps the GPU generator's state (SpotTune's Gumbel noise draws from it) and --resume
    sets it on the run's device (no GPU here: torch.cuda's get/set are recorded)."""
    got = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.tensor([7, 8], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: got.update(state=s.tolist(), device=device))
    dev = torch.device("cuda", 0)
    torch.manual_seed(5)
    state = loop.rng_states(dev, 1)
    a = torch.rand(3)
    assert [s.tolist() for s in state["cuda"]] == [[7, 8]] and len(state["cpu"]) == 1
    loop.restore_rng(state, dev, 0)
    assert torch.equal(torch.rand(3), a) and got == {"state": [7, 8], "device": dev}
    with pytest.raises(ValueError, match="RNG states of 1 process"):
        loop.restore_rng(state, dev, 1)
    loop.restore_rng(state["cpu"][0], torch.device("cpu"), 0)  # a checkpoint of one CPU process: a bare tensor
    assert torch.equal(torch.rand(3), a)


def _rng_worker(rank, world, out):
    torch.manual_seed(100 + rank)  # each process its own stream
    state = loop.rng_states(torch.device("cpu"), world)
    first = torch.rand(4)
    torch.rand(10)  # the run goes on
    loop.restore_rng(state, torch.device("cpu"), rank)
    torch.save({"state": state, "first": first, "again": torch.rand(4)}, f"{out}.{rank}")


def test_every_rank_gets_its_own_rng_state_back(tmp_path):
    gloo_ranks(_rng_worker, 2, str(tmp_path / "init"), str(tmp_path / "out"))
    r = [torch.load(tmp_path / f"out.{k}", weights_only=True) for k in range(2)]
    assert all(torch.equal(x["first"], x["again"]) for x in r)
    assert not torch.equal(r[0]["first"], r[1]["first"])
    assert torch.equal(r[0]["state"]["cpu"][1], r[1]["state"]["cpu"][1])  # both ranks hold both states


def test_deterministic_option_sets_the_deterministic_algorithms(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        demo(tmp_path, cache, "--method", "finetune", "--stop_after", "1", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(was)
