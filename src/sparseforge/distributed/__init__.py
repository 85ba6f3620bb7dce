"""sparseforge under torch.distributed.

- :mod:`~sparseforge.distributed.masks`: identical masks on every rank under
  DDP: :func:`mask_digest`, :func:`check_masks_identical`,
  :func:`broadcast_masks` (a :class:`~sparseforge.Sparsifier` syncs its masks
  by itself after every update; see its ``sync_masks`` argument).
- :mod:`~sparseforge.distributed.dgc`: Deep Gradient Compression (Lin et al.,
  ICLR 2018) as a DDP communication hook: :class:`DGCConfig`,
  :func:`register_dgc` (returns a :class:`DGCState` whose ``stats()`` counts
  the bytes sent), and the baselines with the same counters,
  :func:`register_powersgd` (PyTorch's PowerSGD hook) and
  :func:`register_allreduce_counter` (plain all-reduce).
- :mod:`~sparseforge.distributed.train`: ``sparseforge train RECIPE --nproc N``:
  a YAML :class:`TrainRecipe` (:func:`load_recipe`) trained by :func:`run` in
  one process or as one rank of torchrun/DDP (entry point
  ``python -m sparseforge.distributed.launch``), with world-size-independent
  data sharding and checkpoints that resume on any number of processes.
"""

from sparseforge.distributed.dgc import (
    AllReduceState,
    CommState,
    DGCConfig,
    DGCState,
    PowerSGDCounterState,
    dgc_hook,
    register_allreduce_counter,
    register_dgc,
    register_powersgd,
    warmup_density,
)
from sparseforge.distributed.masks import broadcast_masks, check_masks_identical, mask_digest
from sparseforge.distributed.train import TrainRecipe, load_recipe, run

__all__ = [
    "AllReduceState", "CommState", "DGCConfig", "DGCState", "PowerSGDCounterState", "broadcast_masks",
    "check_masks_identical", "dgc_hook", "mask_digest", "register_allreduce_counter", "register_dgc",
    "register_powersgd", "warmup_density", "TrainRecipe", "load_recipe", "run",
]
