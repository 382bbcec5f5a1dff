"""Adaptive fine-tuning methods as drop-in model wrappers."""
from tlkernels.methods.adafilter import AdaFilter
from tlkernels.methods.spottune import PolicyNet, SpotTune

__all__ = ["AdaFilter", "SpotTune", "PolicyNet"]
