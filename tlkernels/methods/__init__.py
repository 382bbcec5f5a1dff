"""Adaptive fine-tuning methods as drop-in model wrappers."""
from tlkernels.methods.adafilter import AdaFilter
from tlkernels.methods.spottune import OfficialPolicyNet, PolicyNet, SpotTune

__all__ = ["AdaFilter", "SpotTune", "OfficialPolicyNet", "PolicyNet"]
