"""Weight-only round-to-nearest (RTN) quantization that keeps zeros zero.

The rule (symmetric, no zero point). A weight ``W`` of shape ``[out, ...]``
is viewed as a matrix ``[out, fan_in]`` (a convolution's ``in/groups x kh x
kw`` flattened, in that order). Its columns are split into groups of
``group_size`` consecutive inputs (``group_size=None``: one group per output
channel, i.e. per-channel quantization). For every (row, group)::

    qmax  = 2**(bits - 1) - 1            # 127 for int8, 7 for int4 (-2**(bits-1) is not used)
    scale = max |w| over the group's kept (nonzero) weights / qmax   (0 when the group is all zero)
    q     = clamp(round(w / scale), -qmax, qmax)
    w'    = q * scale                      # dequantized, in float32

Zeros quantize to exactly 0 (symmetric quantization has no zero point), so
the sparsity pattern survives quantization: a pruned weight is never
revived. A kept weight smaller than half a step rounds to 0, as in any RTN
scheme, so quantization can only add zeros. (Giving such weights the
smallest code of their sign instead, to keep the count of nonzeros, was
tried and is wrong for dense layers: at int4 per channel it moved most of
all-MiniLM-L6-v2's small weights up to one step and the sentence embeddings'
cosine to the float model fell from 0.90 to 0.05.) ``round`` is
round-half-to-even (``torch.round``).

:func:`quantize_` applies this to every Linear/Conv weight of a model in
place (fake quantization: the weight becomes ``w'``) and records the codes
on the module (attribute ``sparseforge_quant``), so that
:func:`sparseforge.save` with ``values="int8"`` stores the codes and scales
exactly instead of quantizing again. int4 codes are stored two per byte
(:func:`pack_int4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

__all__ = [
    "DEFAULT_GROUP_SIZE", "QUANT_ATTR", "QuantScheme", "SCHEMES", "QuantizedTensor", "dequantize", "pack_int4",
    "quantization_of", "quantize_", "quantize_weight", "rounded_to_zero", "unpack_int4",
]

QUANT_ATTR = "sparseforge_quant"
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantScheme:
    """A weight quantization scheme: its bit width, and whether it needs calibration data (GPTQ)."""

    bits: int
    calibrated: bool = False
    summary: str = ""


SCHEMES: Registry[QuantScheme] = Registry("quantization scheme")
"""Quantization schemes by name: ``int8``/``int4`` round to nearest (:func:`quantize_`), ``gptq-int8``/
``gptq-int4`` (:func:`sparseforge.quant.gptq_`, calibrated); the CLI's ``--scheme`` choices."""
SCHEMES.register("int8", QuantScheme(8, summary="symmetric int8, round to nearest"))
SCHEMES.register("int4", QuantScheme(4, summary="symmetric int4 in [-7, 7], round to nearest"))
_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class QuantizedTensor:
    """A weight quantized by :func:`quantize_weight`.

    Attributes:
        q: int8 codes, one per weight, of the weight's ``shape`` (int4 codes
            too, in ``[-7, 7]``; :func:`pack_int4` packs them for storage).
        scale: float32 scales ``[out, n_groups]`` (``n_groups`` 1 when per-channel).
        bits: 8 or 4.
        group_size: inputs per group, or None for per-channel.
        shape: the weight's shape.
        method: how the codes were chosen: ``"rtn"`` (round-to-nearest,
            :func:`quantize_weight`) or ``"gptq"`` (:mod:`sparseforge.quant.gptq`);
            the grid, and so dequantization, is the same.
        rounded_to_zero: how many weights that were nonzero got code 0 (kept
            weights smaller than half a step: quantization made them exact zeros).
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int | None
    shape: tuple[int, ...]
    method: str = "rtn"
    rounded_to_zero: int = 0

    def dequantize(self) -> torch.Tensor:
        """``q * scale`` in float32, of the weight's shape (see :func:`dequantize`)."""
        return dequantize(self.q, self.scale, self.group_size)

    @property
    def scheme(self) -> str:
        return f"int{self.bits}"


