"""What compaction knows about each layer type, in one table that users can extend.

In the spirit of Torch-Pruning's per-layer pruners: the dependency analysis
(:mod:`sparseforge.compact.dependency`), the channel values and slicing of
:func:`sparseforge.compact` and the transformers path
(:mod:`sparseforge.compact.transformer`) ask :func:`handler_for` instead of
testing layer classes themselves. A handler says what *role* its layer plays
in a channel group:

- ``"producer"``: reads channels along one dimension of its input and makes
  new ones (Linear, ungrouped Conv2d, transformers' Conv1D): it starts a
  group, its filters/rows can be removed, and its input columns belong to
  the group it reads;
- ``"norm"``: a per-channel affine map along dimension 1 (BatchNorm): its
  channels go with the group it normalises;
- ``"channelwise"``: keeps the channel space (activations, dropout, pooling);
- ``"flatten"``: merges the channel dimension with the ones after it.

Any module without a handler blocks the groups that reach it (they are kept
whole). A layer of your own joins with one call::

    register_handler(MyLinear, LinearHandler())          # behaves like nn.Linear
    register_handler(lambda m: hasattr(m, "my_flag"), MyHandler())

A handler is looked up by the module's class (its first registered base
class, so subclasses inherit it), then by the predicates in registration
order. The shape entries a producer or norm writes (``{"kind": ..., sizes}``)
are what checkpoints store, so ``load_checkpoint`` rebuilds compacted layers
through the same table (:meth:`LayerHandler.resized`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.layers import is_conv1d

__all__ = [
    "BatchNormHandler", "ChannelwiseHandler", "Conv1DHandler", "Conv2dHandler", "FlattenHandler", "LayerHandler",
    "LinearHandler", "handler_for", "is_registered_leaf", "register_handler", "require_handler",
]

NAN = float("nan")


class LayerHandler:
    """Base class: the per-layer knowledge compaction needs. Override what your layer's role uses.

    ``role`` is one of ``"producer"``, ``"norm"``, ``"channelwise"``,
    ``"flatten"`` (see the module docstring); ``kind`` names the layer in the
    shape entries that checkpoints store (None: never resized).
    """

    role: ClassVar[str] = "channelwise"
    kind: ClassVar[str | None] = None

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module cannot take part in a group (its groups are kept whole), or None when it can."""
        return None

    # -- producers and norms: where the channels are -------------------------------------

    def channel_dim(self, module: nn.Module, ndim: int | None) -> int | None:
        """The dimension of the layer's input and output (of ``ndim`` dims; None: unknown) holding the channels."""
        return 1

    def reads(self, module: nn.Module, dim: int, repeat: int, ndim: int | None) -> bool:
        """Whether the layer reads a channel space along ``dim`` in which each channel owns ``repeat`` entries."""
        return dim == self.channel_dim(module, ndim) and repeat == 1

    def out_channels(self, module: nn.Module) -> int:
        """How many channels the layer produces (producers) or normalises (norms)."""
        raise NotImplementedError

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight, detached, as ``[out, in, ...]`` (a view: writes go to the module)."""
        return module.weight.detach()

    def foldable(self, module: nn.Module) -> bool:
        """Whether a constant input channel folds exactly into the bias (``bias += k * sum of its columns``)."""
        return False

    # -- constant channels ---------------------------------------------------------------

    def constant(self, module: nn.Module, value: torch.Tensor | None, unknown: torch.Tensor) -> torch.Tensor:
        """Each output channel's constant value (float64, NaN where it depends on the input).

        ``value`` holds the input's per-channel constants (None when the input
        belongs to no group); ``unknown`` is the all-NaN answer.
        """
        return value if value is not None else unknown

    # -- resizing ------------------------------------------------------------------------

    def entry(self, module: nn.Module) -> dict[str, Any]:
        """The module's sizes as a shape entry ``{"kind": kind, ...}``."""
        raise SparseforgeError(f"cannot compact a {type(module).__name__}")

    def resized(self, module: nn.Module, entry: dict[str, Any]) -> nn.Module:
        """A new module like ``module`` with the sizes of ``entry``, weights uninitialised."""
        raise SparseforgeError(f"cannot resize {type(module).__name__} to {entry}: the stored shapes do not fit "
                               "the model")

    def sliced(
        self, module: nn.Module, out_index: torch.Tensor | None, in_index: torch.Tensor | None
    ) -> tuple[dict[str, Any], nn.Module]:
        """The shape entry and a new module holding output channels ``out_index`` and inputs ``in_index`` (None: all)."""
        raise SparseforgeError(f"cannot compact a {type(module).__name__}")


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    p = next(module.parameters(), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


def _zero_rows(w: torch.Tensor) -> torch.Tensor:
    """Per output row (dim 0): whether it is entirely zero."""
    return (w.reshape(w.shape[0], -1) == 0).all(dim=1)


class _WeightedProducer(LayerHandler):
    """Shared by Linear, Conv2d and Conv1D: a weight ``[out, in, ...]`` and an optional bias."""

    role = "producer"

    def constant(self, module: nn.Module, value: torch.Tensor | None, unknown: torch.Tensor) -> torch.Tensor:
        # a filter/row of zeros outputs its bias (0 without one) whatever the input
        w = self.weight(module)
        b = module.bias.detach() if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        v = b.to(torch.float64).clone()
        v[~_zero_rows(w)] = NAN
        return v

    def _copy_slices(self, old: nn.Module, new: nn.Module, o: torch.Tensor | None, i: torch.Tensor | None) -> None:
        w = self.weight(old)
        w = w[o] if o is not None else w
        w = w[:, i] if i is not None else w
        with torch.no_grad():
            self.weight(new).copy_(w)
            if old.bias is not None:
                new.bias.copy_(old.bias[o] if o is not None else old.bias)
        new.train(old.training)
        new.weight.requires_grad_(old.weight.requires_grad)


class LinearHandler(_WeightedProducer):
    """``nn.Linear``: channels along the last dimension; a flattened input's channel owns consecutive columns."""

    kind = "Linear"

    def channel_dim(self, module: nn.Module, ndim: int | None) -> int | None:
        return None if ndim is None else ndim - 1

    def reads(self, module: nn.Module, dim: int, repeat: int, ndim: int | None) -> bool:
        return ndim is not None and dim == ndim - 1

    def out_channels(self, module: nn.Module) -> int:
        return module.out_features

    def foldable(self, module: nn.Module) -> bool:
        return module.bias is not None

    def entry(self, module: nn.Module) -> dict[str, Any]:
        return {"kind": "Linear", "in_features": module.in_features, "out_features": module.out_features}

    def resized(self, module: nn.Module, entry: dict[str, Any]) -> nn.Module:
        if entry.get("kind") != self.kind:
            return super().resized(module, entry)
        return nn.Linear(entry["in_features"], entry["out_features"], module.bias is not None,
                         **_factory_kwargs(module))

    def sliced(self, module, out_index, in_index):  # noqa: ANN001, ANN201 - as the base class
        entry = self.entry(module)
        if out_index is not None:
            entry["out_features"] = len(out_index)
        if in_index is not None:
            entry["in_features"] = len(in_index)
        new = self.resized(module, entry)
        self._copy_slices(module, new, out_index, in_index)
        return entry, new


class Conv2dHandler(_WeightedProducer):
    """``nn.Conv2d`` without groups: channels along dimension 1."""

    kind = "Conv2d"

    def unsupported(self, module: nn.Module) -> str | None:
        return "grouped convolution" if module.groups != 1 else None

    def out_channels(self, module: nn.Module) -> int:
        return module.out_channels

    def foldable(self, module: nn.Module) -> bool:
        # a constant channel meets zero padding at the borders: only an unpadded conv folds it exactly
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        return (module.bias is not None and module.padding_mode == "zeros" and module.padding != "same"
                and all(p == 0 for p in padding))

    def entry(self, module: nn.Module) -> dict[str, Any]:
        return {"kind": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels}

    def resized(self, module: nn.Module, entry: dict[str, Any]) -> nn.Module:
        if entry.get("kind") != self.kind:
            return super().resized(module, entry)
        return nn.Conv2d(entry["in_channels"], entry["out_channels"], module.kernel_size, module.stride,
                         module.padding, module.dilation, module.groups, module.bias is not None,
                         module.padding_mode, **_factory_kwargs(module))

    def sliced(self, module, out_index, in_index):  # noqa: ANN001, ANN201 - as the base class
        entry = self.entry(module)
        if out_index is not None:
            entry["out_channels"] = len(out_index)
        if in_index is not None:
            entry["in_channels"] = len(in_index)
        new = self.resized(module, entry)
        self._copy_slices(module, new, out_index, in_index)
        return entry, new


class Conv1DHandler(LinearHandler):
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]`` (``nx`` in, ``nf`` out)."""

    kind = "Conv1D"

    def unsupported(self, module: nn.Module) -> str | None:
        # oneshot.channels and merge.rebasin slice a group's weights as [out, in]: keep traced models'
        # Conv1D layers out of groups (transformers models are compacted by compact.transformer)
        return "transformers Conv1D outside a Hugging Face model"

    def out_channels(self, module: nn.Module) -> int:
        return module.nf

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().t()

    def entry(self, module: nn.Module) -> dict[str, Any]:
        return {"kind": "Conv1D", "nx": module.nx, "nf": module.nf}

    def resized(self, module: nn.Module, entry: dict[str, Any]) -> nn.Module:
        if entry.get("kind") != self.kind:
            return LayerHandler.resized(self, module, entry)
        new = type(module)(entry["nf"], entry["nx"])
        kw = _factory_kwargs(module)
        return new.to(**kw) if kw else new

    def sliced(self, module, out_index, in_index):  # noqa: ANN001, ANN201 - as the base class
        entry = {"kind": "Conv1D", "nx": len(in_index) if in_index is not None else module.nx,
                 "nf": len(out_index) if out_index is not None else module.nf}
        new = self.resized(module, entry)
        self._copy_slices(module, new, out_index, in_index)
        new.bias.requires_grad_(module.bias.requires_grad)
        return entry, new


class BatchNormHandler(LayerHandler):
    """``nn.BatchNorm1d`` / ``nn.BatchNorm2d``: a per-channel affine map along dimension 1 (eval mode)."""

    role = "norm"

    def out_channels(self, module: nn.Module) -> int:
        return module.num_features

    def constant(self, module: nn.Module, value: torch.Tensor | None, unknown: torch.Tensor) -> torch.Tensor:
        v = value if value is not None else unknown
        n = module.num_features
        weight = module.weight.detach().double() if module.weight is not None else torch.ones(n, dtype=torch.float64)
        bias = module.bias.detach().double() if module.bias is not None else torch.zeros(n, dtype=torch.float64)
        if module.running_mean is not None and module.track_running_stats:
            out = (v - module.running_mean.double()) / torch.sqrt(module.running_var.double() + module.eps) * weight + bias
        else:  # batch statistics: a constant channel normalises to 0
            out = torch.where(torch.isnan(v), v, bias)
        return torch.where(weight == 0, bias, out)

    def entry(self, module: nn.Module) -> dict[str, Any]:
        return {"kind": type(module).__name__, "num_features": module.num_features}

    def resized(self, module: nn.Module, entry: dict[str, Any]) -> nn.Module:
        if entry.get("kind") not in ("BatchNorm1d", "BatchNorm2d"):
            return super().resized(module, entry)
        return type(module)(entry["num_features"], module.eps, module.momentum, module.affine,
                            module.track_running_stats, **_factory_kwargs(module))

    def sliced(self, module, out_index, in_index):  # noqa: ANN001, ANN201 - as the base class
        entry = self.entry(module)
        if out_index is not None:
            entry["num_features"] = len(out_index)
        new = self.resized(module, entry)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(module, attr)
                if t is not None:
                    getattr(new, attr).copy_(t[out_index] if out_index is not None else t)
            if module.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        new.weight.requires_grad_(module.weight.requires_grad)
        return entry, new


class ChannelwiseHandler(LayerHandler):
    """A module that maps each channel on its own and keeps a constant channel constant.

    ``apply=True``: the constant is the module applied to it (activations);
    False: it passes unchanged (dropout, identity). ``zero_padded=True``:
    average pooling that pads with zeros, where only a zero stays constant.
    """

    role = "channelwise"

    def __init__(self, apply: bool = True, zero_padded: bool = False) -> None:
        self.apply = apply
        self.zero_padded = zero_padded

    def constant(self, module: nn.Module, value: torch.Tensor | None, unknown: torch.Tensor) -> torch.Tensor:
        if value is None:
            return unknown
        if self.zero_padded and getattr(module, "padding", 0) not in (0, (0, 0)):
            return torch.where(value == 0, value, torch.full_like(value, NAN))
        return module(value) if self.apply else value


class FlattenHandler(LayerHandler):
    """``nn.Flatten``: merges the channel dimension with the ones after it (see the dependency analysis)."""

    role = "flatten"


_BY_TYPE: dict[type, LayerHandler] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], LayerHandler]] = []


def register_handler(layer: type[nn.Module] | Callable[[nn.Module], bool], handler: LayerHandler) -> None:
    """Make ``handler`` the one compaction uses for ``layer``: a module class (and its subclasses without
    a handler of their own), or a predicate over modules for classes that cannot be imported here.

    Registering a class again replaces its handler.
    """
    if not isinstance(handler, LayerHandler):
        raise SparseforgeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    if handler.role not in ("producer", "norm", "channelwise", "flatten"):
        raise SparseforgeError(f"handler role must be producer, norm, channelwise or flatten, not {handler.role!r}")
    if isinstance(layer, type):
        _BY_TYPE[layer] = handler
    elif callable(layer):
        _BY_PREDICATE.append((layer, handler))
    else:
        raise SparseforgeError(f"register_handler takes a module class or a predicate, got {layer!r}")


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler registered for ``module``'s class (or nearest base class), else the first matching predicate."""
    for cls in type(module).__mro__:
        handler = _BY_TYPE.get(cls)
        if handler is not None:
            return handler
    return next((h for match, h in _BY_PREDICATE if match(module)), None)


