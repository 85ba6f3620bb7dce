"""PaCA: train a few input columns of a Linear in place, saving only their part of the input.

The rule ("PaCA: Partial Connection Adaptation for Efficient Fine-Tuning",
Woo et al., ICLR 2025). For a Linear ``y = x W^T + b`` with ``W`` of shape
``[out, in]``, choose ``r`` input columns ``idx`` and train only ``W[:, idx]``,
kept as the parameter ``partial`` ``[out, r]``:

* forward: ``partial`` is written into ``W[:, idx]`` (no gradient), then
  ``y = x W^T + b``, one matmul with the full weight: no adapter path;
* backward (:class:`PartialLinearFunction`): saves only ``x[..., idx]``,
  ``r`` of the ``in`` features of the input, instead of ``x``;
  ``grad partial = grad_y^T x[..., idx]`` (summed over the batch
  dimensions) and ``grad x = grad_y W`` with the full current weight. The
  other columns of ``W`` never get a gradient.

The official implementation does the same (it writes the partial weight
into the frozen weight before its custom linear function, which saves the
pruned input). A pruned layer keeps its zeros: ``mask`` (``[out, r]``,
``W[:, idx] != 0`` at apply time) multiplies the gradient of ``partial``, so
SGD, Adam and AdamW never move a pruned entry, and multiplies ``partial``
again where it is written into ``W`` (forward and merge), so even an
optimizer that moves entries without gradient cannot revive one.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.peft.layer import AdapterLayer, keep_mask_of, layer_generator

SELECTIONS = ("random", "norm")


def select_columns(weight: torch.Tensor, rank: int, selection: str = "random", seed: int = 0,
                   name: str = "") -> torch.Tensor:
    """The ``rank`` input columns of ``weight`` ``[out, in]`` that PaCA trains, ascending (int64).

    ``"random"`` (the paper's choice): a uniform random subset, seeded by
    ``seed`` and the layer's ``name`` (so a layer's columns do not depend on
    which other layers are targeted). ``"norm"``: the columns of largest L2
    norm (ties to the lower index).

    Example:
        >>> select_columns(torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.0, 1.0]]), 2, "norm").tolist()
        [1, 2]
    """
    in_features = weight.shape[1]
    if not 1 <= rank <= in_features:
        raise SparseforgeError(f"{name or 'layer'}: rank {rank} must be in [1, {in_features}] "
                               f"(its input dimension); use a smaller rank or exclude the layer")
    if selection == "random":
        chosen = torch.randperm(in_features, generator=layer_generator(seed, name))[:rank]
    elif selection == "norm":
        norms = weight.detach().to(torch.float32).norm(dim=0).cpu()
        chosen = torch.argsort(-norms, stable=True)[:rank]
    else:
        raise SparseforgeError(f"unknown column selection {selection!r}; valid: {', '.join(SELECTIONS)}")
    return chosen.sort().values.to(torch.int64)


class PartialLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` whose backward trains only ``W[:, index]`` and saves only ``x[..., index]``.

    ``forward(x, partial, weight, bias, index, mask)``: ``weight`` must already
    hold ``partial`` in its columns ``index`` (:class:`PaCALinear` writes it).
    Gradients: ``partial`` gets ``grad_y^T x[..., index]`` (times ``mask``
    when given), ``x`` gets ``grad_y weight``, ``bias`` (when it requires
    grad) the sum of ``grad_y`` over the batch dimensions; ``weight`` none.
    The one tensor saved for backward is ``x[..., index]``; ``weight`` is
    read at backward time (it is a parameter, held anyway), so changing its
    columns between forward and backward changes ``grad x`` accordingly.
    """

    @staticmethod
    def forward(ctx, x, partial, weight, bias, index, mask):  # type: ignore[override]
        ctx.save_for_backward(x.index_select(-1, index) if ctx.needs_input_grad[1] else None)
        ctx.weight, ctx.mask = weight, mask
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        (x_part,) = ctx.saved_tensors
        grad_x = grad_partial = grad_bias = None
        flat = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(ctx.weight.to(grad_y.dtype))
        if ctx.needs_input_grad[1]:
            grad_partial = flat.t().matmul(x_part.reshape(-1, x_part.shape[-1]))
            if ctx.mask is not None:
                grad_partial = grad_partial * ctx.mask
        if ctx.needs_input_grad[3]:
            grad_bias = flat.sum(0)
        return grad_x, grad_partial, None, grad_bias, None, None


class PaCALinear(AdapterLayer):
    """A Linear whose input columns ``index`` train in place (PaCA); see the module docstring.

    Args:
        base: the Linear; it is frozen and kept as ``self.base``.
        index: the trained input columns, ascending (:func:`select_columns`).
        keep_mask: keep the zeros of a pruned ``base`` (default True).

    Attributes: ``partial`` (parameter ``[out, r]``, initialised to
    ``base.weight[:, index]``), ``index`` (buffer), ``mask`` (buffer
    ``[out, r]`` of the kept entries, or None when the columns have no zeros).
    """

    method = "paca"

    def __init__(self, base: nn.Linear, index: torch.Tensor, keep_mask: bool = True) -> None:
        super().__init__(base)
        index = torch.as_tensor(index, dtype=torch.int64, device=base.weight.device)
        if index.dim() != 1 or not 1 <= index.numel() <= base.in_features or bool((index[1:] <= index[:-1]).any()) \
                or int(index.min()) < 0 or int(index.max()) >= base.in_features:
            raise SparseforgeError(f"PaCA column indices must be distinct, ascending and in [0, {base.in_features}), "
                                   f"got {index.tolist()}")
        self.register_buffer("index", index)
        columns = base.weight.detach()[:, index]
        self.partial = nn.Parameter(columns.clone())
        self.register_buffer("mask", keep_mask_of(columns, keep_mask))

    @property
    def rank(self) -> int:
        return self.index.numel()

    def _columns(self) -> torch.Tensor:
        return self.partial if self.mask is None else self.partial * self.mask

    @torch.no_grad()
    def write_columns(self) -> None:
        """Copy the (masked) trained columns into ``base.weight[:, index]``."""
        self.base.weight.index_copy_(1, self.index, self._columns().to(self.base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.write_columns()
        return PartialLinearFunction.apply(x, self.partial, self.base.weight, self.base.bias, self.index, self.mask)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base.weight.detach().index_copy(1, self.index, self._columns().to(self.base.weight.dtype))

    def layer_info(self) -> dict[str, object]:
        return {**super().layer_info(), "indices": self.index.tolist()}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, masked={self.mask is not None}"
