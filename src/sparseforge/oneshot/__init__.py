"""One-shot pruning: prune a trained model once, without retraining.

- :func:`prune` (``sf.prune``): the one entry point, with or without data:
  any score, pattern and allocation; Wanda and SparseGPT layer by layer on
  calibration data (:mod:`.calibration`'s :class:`~.calibration.Calibrator`);
  dependency groups of channels (:mod:`.channels`). One report type,
  :class:`~sparseforge.report.PruneReport`.
- :func:`prune_calibrated`, :func:`prune_channels`: shorthands for it.
- :class:`MaskLLM`, :func:`train_maskllm`, :func:`prune_maskllm`: learned
  N:M masks (Gumbel-softmax over the candidates), from a one-shot prior.
- :func:`essential_sparsity`: the sparsity one-shot magnitude pruning
  reaches before quality drops.
- :mod:`.sparsegpt` (SparseGPT as an Update) and :mod:`.obs` (the OBS solver
  SparseGPT and GPTQ share).
"""

from sparseforge.oneshot.calibrated import METHODS, prune_calibrated
from sparseforge.oneshot.essential import EssentialSparsity, essential_sparsity
from sparseforge.oneshot.maskllm import MaskLLM, prune_maskllm, train_maskllm
from sparseforge.oneshot.prune import prune, prune_channels
from sparseforge.oneshot.sparsegpt import OBSReconstruction, SparseGPT

__all__ = ["METHODS", "EssentialSparsity", "MaskLLM", "OBSReconstruction", "SparseGPT", "essential_sparsity", "prune",
           "prune_calibrated", "prune_channels", "prune_maskllm", "train_maskllm"]