def _fan_in(shape: tuple[int, ...] | torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _check(bits: int, group_size: int | None, shape: tuple[int, ...], name: str) -> int:
    """Validate and return the group size actually used (the fan-in when per-channel)."""
    if bits not in (4, 8):
        raise SparseforgeError(f"bits must be 8 or 4, got {bits!r}")
    fan_in = _fan_in(shape)
    if group_size is None:
        return fan_in
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise SparseforgeError(f"group_size must be a positive integer or None (per channel), got {group_size!r}")
    if fan_in % group_size:
        raise SparseforgeError(
            f"{name} has {fan_in} inputs per output channel (shape {list(shape)}), not divisible by "
            f"group_size {group_size}: pick a group size that divides {fan_in}, or group_size=None (per channel)"
        )
    return group_size


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Dequantize codes ``q`` (any integer dtype, the weight's shape) with ``scale`` ``[out, n_groups]``.

    Returns ``q * scale`` in float32, each code multiplied by the scale of its
    (output channel, input group); ``group_size=None`` means one group per channel.
    """
    shape = tuple(q.shape)
    out = shape[0] if shape else 1
    g = _fan_in(shape) if group_size is None else group_size
    codes = q.reshape(out, -1, g).to(torch.float32)
    return (codes * scale.to(torch.float32).reshape(out, -1, 1)).reshape(shape)


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor, bits: int = 8, group_size: int | None = None, name: str = "weight"
) -> QuantizedTensor:
    """Quantize ``w`` symmetrically to ``bits`` (8 or 4) by round-to-nearest, keeping zeros zero.

    Args:
        w: a weight ``[out, ...]`` (Linear ``[out, in]``, Conv ``[out, in/groups, *kernel]``).
        bits: 8 (default) or 4.
        group_size: inputs per scale along the (flattened) input dimension;
            None (default) for one scale per output channel. Must divide the
            fan-in (a clear :class:`SparseforgeError` otherwise); 128 is the
            usual choice for int4 (:data:`DEFAULT_GROUP_SIZE`).
        name: the tensor's name, for error messages.

    The rule is in the module docstring: scales from the largest kept
    magnitude of each group, zeros stay 0.

    Example:
        >>> qt = quantize_weight(torch.tensor([[0.0, 1.0, -0.5, 0.001]]), bits=8)
        >>> qt.q.tolist(), qt.dequantize()[0, 0].item(), qt.rounded_to_zero
        ([[0, 127, -64, 0]], 0.0, 1)
    """
    shape = tuple(w.shape)
    g = _check(bits, group_size, shape, name)
    qmax = 2 ** (bits - 1) - 1
    out = shape[0] if shape else 1
    x = w.detach().to(torch.float32).reshape(out, -1, g)
    if not torch.isfinite(x).all():
        raise SparseforgeError(f"{name} has NaN or infinite values: cannot quantize it")
    amax = x.abs().amax(dim=2)  # zeros never raise the maximum: this is the max over the kept weights
    scale = amax / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(2)
    q = torch.clamp(torch.round(x / safe), -qmax, qmax)
    zeroed = int(((x != 0) & (q == 0)).sum())
    return QuantizedTensor(q.to(torch.int8).reshape(shape), scale, bits, group_size, shape, rounded_to_zero=zeroed)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes (int8 values in [-8, 7], any shape) two per byte: a flat uint8 tensor.

    Code ``i`` of the flattened input goes in the low nibble of byte ``i // 2``
    when ``i`` is even, the high nibble when odd; an odd count is padded with 0.
    """
    flat = codes.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``count`` codes as int8 (sign-extended)."""
    b = packed.reshape(-1).to(torch.int16)
    nib = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=1).reshape(-1)[:count]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def quantization_of(module: nn.Module) -> QuantizedTensor | None:
    """The quantization :func:`quantize_` recorded on ``module``, if it still describes its weight.

    None when the module was not quantized, or when its weight has changed
    since (e.g. trained further): the record no longer holds then.
    """
    qt = getattr(module, QUANT_ATTR, None)
    w = getattr(module, "weight", None)
    if qt is None or not isinstance(w, torch.Tensor) or tuple(w.shape) != qt.shape:
        return None
    return qt if torch.equal(qt.dequantize().to(w.device, w.dtype), w.detach()) else None


@torch.no_grad()
def quantize_(
    model: nn.Module, scheme: str = "int8", group_size: int | None = None, *, embeddings: bool = False
) -> nn.Module:
    """Fake-quantize every Linear/Conv weight of ``model`` in place; returns the model.

    Args:
        model: the model (finalize a Sparsifier first).
        scheme: ``"int8"`` (default) or ``"int4"``, symmetric round-to-nearest
            (:func:`quantize_weight`); GPTQ needs calibration data: :func:`sparseforge.quant.gptq_`.
        group_size: inputs per scale (must divide every layer's fan-in);
            None (default): one scale per output channel.
        embeddings: also quantize ``nn.Embedding`` tables, one scale per row
            (per token; ``group_size`` splits the embedding dimension). Default
            False. In a small transformer the token table is much of the model
            (all-MiniLM-L6-v2: 11.7M of 22.7M parameters), so weight-only
            quantization of its Linear layers alone saves far less than 4x.

    Each weight is replaced by its dequantized value (same dtype and device),
    zeros staying exactly zero, and the codes
    are recorded on the module (``module.sparseforge_quant``) so that
    ``sf.save(model, path, values="int8")`` stores them exactly. All layers
    are checked before any is changed. Kept weights smaller than half a
    step become exact zeros (round to nearest): :func:`rounded_to_zero`
    counts them.
    """
    rtn = [name for name, s in SCHEMES.items() if not s.calibrated]
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise SCHEMES.error(scheme, known=rtn)
    key = SCHEMES.canonical(scheme)
    if SCHEMES.get(key).calibrated:
        raise SparseforgeError(f"{scheme!r} needs calibration data: use sparseforge.quant.gptq_(model, batches, "
                               f"{scheme!r}) (CLI: sparseforge quantize --scheme {key}), or {'/'.join(rtn)} here")
    bits = SCHEMES.get(key).bits
    kinds = _LAYERS + ((nn.Embedding,) if embeddings else ())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    for name, m in layers:  # fail before changing anything
        _check(bits, group_size, tuple(m.weight.shape), f"{name or 'model'}.weight")
    for name, m in layers:
        qt = quantize_weight(m.weight, bits, group_size, f"{name}.weight")
        m.weight.copy_(qt.dequantize().to(m.weight.dtype))
        setattr(m, QUANT_ATTR, qt)
    return model


def rounded_to_zero(model: nn.Module) -> int:
    """How many kept (nonzero) weights quantization turned into exact zeros, over ``model``'s quantized layers.

    The sum of :attr:`QuantizedTensor.rounded_to_zero` over the layers whose
    record still describes their weight (:func:`quantization_of`), after
    :func:`quantize_` or :func:`sparseforge.quant.gptq_`. Round to nearest
    maps a weight smaller than half a step to 0, so a quantized model can
    have more zeros than the pruned one.
    """
    return sum(qt.rounded_to_zero for m in model.modules() if (qt := quantization_of(m)) is not None)
