"""One training loop for everything that trains: :func:`fit` and its callbacks.

``sparseforge train`` recipes, the demo and the benchmarks train through
:func:`fit`; what differs between them is a list of callbacks:

- :class:`SparsifierCallback`: a :class:`~sparseforge.Sparsifier` steps after every optimizer step;
- :class:`CommHookCallback`: DDP with a gradient communication hook (all-reduce, DGC, PowerSGD);
- :class:`History`: per-epoch metrics rows (and a JSON file);
- :class:`CheckpointCallback`: checkpoints with exact resume (:mod:`~sparseforge.training.checkpoint`);
- :class:`ProgressCallback`: progress on a :class:`~sparseforge.progress.Progress`.

Data is any iterable of ``(inputs, targets)`` batches, or a
:class:`~sparseforge.training.data.Batches` plug-in addressed by epoch and
position (:class:`~sparseforge.training.data.ShardedPermutation`: the
``(seed, epoch)`` order split over the ranks). :class:`SGDConfig` is the
default optimizer.

>>> import torch
>>> import sparseforge as sf
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
>>> x = torch.randn(64, 8); y = (x[:, 0] > 0).long()
>>> opt, sched = sf.training.SGDConfig(lr=0.1).build(model.parameters(), total_steps=40)
>>> history = sf.training.History()
>>> state = sf.fit(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], opt,
...                torch.nn.functional.cross_entropy, epochs=10, scheduler=sched,
...                callbacks=[sf.training.SparsifierCallback(sf.methods.GMP(0.5), finalize=True), history])
>>> state.step, len(history.rows), sf.report(model).sparsity
(40, 10, 0.5)
"""

from sparseforge.training.callbacks import (
    CheckpointCallback,
    CommHookCallback,
    History,
    ProgressCallback,
    SparsifierCallback,
)
from sparseforge.training.data import Batches, IterableBatches, ShardedPermutation, epoch_permutation, rank_slice
from sparseforge.training.loop import Callback, FitState, LambdaCallback, TrainingRun, World, fit
from sparseforge.training.optim import SGDConfig

__all__ = [
    "Batches", "Callback", "CheckpointCallback", "CommHookCallback", "FitState", "History", "IterableBatches",
    "LambdaCallback", "ProgressCallback", "SGDConfig", "ShardedPermutation", "SparsifierCallback", "TrainingRun",
    "World", "epoch_permutation", "fit", "rank_slice",
]
