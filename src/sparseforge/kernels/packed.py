"""Packed sparse weights (a bitmask plus the nonzero values) and the Linear layer that runs on them.

Batch-1 token generation reads every weight once per token, so its time
follows the bytes read per weight. Dense bf16 reads 2; a weight packed as a
1-bit mask plus its nonzero values reads ``1/8 + density * value_bytes``:
at 50% density 1.125 bytes with bf16 values and 0.625 with int8, at 90%
sparsity 0.325 and 0.225. This is the idea of SparAMX (Sapphire Rapids,
2025: a 1-bit mask plus compressed bf16 values expanded in registers), and
what :mod:`sparseforge.io.sfz` stores: the same mask bits (in bytes whose bit
order is reversed) and the same value stream, so a file loads into packed
layers without a dense copy (:meth:`PackedWeight.from_bitmask`).

Layout of :class:`PackedWeight` for a weight ``W`` ``[N, K]``:

- ``mask``: int64 ``[N, ceil(K/64)]``; bit ``j`` (least significant first)
  of word ``w`` of row ``n`` is ``W[n, 64 w + j] != 0``;
- ``values``: the nonzeros of ``W`` in row-major order, as float32, bfloat16
  or int8 (int8: per-output-row symmetric codes by the rule of
  :func:`sparseforge.quant.rtn.quantize_weight`, zeros stay zero), followed
  by 64 bytes of zeros (the kernels' vector loads may read past a row's end);
- ``row_ptr``: int64 ``[N + 1]``, where each row's values start;
- ``scales``: float32 ``[N]`` for int8 values (``W ~ codes * scales[:, None]``).

Products (:func:`packed_matmul`) run on the native kernels
(:mod:`sparseforge.kernels.native`) when they are built, or on a plain
PyTorch fallback that unpacks the weight (same results, not faster).
Accumulation is in float32: with float32 values a product equals the dense
product of the masked weight up to summation order; bf16 and int8 values
differ from the float32 weight only by their rounding. The AVX512-BF16
kernel for bf16 values also rounds the activations to bfloat16 (as a dense
bf16 matmul does) and multiplies with ``vdpbf16ps``; the other kernels keep
the activations in float32.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.kernels.native import native

__all__ = ["VALUE_DTYPES", "PackedLinear", "PackedWeight", "pack", "packed_matmul"]

VALUE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
"""Value encodings of a packed weight, by name."""

_PAD_BYTES = 64


def _bits_to_words(nz: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` booleans -> int64 ``[N, ceil(K/64)]`` words, bit j of word w = column 64 w + j."""
    n, k = nz.shape
    kp = -(-k // 64) * 64
    if sys.byteorder == "little":
        # bytes least significant bit first, 8 bytes per little-endian word: numpy packs it in one pass
        padded = np.zeros((n, kp), dtype=bool)
        padded[:, :k] = nz.cpu().numpy()
        words = np.packbits(padded, axis=1, bitorder="little").view(np.int64)
        return torch.from_numpy(words.copy()).to(nz.device)
    padded = torch.zeros(n, kp, dtype=torch.int64, device=nz.device)
    padded[:, :k] = nz.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64, device=nz.device)
    # distinct powers of two: the sum is their bitwise or (bit 63 wraps to the sign bit, as intended)
    return (padded.reshape(n, kp // 64, 64) << shifts).sum(dim=2)


def _words_to_bits(mask: torch.Tensor, k: int) -> torch.Tensor:
    shifts = torch.arange(64, dtype=torch.int64, device=mask.device)
    bits = (mask.unsqueeze(2) >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :k].bool()


# byte -> the byte with its bits in reverse order: np.packbits writes the first column in the most
# significant bit, the packed words hold it in the least significant one
_BIT_REVERSE = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], dtype=np.uint8)
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.int64)


