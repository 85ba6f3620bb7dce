"""One-shot pruning: prune a trained model once, without retraining.

- :func:`prune`: score, allocate, mask (magnitude, gradient scores, ...).
- :func:`prune_calibrated`: methods that read the layers' inputs on
  calibration data, layer by layer: Wanda and SparseGPT (and magnitude as
  their baseline), with OWL's layer-wise sparsity.
- :func:`essential_sparsity`: the sparsity one-shot magnitude pruning
  reaches before quality drops.
- :mod:`.calibration` (statistics capture) and :mod:`.obs` (the OBS solver
  SparseGPT and GPTQ share).
"""

from sparseforge.oneshot.calibrated import METHODS, CalibratedReport, prune_calibrated, wanda_mask, wanda_score
from sparseforge.oneshot.essential import EssentialSparsity, essential_sparsity
from sparseforge.oneshot.prune import prune

__all__ = ["METHODS", "CalibratedReport", "EssentialSparsity", "essential_sparsity", "prune", "prune_calibrated", "wanda_mask", "wanda_score"]
