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

Scaling to FSDP (not implemented; how masks and DGC would carry over). Under
fully sharded data parallelism each rank holds only a shard of every
parameter (FSDP1: a slice of a flattened parameter per wrapped unit; FSDP2:
dim-0 shards of each parameter as DTensors), parameters are all-gathered for
forward and backward, and gradients are *reduce-scattered*, so each rank
receives only its shard's averaged gradient.

- Masks would be sharded like their weights and applied to the local shard
  after the optimizer step, with no communication. Updates that rank weights
  across a whole layer or the model (magnitude top-k, RigL/GraNet gradient
  regrowth, global or ERK allocation) need a global threshold: either
  all-gather the scores (as much traffic as the weights), or have each rank
  propose its local top-k values and pick the threshold from those (an
  all-gather of k values per rank), or bisect on it with an all-reduce of
  counts; per-layer counts are sums of per-shard counts. Random regrowth needs
  a seed per shard that does not depend on the world size. N:M groups run
  along a row's inputs: FSDP2's dim-0 sharding keeps whole rows in a shard,
  FSDP1's flat slices can cut a row and would need boundaries aligned to M.
- DGC would replace the reduce-scatter instead of the all-reduce: a rank
  needs only its own shard's entries, so the selected (value, index) pairs
  would go to the rank owning each index (an all-to-all) instead of to every
  rank (the all-gather used under DDP), and each rank would average what it
  receives for its shard. The momentum ``u`` and residual ``v`` belong to the
  full local gradient, before the reduce-scatter: full-size buffers on every
  rank, which gives back part of FSDP's memory saving. FSDP1 accepts a
  communication hook for its gradient reduction
  (``FullyShardedDataParallel.register_comm_hook``); that is where it would go.
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
