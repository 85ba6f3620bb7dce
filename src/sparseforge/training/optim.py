"""The optimizer every sparseforge training run uses by default: SGD with Nesterov momentum, cosine-annealed.

``sparseforge train`` (its recipe's ``train:`` section), the demo and the
reproduction benchmarks all build it here, so their defaults are written once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["SGDConfig"]


@dataclass
class SGDConfig:
    """SGD with Nesterov momentum and weight decay; the learning rate cosine-annealed to 0 over the run.

    ``momentum`` 0 is plain SGD (no Nesterov). Defaults: ``lr`` 0.05, ``momentum`` 0.9,
    ``weight_decay`` 5e-4, as in every reproduction on Fashion-MNIST here.

    >>> opt, sched = SGDConfig(lr=0.1).build([torch.nn.Parameter(torch.zeros(2))], total_steps=10)
    >>> opt.defaults["nesterov"], opt.defaults["momentum"], sched.T_max
    (True, 0.9, 10)
    """

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def build(self, params: Iterable[torch.nn.Parameter] | Iterable[dict],
              total_steps: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
        """The optimizer over ``params`` and its cosine schedule over ``total_steps`` optimizer steps."""
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0,
                              weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)))