def _words_from_msb_stream(stream: np.ndarray, n: int, k: int) -> torch.Tensor:
    """``np.packbits`` of a row-major ``[n, k]`` boolean (most significant bit first) -> ``[n, ceil(k/64)]`` words."""
    kw = -(-k // 64)
    if k % 8 == 0 and sys.byteorder == "little":
        # whole bytes per row: reverse the bits of each byte, pad rows to whole words, read as int64
        rows = np.zeros((n, kw * 8), dtype=np.uint8)
        rows[:, : k // 8] = _BIT_REVERSE[stream[: n * k // 8]].reshape(n, k // 8)
        return torch.from_numpy(rows.view(np.int64).copy())
    bits = np.unpackbits(stream, count=n * k).astype(bool).reshape(n, k)
    return _bits_to_words(torch.from_numpy(bits))


def _msb_stream_from_words(mask: torch.Tensor, n: int, k: int) -> np.ndarray:
    """The inverse of :func:`_words_from_msb_stream`: ``np.packbits`` of the row-major ``[n, k]`` boolean."""
    if k % 8 == 0 and sys.byteorder == "little":
        rows = mask.cpu().contiguous().numpy().view(np.uint8).reshape(n, -1)[:, : k // 8]
        return _BIT_REVERSE[rows].reshape(-1)
    return np.packbits(_words_to_bits(mask.cpu(), k).numpy().reshape(-1))


@dataclass
class PackedWeight:
    """A weight ``[out_features, in_features]`` packed as bitmask + values (layout in the module docstring)."""

    mask: torch.Tensor
    values: torch.Tensor
    row_ptr: torch.Tensor
    scales: torch.Tensor | None
    in_features: int
    out_features: int

    @property
    def value_dtype(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"int8"``."""
        return {v: k for k, v in VALUE_DTYPES.items()}[self.values.dtype]

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: mask, the nonzero values (without the padding), row starts and scales."""
        parts = [self.mask, self.row_ptr] + ([self.scales] if self.scales is not None else [])
        return sum(t.numel() * t.element_size() for t in parts) + self.nnz * self.values.element_size()

    @classmethod
    def from_bitmask(cls, stream: np.ndarray | torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None,
                     out_features: int, in_features: int) -> PackedWeight:
        """Build from the bitmask encoding of an ``.sfz`` file: ``np.packbits`` of ``weight != 0`` (row-major,
        most significant bit first), the nonzero values in row-major order (float32, bfloat16 or int8
        codes) and, for int8, one float32 scale per output row. No dense weight is built."""
        stream = stream.numpy() if isinstance(stream, torch.Tensor) else np.asarray(stream)
        stream = stream.astype(np.uint8, copy=False).reshape(-1)
        n, k = out_features, in_features
        if stream.size != (n * k + 7) // 8:
            raise SparseforgeError(f"a bitmask of a [{n}, {k}] weight has {(n * k + 7) // 8} bytes, got {stream.size}")
        if values.dtype not in VALUE_DTYPES.values():
            raise SparseforgeError(f"packed values must be float32, bfloat16 or int8, got {values.dtype}")
        mask = _words_from_msb_stream(stream, n, k)
        counts = _POPCOUNT[mask.numpy().view(np.uint8)].reshape(n, -1).sum(axis=1)
        row_ptr = torch.zeros(n + 1, dtype=torch.int64)
        row_ptr[1:] = torch.from_numpy(np.cumsum(counts))
        nnz = int(row_ptr[-1])
        if values.numel() != nnz:
            raise SparseforgeError(f"the bitmask has {nnz} nonzeros but {values.numel()} values are given")
        if (scales is None) != (values.dtype != torch.int8):
            raise SparseforgeError("int8 values need scales (one per output row); other values take none")
        if scales is not None:
            scales = scales.reshape(-1).to(torch.float32).contiguous()
            if scales.numel() != n:
                raise SparseforgeError(f"int8 values need {n} scales (one per output row), got {scales.numel()}")
        pad = torch.zeros(_PAD_BYTES // values.element_size(), dtype=values.dtype)
        return cls(mask, torch.cat([values.reshape(-1).cpu(), pad]).contiguous(), row_ptr, scales, k, n)

    def to_bitmask(self) -> tuple[np.ndarray, torch.Tensor]:
        """The ``.sfz`` bitmask encoding (inverse of :meth:`from_bitmask`): the mask stream and the values."""
        return (_msb_stream_from_words(self.mask, self.out_features, self.in_features),
                self.values[: self.nnz].cpu())

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense tensor: the values (times the scales for int8) where the mask is set."""
        m = native(build=False) if self.mask.device.type == "cpu" else None
        if m is not None:
            return m.packed_unpack(self.mask, self.values, self.row_ptr, self.scales, self.in_features, 0,
                                   self.out_features, dtype)
        nz = _words_to_bits(self.mask, self.in_features)
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.mask.device)
        dense[nz] = self.values[: self.nnz].to(torch.float32)
        if self.scales is not None:
            dense *= self.scales.to(torch.float32).unsqueeze(1)
        return dense.to(dtype)


@torch.no_grad()
def pack(weight: torch.Tensor, values: str = "bf16") -> PackedWeight:
    """Pack a 2-D weight as bitmask + values; its zeros are the mask.

    Args:
        weight: ``[out_features, in_features]``, any float dtype.
        values: ``"fp32"`` (exact for a float32 weight), ``"bf16"`` (default;
            each kept value rounded to bfloat16) or ``"int8"`` (per-row
            symmetric codes and float32 scales, the rule of
            :func:`sparseforge.quant.rtn.quantize_weight`; a kept value under
            half a step becomes a stored 0, its mask bit stays set).

    Example:
        >>> w = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
        >>> p = pack(w, "fp32")
        >>> p.nnz, p.row_ptr.tolist(), torch.equal(p.to_dense(), w)
        (3, [0, 2, 3], True)
    """
    if values not in VALUE_DTYPES:
        raise SparseforgeError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    if weight.dim() != 2:
        raise SparseforgeError(f"pack takes a 2-D weight [out, in], got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise SparseforgeError(f"pack takes a floating-point weight, got {weight.dtype}")
    w = weight.detach().to(torch.float32).contiguous()
    if not torch.isfinite(w).all():
        raise SparseforgeError("the weight has NaN or infinite values: cannot pack it")
    nz = w != 0
    scales = None
    if values == "int8":
        from sparseforge.quant.rtn import quantize_weight  # the one int8 rounding rule

        qt = quantize_weight(w, bits=8, group_size=None)
        kept = qt.q[nz]
        scales = qt.scale.reshape(-1).to(torch.float32).contiguous()
    else:
        kept = w[nz].to(VALUE_DTYPES[values])
    pad = torch.zeros(_PAD_BYTES // kept.element_size(), dtype=kept.dtype, device=kept.device)
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(nz.sum(dim=1), 0)
    return PackedWeight(_bits_to_words(nz), torch.cat([kept, pad]).contiguous(), row_ptr, scales,
                        w.shape[1], w.shape[0])


def packed_matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x @ W.T`` in float32 for ``x`` ``[B, in_features]`` and a packed ``W``: the native kernel, or the fallback."""
    m = native() if x.device.type == "cpu" else None
    if m is not None:
        return m.packed_matmul(x, weight.mask, weight.values, weight.row_ptr, weight.scales, weight.in_features)
    return F.linear(x.to(torch.float32), weight.to_dense(torch.float32))


def _huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied into memory advised for 2 MiB pages when the native kernels are there and it is that large."""
    m = native(build=False) if t.device.type == "cpu" else None
    return m.huge_page_copy(t) if m is not None and hasattr(m, "huge_page_copy") else t


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is a :class:`PackedWeight` (bitmask + values).

    Rule of ``forward``: inputs are flattened to ``[M, in_features]``; when
    ``M <= dense_above`` (or ``dense_above`` is None) the packed kernel
    computes the product, reading only the mask and the nonzeros (the
    batch-1 to small-batch regime, bound by memory bandwidth); above it the
    weight is unpacked in blocks of rows into bfloat16 (float32 for float32
    values) and multiplied densely, where the hardware's dense units (AMX)
    beat any sparse product. The result has the input's dtype; the bias is
    added in float32.

    Args of :meth:`from_dense`: the ``nn.Linear``, ``values`` (``"bf16"``
    default, ``"fp32"``, ``"int8"``) and ``dense_above`` (default None:
    always the packed kernel; :func:`sparseforge.to_sparse` sets it from
    measurements).
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, dense_above: int | None = None) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.dense_above = dense_above
        self.register_buffer("mask", _huge_pages(packed.mask))
        self.register_buffer("values", _huge_pages(packed.values))
        self.register_buffer("row_ptr", packed.row_ptr)
        self.register_buffer("scales", packed.scales if packed.scales is not None else torch.empty(0))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, values: str = "bf16", dense_above: int | None = None) -> PackedLinear:
        """Pack ``linear``'s weight (its zeros are the mask)."""
        if not isinstance(linear, nn.Linear):
            raise SparseforgeError(f"PackedLinear.from_dense takes an nn.Linear, got {type(linear).__name__}")
        return cls(pack(linear.weight, values), linear.bias, dense_above)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.mask, self.values, self.row_ptr, self.scales if self.scales.numel() else None,
                            self.in_features, self.out_features)

    @property
    def value_dtype(self) -> str:
        return self.packed.value_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (float32), computed on each access: for inspection, not for the forward pass."""
        return self.packed.to_dense(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparseforgeError(
                f"PackedLinear expects inputs with {self.in_features} features, got shape {list(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if self.dense_above is None or rows <= self.dense_above:
            y = packed_matmul(flat, self.packed)
            if self.bias is not None:
                y += self.bias
        else:
            y = self._dense_blocks(flat)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _dense_blocks(self, flat: torch.Tensor) -> torch.Tensor:
        compute = torch.float32 if self.values.dtype == torch.float32 else torch.bfloat16
        xc = flat.to(compute)
        out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32, device=flat.device)
        p = self.packed
        m = native(build=False)
        step = max(64, (1 << 20) // max(1, self.in_features * 2))  # ~1-2 MB of unpacked rows: stays in L2
        for n0 in range(0, self.out_features, step):
            n1 = min(self.out_features, n0 + step)
            if m is not None:
                block = m.packed_unpack(p.mask, p.values, p.row_ptr, p.scales, self.in_features, n0, n1, compute)
            else:
                block = p.to_dense(compute)[n0:n1]
            b = None if self.bias is None else self.bias[n0:n1].to(compute)
            out[:, n0:n1] = F.linear(xc, block, b)
        return out

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the unpacked weight (float32) and the bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def get_extra_state(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "dense_above": self.dense_above}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.dense_above = state.get("dense_above")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # any number of nonzeros and any value dtype load
        for key in ("mask", "values", "row_ptr", "scales", "bias"):
            t = state_dict.get(prefix + key)
            own = getattr(self, key)
            if t is not None and own is not None:
                setattr(self, key, torch.empty_like(t, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        p = self.packed
        density = p.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, values={self.value_dtype}, "
                f"density={density:.3f}, bias={self.bias is not None}, dense_above={self.dense_above}")