def require_handler(module: nn.Module) -> LayerHandler:
    """:func:`handler_for`, raising :class:`SparseforgeError` when ``module`` has no handler."""
    handler = handler_for(module)
    if handler is None:
        raise SparseforgeError(f"cannot compact or resize a {type(module).__name__}: no layer handler is "
                               "registered for it (sparseforge.compact.register_handler)")
    return handler


def is_registered_leaf(module: nn.Module) -> bool:
    """Whether ``module``'s own class (not a base class) or a predicate has a handler: the dependency
    analysis then keeps it whole when tracing. Subclasses of torch layers without a registration of
    their own are traced through, since their forward may differ from the base class's."""
    return type(module) in _BY_TYPE or any(match(module) for match, _ in _BY_PREDICATE)


register_handler(nn.Linear, LinearHandler())
register_handler(nn.Conv2d, Conv2dHandler())
register_handler(is_conv1d, Conv1DHandler())
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_handler(_bn, BatchNormHandler())
# Elementwise: channel-wise, and a per-channel constant stays the activation of that constant.
for _act in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardtanh,
             nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus):
    register_handler(_act, ChannelwiseHandler())
for _same in (nn.Identity, nn.Dropout, nn.Dropout2d):
    register_handler(_same, ChannelwiseHandler(apply=False))
# Pooling: channel-wise, keeps a constant channel constant unless it averages in zero padding.
for _pool in (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d):
    register_handler(_pool, ChannelwiseHandler(apply=False))
for _pool in (nn.AvgPool2d, nn.AvgPool1d):
    register_handler(_pool, ChannelwiseHandler(apply=False, zero_padded=True))
register_handler(nn.Flatten, FlattenHandler())
