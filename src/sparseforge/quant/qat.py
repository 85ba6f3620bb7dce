"""Quantization-aware training (QAT) of weights with learned step sizes (LSQ) that keeps zeros zero.

Paper: S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha,
"Learned Step Size Quantization", ICLR 2020 (LSQ).

The rule. Each Linear/Conv weight ``w`` gets a learnable step ``s`` (one per
output channel by default, or one per tensor), ``qmax = 2**(bits-1) - 1``
(127 for int8, 7 for int4; symmetric, no zero point). The forward pass uses
the fake-quantized weight::

    v   = clamp(w / s, -qmax, qmax)
    q   = round(v)                          # round half to even (torch.round)
    w_q = q * s

* **Initialisation** (LSQ): ``s = 2 * mean|w| / sqrt(qmax)`` over the *kept*
  (nonzero) weights of the channel (or tensor); 1 for an all-zero channel.
* **Gradients** (straight-through estimator): ``round`` passes the gradient
  unchanged, so ``dw_q/dw = 1`` inside the clamp range and 0 outside, and
  ``dw_q/ds = q - w/s`` inside, ``-qmax`` / ``+qmax`` below / above it
  (LSQ's eq. 3). The gradient reaching ``s`` is multiplied by LSQ's scale
  ``g = 1 / sqrt(numel * qmax)``, ``numel`` being the number of weights
  that share the step (the fan-in per channel, or the tensor's size).
* **Zeros stay zero**: ``w = 0`` gives ``q = 0`` and ``w_q = 0`` exactly, and
  the forward value is exactly ``q * s`` (the straight-through round is an
  autograd function, not ``x + (round(x) - x).detach()``, which is not
  exact in floating point), so a channel's fake-quantized weights take at
  most ``2*qmax + 1`` distinct values.

Only weights are quantized; activations stay float (use
:func:`sparseforge.quant.quantize_dynamic_int8` for int8 activations at
inference).

How it attaches, and why. :func:`qat_prepare` swaps each plain
``nn.Linear``/``nn.Conv1d/2d/3d`` for a subclass (:class:`QATLinear`, ...)
whose forward uses ``w_q``, and registers the step as a parameter
``weight_step`` of the layer. ``module.weight`` stays the latent
``nn.Parameter``, so a :class:`~sparseforge.Sparsifier` (before or after
``qat_prepare``) masks it, its gradient and its optimizer state as usual, and
pruned weights stay exactly zero in both the latent and the fake-quantized
weight. A ``torch.nn.utils.parametrize`` parametrization would instead turn
``module.weight`` into the computed ``w_q`` (the latent one moves to
``parametrizations.weight.original``), which the Sparsifier cannot mask.
Speed does not decide it: measured on LeNet-300-100 (batch 128, SGD
momentum, 2 CPU threads, interleaved medians of 21 rounds, two runs), a QAT
training step costs +132% / +144% over float training with the subclass and
+143% / +144% with a parametrization: the fake quantization itself (a few
elementwise passes over every weight, forward and backward) dominates on a
model this small, not the way it is attached. A forward
pre-hook cannot replace the tensor ``F.linear`` reads without the same swap.

:func:`qat_convert` computes the integer codes with the same rule, writes
``w_q`` into the plain layer and records the codes on it the way
:func:`sparseforge.quant.quantize_` does (:data:`~sparseforge.quant.rtn.QUANT_ATTR`),
so ``sf.save(model, path, values="int8"|"int4")`` stores them exactly.

Defaults: 8 bits, per channel. Create the optimizer *after*
:func:`qat_prepare` so that it holds the steps (consider no weight decay on
``*.weight_step``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sparseforge.errors import SparseforgeError
from sparseforge.quant.rtn import QUANT_ATTR, QuantizedTensor

__all__ = [
    "STEP_NAME", "QATConv1d", "QATConv2d", "QATConv3d", "QATLinear", "lsq_fake_quantize", "lsq_init_step",
    "qat_convert", "qat_prepare",
]

#: Name of the learnable step parameter registered on each prepared layer.
STEP_NAME = "weight_step"


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``g`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:  # type: ignore[override]
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.g, None


def _qmax(bits: int) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise SparseforgeError(f"bits must be 8 or 4, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _view(step: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A step of ``[out]`` (per channel) or ``[1]`` shaped to broadcast over ``w``."""
    return step.reshape(-1, *([1] * (w.dim() - 1)))


