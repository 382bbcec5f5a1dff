"""tlkernels reference trainer: every method through our kernels, on the embedded demo or real image folders.

    python -m tlkernels.train --compare finetune,l2sp,soft,selective,adafilter,spottune --seeds 0,1   # the demo
    python -m tlkernels.train --method adafilter+l2sp --target data/birds --device cuda --amp bf16
    torchrun --nproc_per_node=4 -m tlkernels.train --method selective --target data/birds --source data/imagenet_subset

`python -m tlkernels.train --help` lists every option (tlkernels/train/config.py) and the methods.
Modules: config (options), data (datasets and the input pipeline), recipes (one per method), loop (training,
checkpoints, comparison), export (model.pt2, plain.pt), plots.
"""
from tlkernels.train.config import METHODS, Config, parse_args  # noqa: F401
from tlkernels.train.loop import main  # noqa: F401
