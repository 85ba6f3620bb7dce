"""Model merging: functions over state dicts (``name -> Tensor``), each named method a preset of shared parts.

- ``core``: compatibility checks, weighted average, uniform and greedy model soups.
- ``task_arithmetic``: generalized task arithmetic (task arithmetic, TIES, DARE, DARE-TIES) with a per-tensor rule.
- ``streaming``: ``merge_files``, the same merges over safetensors files, one tensor per model in memory at a time.
- ``recipe``: ``MergeRecipe``, a YAML merge recipe (``sparseforge merge --recipe``).

Example:
    >>> import torch, sparseforge.merge as sm
    >>> base = {"w": torch.zeros(4)}
    >>> tasks = [{"w": torch.tensor([1.0, 0.0, -2.0, 0.5])}, {"w": torch.tensor([1.0, 3.0, 2.0, 0.0])}]
    >>> sm.task_arithmetic(base, tasks, lam=0.5)["w"]
    tensor([1.0000, 1.5000, 0.0000, 0.2500])
"""

from sparseforge.merge.core import (
    check_compatible,
    greedy_soup,
    is_mergeable,
    map_tensors,
    normalize_weights,
    uniform_soup,
    weighted_average,
)
from sparseforge.merge.recipe import MergeRecipe, load_recipe
from sparseforge.merge.streaming import merge_files
from sparseforge.merge.task_arithmetic import (
    PRESETS,
    TaskArithmetic,
    combine_tensors,
    dare,
    merge_task_arithmetic,
    merge_tensors,
    merged_task_vector,
    preset,
    task_arithmetic,
    task_vector,
    ties,
)

__all__ = [
    "MergeRecipe", "load_recipe", "merge_files", "PRESETS", "TaskArithmetic", "check_compatible", "combine_tensors", "dare", "greedy_soup", "is_mergeable",
    "map_tensors", "merge_task_arithmetic", "merge_tensors", "merged_task_vector", "normalize_weights", "preset",
    "task_arithmetic", "task_vector", "ties", "uniform_soup", "weighted_average",
]
