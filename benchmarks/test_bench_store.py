"""The descriptor store: the streamed exact search from a store on disk against the same search with the decoded
matrix in memory and against faiss-cpu's exact index; description throughput (images/s) of the demo's images
and of JPEG files, with 0 and 2 DataLoader workers, store writes included.

Run: python -m pytest benchmarks/test_bench_store.py --benchmark-json=.benchmarks/store.json
The ImageNet-scale case (1,281,167 source rows on disk, peak RSS and the disk/GEMM bound):
     python benchmarks/imagenet_scale_search.py --dir DIR
(faiss-cpu is a benchmark-only dependency: pip install -r requirements-bench.txt)
"""
import os
import shutil

import pytest
import torch

from conftest import faiss_skl_vectors, run
from imagenet_scale_search import BINS, STAGES, channel_weights, stage_columns, synthetic_rows
from tlkernels import store
from tlkernels.ops.knn import EPS, chunk_rows, knn_search

ROWS, Q, K, MEMORY_GB = 40000, 200, 50, 0.25
DIMS = sum(c for c, _ in STAGES) * BINS


@pytest.fixture(scope="module")
def source_store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    st = store.DescriptorStore(root, {"synthetic": "bench"}, ROWS, stage_columns(), shard_rows=8192)
    st.prepare()
    for i in range(st.shards):
        a, b = st.shard_range(i)
        st.write_shard(i, *synthetic_rows(i, b - a, 0.5))
    st.finish()
    counts, pixels = synthetic_rows(10**6, Q, 0.5)
    return st.descriptors(), store.in_memory(counts, pixels, stage_columns()).tensor(torch.float64)


@pytest.mark.parametrize("provider", ["in_memory", "streamed", "faiss"])
def test_store_search(benchmark, source_store, provider, device):
    if device != "cpu":
        pytest.skip("the store benchmark times the host search (the GPU's staging is in imagenet_scale_search)")
    d, q = source_store
    w = channel_weights()
    benchmark.group = f"knn skl {Q} queries x {ROWS} stored rows x {DIMS} dims, k={K}"
    benchmark.extra_info.update(provider=provider, baseline="in_memory")
    if provider == "in_memory":  # the decoded float64 matrix held whole (what a search of an in-memory list does)
        full = d.tensor(torch.float64)

        def fn():
            return knn_search(q, full, K, "skl", w, EPS)
    elif provider == "streamed":  # counts read from the shards chunk by chunk within MEMORY_GB
        size = chunk_rows(MEMORY_GB, DIMS, Q)
        benchmark.extra_info["chunk_rows"] = size

        def fn():
            return knn_search(q, d, K, "skl", w, EPS, chunk_size=size)
    else:  # exact inner-product index on the expanded float32 vectors (the skl ranking), added outside the timer
        faiss = pytest.importorskip("faiss")
        xq, xb = faiss_skl_vectors(q, d.tensor(torch.float64), w.repeat_interleave(BINS), EPS)
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)

        def fn():
            return index.search(xq, K)
    run(benchmark, fn, rounds=3)


def _jpeg_folder(root, n, size=256):
    """n JPEG files of smooth random colour images (upsampled noise: a natural image's spectrum, roughly)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    os.makedirs(os.path.join(root, "a"), exist_ok=True)
    for i in range(n):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=size, mode="bicubic")
        x = (x[0] * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(x).save(os.path.join(root, "a", f"{i:05d}.jpg"), quality=90)
    return root


def _dataset(kind, tmp):
    if kind == "demo":  # the trainer demo's embedded source images (MNIST 32x32, in memory)
        from tlkernels.train.data import demo_source
        return demo_source().train, 1, 32
    from tlkernels.train.data import ImageFolderSet, eval_transform
    root = _jpeg_folder(os.path.join(tmp, "jpeg"), 512)
    return ImageFolderSet(root, eval_transform(224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])), 3, 224


@pytest.mark.parametrize("kind", ["demo", "jpeg"])
@pytest.mark.parametrize("workers", [0, 2])
def test_describe_throughput(benchmark, tmp_path, kind, workers, device):
    import torchvision
    from tlkernels.filters import from_model
    from tlkernels.select import SourceSelector
    ds, channels, size = _dataset(kind, str(tmp_path))
    model = torchvision.models.resnet18()
    if channels == 1:
        model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    cache = str(tmp_path / "cache")
    sel = SourceSelector(from_model(model), bins=32, fine_bins=512, batch_size=64, cache_dir=cache, progress=False,
                         num_workers=workers, device=device)
    sel.fit(torch.utils.data.Subset(ds, range(128)))
    n = len(ds)
    benchmark.group = f"describe {n} {'demo (MNIST 32x32, memory)' if kind == 'demo' else 'JPEG 256px -> 224'} images, " \
                      f"ResNet conv1 + layer1 bank, 32 bins"
    benchmark.extra_info.update(provider=f"workers={workers}", baseline="workers=0")

    def fn():
        shutil.rmtree(cache, ignore_errors=True)  # described from scratch each round, store writes included
        sel.describe(ds, "source")
    run(benchmark, fn, rounds=2)
    if benchmark.stats is not None:  # (None under --benchmark-disable)
        benchmark.extra_info["images/s"] = round(n / benchmark.stats.stats.median, 1)