def lsq_fake_quantize(w: torch.Tensor, step: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """LSQ fake quantization ``round(clamp(w/s, -qmax, qmax)) * s`` with the straight-through estimator.

    Args:
        w: the weight ``[out, ...]``.
        step: positive steps ``[out]`` (per channel) or ``[1]`` (per tensor).
        bits: 8 (default, qmax 127) or 4 (qmax 7).

    The rule, gradients and LSQ's gradient scale ``g = 1/sqrt(numel * qmax)``
    on ``step`` (``numel``: weights per step) are in the module docstring;
    zeros give exactly 0.

    Example:
        >>> w = torch.tensor([[0.0, 0.5, -1.0, 0.01]], requires_grad=True)
        >>> lsq_fake_quantize(w, torch.tensor([0.25]), bits=4).tolist()
        [[0.0, 0.5, -1.0, 0.0]]
    """
    qmax = _qmax(bits)
    numel_per_step = w.numel() // step.numel()
    s = _view(_GradScale.apply(step, 1.0 / math.sqrt(numel_per_step * qmax)), w)
    v = torch.clamp(w / s, -qmax, qmax)
    return _RoundSTE.apply(v) * s


@torch.no_grad()
def lsq_init_step(w: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """LSQ's initial step ``2 * mean|w| / sqrt(qmax)`` over the kept (nonzero) weights.

    Returns ``[out]`` (per channel, default) or ``[1]`` float32; 1.0 where
    there is no kept weight (any positive step quantizes zeros to zero).
    """
    qmax = _qmax(bits)
    a = w.detach().to(torch.float32).abs()
    a = a.reshape(a.shape[0], -1) if per_channel else a.reshape(1, -1)
    kept = (a != 0).sum(dim=1)
    mean = a.sum(dim=1) / kept.clamp_min(1)
    return torch.where(kept > 0, 2.0 * mean / math.sqrt(qmax), torch.ones_like(mean))


class _QATMixin:
    """Forward with the LSQ fake-quantized weight; ``weight`` stays the latent parameter."""

    qat_bits: int
    weight: nn.Parameter
    weight_step: nn.Parameter

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the forward uses (differentiable in ``weight`` and ``weight_step``)."""
        return lsq_fake_quantize(self.weight, self.weight_step, self.qat_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat=int{self.qat_bits}, steps={self.weight_step.numel()}"  # type: ignore[misc]


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` whose forward uses the LSQ fake-quantized weight (made by :func:`qat_prepare`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class QATConv1d(_QATMixin, nn.Conv1d):
    """``nn.Conv1d`` whose forward uses the LSQ fake-quantized weight (made by :func:`qat_prepare`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses the LSQ fake-quantized weight (made by :func:`qat_prepare`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QATConv3d(_QATMixin, nn.Conv3d):
    """``nn.Conv3d`` whose forward uses the LSQ fake-quantized weight (made by :func:`qat_prepare`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


_QAT_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d,
}
_PLAIN_OF = {v: k for k, v in _QAT_OF.items()}


def qat_prepare(model: nn.Module, bits: int = 8, per_channel: bool = True) -> nn.Module:
    """Prepare every Linear/Conv layer of ``model`` for LSQ quantization-aware training, in place.

    Args:
        model: the model (may already carry a :class:`~sparseforge.Sparsifier`,
            or get one afterwards; pruned weights stay exactly zero either way).
        bits: 8 (default) or 4: codes in ``[-qmax, qmax]``, qmax 127 or 7.
        per_channel: one learnable step per output channel (default) or one
            per tensor.

    Each plain ``nn.Linear``/``nn.Conv1d/2d/3d`` becomes :class:`QATLinear`
    (etc., the same object with its class swapped: weights, masks and hooks
    stay) with a parameter ``weight_step`` initialised by LSQ's rule over the
    kept weights (:func:`lsq_init_step`). Build the optimizer afterwards so it
    trains the steps too. The steps are in the ``state_dict`` (resuming needs
    a prepared model); call :func:`qat_convert` before ``sf.save``. The rule is in the module docstring (LSQ, Esser et
    al., ICLR 2020). Returns the model.

    Raises :class:`SparseforgeError` for bad ``bits``, for subclasses of those
    layers (their forward would be lost) and for layers already prepared.

    Example:
        >>> m = qat_prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), bits=4)
        >>> type(m[0]).__name__, tuple(m[0].weight_step.shape)
        ('QATLinear', (2,))
    """
    _qmax(bits)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, _QATMixin):
            raise SparseforgeError(f"{name or 'model'} is already prepared for QAT; qat_convert(model) first")
        if type(m) in _QAT_OF:
            layers.append(m)
        elif isinstance(m, tuple(_QAT_OF)):
            if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
                continue  # MultiheadAttention's out_proj: the attention reads its weight directly
            raise SparseforgeError(
                f"{name or 'model'} is a {type(m).__name__}, a subclass of {type(m).__mro__[1].__name__}: "
                "qat_prepare only swaps plain nn.Linear/Conv1d/Conv2d/Conv3d layers, whose forward it knows")
    for m in layers:
        step = lsq_init_step(m.weight, bits, per_channel).to(m.weight.device, m.weight.dtype)
        m.__class__ = _QAT_OF[type(m)]
        m.qat_bits = bits
        m.register_parameter(STEP_NAME, nn.Parameter(step))
    return model


@torch.no_grad()
def qat_convert(model: nn.Module) -> nn.Module:
    """Turn every QAT layer back into a plain layer holding its quantized weight, with codes recorded; in place.

    For each layer prepared by :func:`qat_prepare`: codes
    ``q = round(clamp(w/s, -qmax, qmax))``, the weight
    becomes ``q * s`` (bit-identical to the training forward's ``w_q``), the
    codes and steps are recorded as a
    :class:`~sparseforge.quant.QuantizedTensor` (``module.sparseforge_quant``,
    as :func:`sparseforge.quant.quantize_` does; steps become ``[out, 1]``
    scales, per-channel layout), the ``weight_step`` parameter is removed and
    the class is the plain one again. ``sf.save(model, path,
    values="int8"|"int4")`` then stores the codes exactly. Finalize a
    Sparsifier before or after; returns the model.

    Raises :class:`SparseforgeError` when a step is not positive or not finite.
    """
    for name, m in model.named_modules():
        if not isinstance(m, _QATMixin):
            continue
        step = m.weight_step.detach()
        if not (torch.isfinite(step).all() and (step > 0).all()):
            raise SparseforgeError(f"{name or 'model'}.weight_step has non-positive or non-finite steps: "
                                   "cannot convert (lower the learning rate of the steps)")
        bits = m.qat_bits
        qmax = _qmax(bits)
        w = m.weight.detach()
        s = _view(step, w)
        q = _RoundSTE.apply(torch.clamp(w / s, -qmax, qmax))
        m.weight.copy_(q * s)
        out = w.shape[0]
        scale = step.to(torch.float32).reshape(-1, 1).expand(out, 1).contiguous()
        shape = tuple(w.shape)
        qt = QuantizedTensor(q.to(torch.int8), scale, bits, None, shape)
        del m._parameters[STEP_NAME]
        del m.qat_bits
        m.__class__ = _PLAIN_OF[type(m)]
        setattr(m, QUANT_ATTR, qt)
    return model
