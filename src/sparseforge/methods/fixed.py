"""A fixed, given mask: train a sparse network whose connectivity was chosen elsewhere.

:class:`GivenMasks` is the update (it sets the masks it is given) and
:func:`FixedMask` the method preset around it. The update lives here, next to
its only preset, rather than in :mod:`sparseforge.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sparseforge.errors import SparseforgeError
from sparseforge.method import METHODS, Method
from sparseforge.schedules import Constant
from sparseforge.targets import Target
from sparseforge.updates import Update, UpdateContext


@dataclass
class GivenMasks(Update):
    """Set every targeted layer's mask to a given one: a mask chosen outside the Sparsifier.

    Rule: at an update, layer ``name`` gets the keep-mask ``masks[name]``
    (nonzero = keep); the scores, allocation and scheduled sparsity are
    ignored. With a schedule whose only update is step 0 (the
    :func:`FixedMask` preset) this trains a fixed sparse
    network: a lottery ticket retrained from its rewind point, a mask loaded
    from a file, or one mask shared by the members of a sparse model soup.
    The names must be exactly the targeted layers' names and the shapes their
    weights' shapes, otherwise a :class:`SparseforgeError` says which differ.

    Args:
        masks: ``{qualified layer name: keep-mask}``, boolean or 0/1 tensors.
    """

    masks: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        names = [layer.name for layer in ctx.layers]
        missing = [n for n in names if n not in self.masks]
        extra = [n for n in self.masks if n not in set(names)]
        if missing or extra:
            raise SparseforgeError(
                f"the given masks do not match the targeted layers: no mask for {missing}, "
                f"masks for layers that are not targeted {extra}"
            )
        out = []
        for layer in ctx.layers:
            mask = self.masks[layer.name]
            if tuple(mask.shape) != tuple(layer.shape):
                raise SparseforgeError(
                    f"the given mask of {layer.name} has shape {tuple(mask.shape)}, the weight {tuple(layer.shape)}"
                )
            out.append(mask.to(device=layer.weight.device) != 0)
        return out

    def __str__(self) -> str:
        return "given-masks"


@METHODS.register("fixed-mask")
def FixedMask(
    masks: Mapping[str, torch.Tensor],
    *,
    target: Target | Sequence[str] | str | None = None,
    name: str = "fixed-mask",
) -> Method:
    """Keep the given masks for the whole run: one mask update, at step 0, that sets them.

    Rule: a constant schedule whose only update is step 0 and a
    :class:`GivenMasks` update, so the Sparsifier starts
    from exactly ``masks`` and never changes them; pruned weights are zero and
    receive no updates. This is how a lottery ticket is retrained (see
    :class:`~sparseforge.methods.imp.Ticket`), and how several models share one
    mask for a sparse model soup.

    Args:
        masks: ``{qualified layer name: keep-mask}`` for exactly the layers
            ``target`` selects (boolean or 0/1 tensors, shaped like the weights).
        target: which tensors the masks belong to. Default every Linear/Conv weight.
        name: a label for reports. Default ``"fixed-mask"``.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Linear(4, 2)
        >>> keep = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
        >>> sp = sf.Sparsifier(model, FixedMask({"": keep}))
        >>> bool(((model.weight != 0) == keep).all()), sp.sparsity()
        (True, 0.5)
    """
    if not masks:
        raise SparseforgeError("FixedMask needs at least one mask ({layer name: keep-mask})")
    kept = sum(int((m != 0).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    if kept == 0:
        raise SparseforgeError("the given masks prune every weight; keep at least one")
    return Method(
        # The schedule's sparsity is only reported (GivenMasks ignores it): the masks' own.
        schedule=Constant(final=1.0 - kept / total, start=0, end=0),
        score="magnitude",
        allocation="uniform",
        update=GivenMasks(dict(masks)),
        target=target,
        name=name,
    )
