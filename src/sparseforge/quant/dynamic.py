"""Dynamic int8 quantization for CPU inference: int8 weights, int8 activations per batch.

The rule. Every ``nn.Linear`` becomes a dynamically quantized Linear:

* its weight is quantized once, per output channel, by the round-to-nearest
  rule of :mod:`sparseforge.quant.rtn` (symmetric, ``scale = max|w| / 127``
  over the channel's kept weights, zero point 0): **zeros stay exactly 0**
  and kept weights stay nonzero, so the sparsity pattern survives. A layer
  that already carries a recorded int8 per-channel quantization (from
  :func:`sparseforge.quant.quantize_`, a QAT conversion or ``sf.load``)
  keeps exactly those codes;
* at every call, the input batch is quantized to 8 bits with a scale (and
  zero point) computed from that batch's own range, the product is computed
  in integers (int32 accumulation) and rescaled to float32.

Convolutions and every other module stay float32 (PyTorch has no dynamic int8
convolution on CPU); inputs and outputs are float32. The quantized model is
for inference (no gradients).

Which kernel, and why (``python -m sparseforge.bench quant-speed
--candidates``: all candidates timed in alternating blocks within one run,
medians of 30 rounds, torch 2.13.0 CPU, 2 threads of an AMD EPYC with a 32 MiB
L3, quiet machine; LeNet-300-100 trained 3 epochs, a random 4096x4096
Linear; relative output error ``||y - y_fp32|| / ||y_fp32||``; the table with
milliseconds is in ``bench/README.md``, ``## quant-speed``):

==============================  ========  ========  =========  ==========  ==========  ===========  =========
candidate (speed vs fp32)       LeNet b1  LeNet b8  LeNet b64  4096² b1    4096² b8    4096² b64    rel. err
==============================  ========  ========  =========  ==========  ==========  ===========  =========
torch.ao dynamic, fbgemm/x86    0.61x     1.00x     1.63x      14.9x       14.4x       5.7x         1.3-2.2%
torchao 0.18 Int8DynAct-Int8W   0.07x     0.11x     0.29x      0.62x       0.88x       1.66x        0.8-1.0%
hand: torch._int_mm             0.50x     0.74x     1.21x      3.4x        4.8x        4.1x         0.7-1.0%
hand: dequantize on the fly     0.52x     0.49x     0.75x      0.35x       0.48x       0.70x        0.4-0.5%
==============================  ========  ========  =========  ==========  ==========  ===========  =========

PyTorch's own quantized kernels (fbgemm/x86, reached through
``torch.ao.nn.quantized.dynamic.Linear``) win everywhere; on LeNet's tiny
layers at batch 1 no candidate beats fp32 (quantizing the activations costs
more than the int8 product saves) and at batch 8 the best one ties it.
torchao 0.18 installs beside torch 2.13.0 without changing it (it declares
no torch dependency; its compiled extensions do not load for this torch), but its CPU int8 path
is 3.5-24x slower than fbgemm and slower than fp32 everywhere but at batch
64 on the 4096x4096 Linear (in an earlier run 0.07-0.73x fp32 throughout).
The hand-written ``torch._int_mm`` path (per-row activation scales: lower
error) is 1.2-4.4x slower than fbgemm. The 4096x4096 speedups at batch 1-8
are larger than the 4x fewer weight bytes because the 16 MiB int8 weight
stays in the 32 MiB L3 cache across calls while the 64 MiB fp32 weight
streams from memory; in a network whose weights do not fit the cache expect
about the byte ratio.

Deprecation. ``torch.ao.quantization`` and the quantized tensor types are
deprecated in PyTorch (to be removed in favour of torchao). Building the
quantized weight emits a ``UserWarning`` saying so; it is suppressed here (the
path is measured and tested with this torch). When a torch build no longer
has these kernels, :func:`quantize_dynamic_int8` raises a
:class:`~sparseforge.errors.SparseforgeError` naming what to install
(:func:`dynamic_int8_available` tells beforehand).
"""

from __future__ import annotations

import copy
import warnings
from types import ModuleType

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.quant.rtn import QuantizedTensor, quantization_of, quantize_weight

__all__ = ["dynamic_int8_available", "quantize_dynamic_int8"]

_MISSING_HELP = (
    "dynamic int8 needs PyTorch's quantized CPU kernels (torch.ao.nn.quantized.dynamic with the "
    "fbgemm/x86, onednn or qnnpack engine), which this torch build ({version}) lacks: {reason}. They are "
    "deprecated upstream. Install a torch that still has them (measured with torch 2.13.0: pip install "
    "'torch==2.13.0'), or use torchao instead (pip install torchao; torchao.quantization.quantize_(model, "
    "Int8DynamicActivationInt8WeightConfig()), measured 3.5-24x slower than these kernels on CPU with torchao 0.18)"
)

