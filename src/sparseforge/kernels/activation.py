"""Activation sparsity at decode: skip the weight columns whose input is (near) zero.

TEAL ("Training-Free Activation Sparsity in Large Language Models", Liu et
al., 2024), after "The Lazy Neuron Phenomenon" (Li et al., 2023) and CHESS
(2024): the hidden states entering a transformer's projections are
concentrated around zero, so zeroing the inputs under a per-layer magnitude
threshold costs little quality, and a batch-1 product then needs only the
weight columns of the inputs that remain. With weight sparsity on top, only
the nonzeros of those columns are read: the two compose.

Rule (:func:`calibrate_thresholds`): for each target Linear, the threshold
is the ``sparsity`` quantile of ``|x|`` over its inputs on calibration data
(layers that share an input, q/k/v or gate/up, get the same threshold).
:class:`ActivationSparseLinear` zeroes inputs with ``|x| <= threshold`` on
every call, so quality measured with it is what decoding gets; at one input
row it runs the column-block kernel of :mod:`sparseforge.kernels.native`,
which reads the packed weight only for the surviving inputs, otherwise it
unpacks the weight and runs a dense matmul (prefill).

Layout: the weight's rows are cut into blocks of 256 (:data:`COLUMN_BLOCK`);
block ``b`` stores ``W[256 b : 256 (b + 1)].T`` in the bitmask format of
:mod:`sparseforge.kernels.packed` (mask ``[K, 4]`` words, values column
after column) with absolute value offsets ``cptr[b, k]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.kernels.native import native
from sparseforge.kernels.packed import PackedLinear, _huge_pages, pack

__all__ = ["COLUMN_BLOCK", "ActivationSparseLinear", "ActivationSparsityReport", "activation_sparsity",
           "calibrate_thresholds"]

COLUMN_BLOCK = 256
"""Rows per column block (the native kernel keeps a block's 256 sums in 16 AVX-512 registers)."""

_PAD_BYTES = 64
_SAMPLE = 1 << 20  # |x| values kept per layer for the quantile (a uniform subsample beyond it)


class ActivationSparseLinear(nn.Module):
    """An inference-only Linear that zeroes inputs with ``|x| <= threshold`` and skips their weight columns.

    Built by :meth:`from_linear` from an ``nn.Linear`` or a
    :class:`~sparseforge.kernels.packed.PackedLinear` (its zeros are kept
    out of the packed columns). ``values``: ``"bf16"`` (default) or
    ``"fp32"``. ``threshold`` (default 0.0: only exact zeros are skipped)
    is set by :func:`activation_sparsity` from calibration data. Outputs
    equal ``F.linear(x * (|x| > threshold), W, b)`` for the stored ``W`` up to
    summation order (activations stay float32 in the batch-1 kernel).
    """

    def __init__(self, cmask: torch.Tensor, values: torch.Tensor, cptr: torch.Tensor, in_features: int,
                 out_features: int, bias: torch.Tensor | None, threshold: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("cmask", _huge_pages(cmask))
        self.register_buffer("values", _huge_pages(values))
        self.register_buffer("cptr", cptr)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, layer: nn.Module, values: str = "bf16", threshold: float = 0.0) -> ActivationSparseLinear:
        """Pack ``layer``'s weight in column blocks (``nn.Linear`` or ``PackedLinear``)."""
        if isinstance(layer, PackedLinear):
            weight, bias = layer.weight, layer.bias
        elif isinstance(layer, nn.Linear):
            weight, bias = layer.weight.detach(), layer.bias
        else:
            raise SparseforgeError(f"ActivationSparseLinear.from_linear takes an nn.Linear or PackedLinear, "
                                   f"got {type(layer).__name__}")
        if values not in ("bf16", "fp32"):
            raise SparseforgeError(f"column-packed values must be 'bf16' or 'fp32', got {values!r}")
        n, k = weight.shape
        blocks = -(-n // COLUMN_BLOCK)
        padded = torch.zeros(blocks * COLUMN_BLOCK, k, dtype=torch.float32)
        padded[:n] = weight.to(torch.float32)
        masks, chunks, ptrs, offset = [], [], [], 0
        for b in range(blocks):
            p = pack(padded[b * COLUMN_BLOCK:(b + 1) * COLUMN_BLOCK].T, values)
            masks.append(p.mask)
            chunks.append(p.values[: p.nnz])
            ptrs.append(p.row_ptr + offset)
            offset += p.nnz
        vals = torch.cat(chunks + [torch.zeros(_PAD_BYTES // chunks[0].element_size(), dtype=chunks[0].dtype)])
        return cls(torch.stack(masks).contiguous(), vals.contiguous(), torch.stack(ptrs).contiguous(), k, n, bias,
                   threshold)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight ``[out, in]`` as a dense tensor."""
        m = native(build=False)
        blocks = []
        for b in range(self.cmask.shape[0]):
            if m is not None:
                wt = m.packed_unpack(self.cmask[b], self.values, self.cptr[b], None, COLUMN_BLOCK, 0,
                                     self.in_features, torch.float32)
            else:
                from sparseforge.kernels.packed import PackedWeight

                wt = PackedWeight(self.cmask[b], self.values, self.cptr[b], None, COLUMN_BLOCK,
                                  self.in_features).to_dense(torch.float32)
            blocks.append(wt.T)
        return torch.cat(blocks)[: self.out_features].to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (float32), computed on each access: for inspection."""
        return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparseforgeError(
                f"ActivationSparseLinear expects inputs with {self.in_features} features, got shape {list(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        t = float(self.threshold)
        m = native() if flat.device.type == "cpu" else None
        if flat.shape[0] == 1 and m is not None:
            y = m.colpacked_matvec(flat[0], self.cmask, self.values, self.cptr, self.out_features, t).unsqueeze(0)
            if self.bias is not None:
                y = y + self.bias
        else:
            kept = torch.where(flat.abs() > t, flat, torch.zeros((), dtype=flat.dtype)).to(torch.float32)
            y = F.linear(kept, self.dense_weight(), self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = int(self.cptr[-1, -1])
        return (f"in_features={self.in_features}, out_features={self.out_features}, values="
                f"{'bf16' if self.values.dtype == torch.bfloat16 else 'fp32'}, "
                f"density={nnz / max(1, self.in_features * self.out_features):.3f}, threshold={float(self.threshold):.4g}")


def _targets(model: nn.Module, layers: Sequence[str] | str | None) -> dict[str, nn.Module]:
    import fnmatch

    found = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))}
    if layers is None:
        return found
    globs = [layers] if isinstance(layers, str) else list(layers)
    chosen = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    missing = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in found)]
    if missing:
        raise SparseforgeError(f"layers pattern(s) {missing} match no Linear layer; Linear layers: "
                               f"{', '.join(list(found)[:12]) or 'none'}")
    return chosen


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, calibration: Iterable[Any], sparsity: float,
                         layers: Sequence[str] | str | None = None, seed: int = 0) -> dict[str, float]:
    """Per target Linear, the ``sparsity`` quantile of ``|input|`` over ``calibration`` (TEAL's threshold).

    ``calibration``: model inputs (tensors, tuples or keyword dicts), e.g.
    token id batches for a causal LM. ``layers``: module name globs (default
    every Linear). Up to 2**20 magnitudes per layer are kept (a seeded
    uniform subsample beyond that).
    """
    if not 0.0 <= sparsity < 1.0:
        raise SparseforgeError(f"activation sparsity must be in [0, 1), got {sparsity!r}")
    targets = _targets(model, layers)
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    gen = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().reshape(-1).abs().to(torch.float32)
            if a.numel() > _SAMPLE:
                a = a[torch.randint(0, a.numel(), (_SAMPLE,), generator=gen)]
            samples[name].append(a)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        seen = 0
        for batch in calibration:
            _run(model, batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise SparseforgeError("calibrate_thresholds got no calibration batches")
    thresholds = {}
    for name, parts in samples.items():
        if not parts:
            raise SparseforgeError(f"layer {name!r} saw no input during calibration (is it used by forward?)")
        a = torch.cat(parts)
        if a.numel() > _SAMPLE:
            a = a[torch.randint(0, a.numel(), (_SAMPLE,), generator=gen)]
        thresholds[name] = float(torch.quantile(a, sparsity)) if sparsity > 0 else 0.0
    return thresholds


@dataclass
class ActivationSparsityReport:
    """What :func:`activation_sparsity` did: the threshold per layer and the target sparsity."""

    sparsity: float
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "thresholds": dict(self.thresholds)}


@torch.no_grad()
def activation_sparsity(model: nn.Module, calibration: Iterable[Any], sparsity: float = 0.4,
                        layers: Sequence[str] | str | None = None, values: str = "bf16") -> ActivationSparsityReport:
    """Swap, in place, each target Linear for an :class:`ActivationSparseLinear` with a calibrated threshold.

    TEAL's rule (module docstring): threshold = the ``sparsity`` quantile of
    ``|x|`` over the layer's inputs on ``calibration``; inputs at or under it
    are zeroed and their weight columns skipped. Defaults: ``sparsity=0.4``
    (TEAL reports near-lossless quality at 40-50% on 7B+ models; small
    models lose more, measure it), every Linear (``layers`` takes name
    globs: for a causal LM use ``"model.layers.*"`` to leave the LM head
    dense), ``values="bf16"``. Weight zeros (a pruned or packed layer) are
    kept out of the packed columns.

    Example:
        >>> import torch, sparseforge as sf
        >>> from sparseforge.kernels.activation import activation_sparsity
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> report = activation_sparsity(model, [torch.randn(16, 32)], sparsity=0.5, values="fp32")
        >>> type(model[0]).__name__, round(report.thresholds["0"], 2) > 0
        ('ActivationSparseLinear', True)
    """
    thresholds = calibrate_thresholds(model, calibration, sparsity, layers)
    from sparseforge.targets import set_submodule

    for name, layer in _targets(model, layers).items():
        set_submodule(model, name, ActivationSparseLinear.from_linear(layer, values, thresholds[name]))
    return ActivationSparsityReport(sparsity, thresholds)
