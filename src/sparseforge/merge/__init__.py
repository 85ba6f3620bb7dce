"""Model merging: functions over state dicts (``name -> Tensor``), each named method a preset of shared parts.

- ``core``: compatibility checks, weighted average, uniform and greedy model soups.
- ``task_arithmetic``: generalized task arithmetic (task arithmetic, TIES, DARE, DARE-TIES) with a per-tensor rule.
- ``fisher``: diagonal Fisher information and Fisher-weighted averaging.
- ``regmean``: Gram matrices of Linear inputs and RegMean merging.
- ``tall``: TALL masks, task reconstruction, consensus merging and the storage they save.
- ``streaming``: ``merge_files``, the same merges over safetensors files, one tensor per model in memory at a time.
- ``recipe``: ``MergeRecipe``, a YAML merge recipe (``sparseforge merge --recipe``).
- ``rebasin``: weight matching (Git Re-Basin) over the dependency analysis's channel groups, interpolation paths,
  loss barriers and BatchNorm statistics reset.
- ``sparse_soups``: sparse model soups (averages that keep the ingredients' shared mask) and the SMS prune-retrain loop.

Example:
    >>> import torch, sparseforge.merge as sm
    >>> base = {"w": torch.zeros(4)}
    >>> tasks = [{"w": torch.tensor([1.0, 0.0, -2.0, 0.5])}, {"w": torch.tensor([1.0, 3.0, 2.0, 0.0])}]
    >>> sm.task_arithmetic(base, tasks, lam=0.5)["w"]
    tensor([1.0000, 1.5000, 0.0000, 0.2500])
"""

from sparseforge.merge.core import (
    MERGE_METHODS,
    MergeMethod,
    average_tensors,
    check_compatible,
    greedy_soup,
    is_mergeable,
    map_tensors,
    normalize_weights,
    uniform_soup,
    weighted_average,
)
from sparseforge.merge.fisher import fisher_diagonal, fisher_merge
from sparseforge.merge.regmean import GramMatrices, gram_matrices, regmean
from sparseforge.merge.tall import consensus_masks, consensus_merge, reconstruct, storage_report, tall_masks
from sparseforge.merge.recipe import MergeRecipe, load_recipe
from sparseforge.merge.rebasin import (
    apply_permutation,
    interpolate,
    interpolation_path,
    loss_barrier,
    random_permutation,
    reset_bn_stats,
    weight_matching,
)
from sparseforge.merge.sparse_soups import SoupCycle, check_shared_mask, sparse_model_soup, sparse_soup
from sparseforge.merge.streaming import merge_files
from sparseforge.merge.task_arithmetic import (
    TaskArithmetic,
    TaskVectorMethod,
    combine_tensors,
    dare,
    merge_task_arithmetic,
    merge_tensors,
    merged_task_vector,
    preset,
    presets,
    task_arithmetic,
    task_vector,
    ties,
)

__all__ = [
    "GramMatrices", "MERGE_METHODS", "MergeMethod", "MergeRecipe", "SoupCycle", "TaskArithmetic", "TaskVectorMethod",
    "apply_permutation", "average_tensors", "check_compatible", "check_shared_mask", "combine_tensors", "consensus_masks", "consensus_merge", "dare",
    "fisher_diagonal", "fisher_merge", "gram_matrices", "greedy_soup", "interpolate", "interpolation_path",
    "is_mergeable", "load_recipe", "loss_barrier", "map_tensors", "merge_files", "merge_task_arithmetic",
    "merge_tensors", "merged_task_vector", "normalize_weights", "preset", "presets", "random_permutation",
    "reconstruct", "regmean", "reset_bn_stats", "sparse_model_soup", "sparse_soup", "storage_report", "tall_masks",
    "task_arithmetic", "task_vector", "ties", "uniform_soup", "weight_matching", "weighted_average",
]