# The one warning that building a quantized weight emits under torch 2.13 ("torch.quantize_per_tensor,
# torch.quantize_per_channel and other quantized tensor creation functions ... are deprecated").
_DEPRECATION = r".*(quantized tensor creation functions|torch\.ao\.quantization).*deprecated.*"


def _kernels() -> ModuleType:
    """``torch.ao.nn.quantized.dynamic``, checked usable; :class:`SparseforgeError` otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            import torch.ao.nn.quantized.dynamic as nnqd
    except ImportError as e:
        raise SparseforgeError(_MISSING_HELP.format(version=torch.__version__, reason=f"import failed ({e})")) from None
    engine = torch.backends.quantized.engine
    if engine == "none" or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise SparseforgeError(_MISSING_HELP.format(
            version=torch.__version__, reason=f"no quantized engine (engine {engine!r}, supported "
            f"{torch.backends.quantized.supported_engines})"))
    return nnqd


def dynamic_int8_available() -> bool:
    """True when this torch build has the kernels :func:`quantize_dynamic_int8` needs."""
    try:
        _kernels()
    except SparseforgeError:
        return False
    return True


def _int8_codes(module: nn.Linear, name: str) -> QuantizedTensor:
    """The layer's recorded int8 per-channel codes if it has them, else RTN int8 per channel."""
    qt = quantization_of(module)
    if qt is not None and qt.bits == 8 and qt.group_size is None:
        return qt
    return quantize_weight(module.weight.detach().to(torch.float32), bits=8, group_size=None, name=name)


def _dynamic_linear(nnqd: ModuleType, module: nn.Linear, name: str) -> nn.Module:
    qt = _int8_codes(module, name)
    out = module.out_features
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        # A channel that is all zero has scale 0; any positive scale gives it the same (zero) codes.
        scale = torch.where(qt.scale > 0, qt.scale, torch.ones_like(qt.scale)).reshape(out).to(torch.float64)
        qweight = torch._make_per_channel_quantized_tensor(
            qt.q.cpu(), scale.cpu(), torch.zeros(out, dtype=torch.int64), 0)
        q = nnqd.Linear(module.in_features, out, bias_=module.bias is not None, dtype=torch.qint8)
        bias = None if module.bias is None else module.bias.detach().to(torch.float32).cpu()
        q.set_weight_bias(qweight, bias)
    return q


def _swappable(module: nn.Module) -> bool:
    # MultiheadAttention reads its out_proj's weight directly: PyTorch marks it non-quantizable.
    return isinstance(module, nn.Linear) and not isinstance(
        module, nn.modules.linear.NonDynamicallyQuantizableLinear)


@torch.no_grad()
def quantize_dynamic_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (CPU, inference) whose Linear layers compute in int8 with dynamic activation scales.

    Args:
        model: a float model on the CPU (finalize a Sparsifier, or
            :func:`~sparseforge.quant.qat_convert` a QAT model, first). A bare
            ``nn.Linear`` works too.
        inplace: replace the layers of ``model`` itself instead of a copy
            (default False: ``model`` is left unchanged).

    Returns the quantized model, in eval mode. Rule (see the module
    docstring): per-channel symmetric int8 weights by the RTN rule of
    :mod:`sparseforge.quant.rtn` (zeros stay 0, kept weights nonzero; recorded
    int8 per-channel codes are reused exactly), activations quantized per
    batch from their range (PyTorch's dynamic quantized Linear, fbgemm/x86
    kernels); other modules unchanged.

    The kernels and why they were chosen over torchao and a hand-written
    ``torch._int_mm`` path are in the module docstring; the measurements in
    ``bench/README.md`` (``python -m sparseforge.bench quant-speed``).

    Raises :class:`SparseforgeError` when this torch build lacks the quantized
    kernels (saying what to install), or when a Linear lives off the CPU.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = quantize_dynamic_int8(torch.nn.Sequential(lin))
        >>> x = torch.randn(4, 64)
        >>> bool(((q(x) - lin(x)).norm() / lin(x).norm()) < 0.05)
        True
    """
    nnqd = _kernels()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.device.type != "cpu":
            raise SparseforgeError(
                f"{name or 'model'} is on {m.weight.device}: dynamic int8 runs on the CPU; move the model "
                "with model.cpu() first")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if _swappable(model):
        return _dynamic_linear(nnqd, model, "weight")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _swappable(child):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, _dynamic_linear(nnqd, child, f"{full}.weight"))
    return model
