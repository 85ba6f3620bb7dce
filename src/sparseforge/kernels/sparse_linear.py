"""Run sparse Linear layers with sparse kernels, only where this machine makes them faster.

:class:`SparseLinear` is an inference-only drop-in for ``nn.Linear`` whose
weight is stored compressed, as CSR (any zero pattern) or BSR (block-sparse
patterns), with int32 indices. :func:`to_sparse` times, on this machine,
each Linear layer that has zeros, dense against every candidate format, and
swaps in a :class:`SparseLinear` only where it is measurably faster.

What was measured on this project's CPU (torch 2.13.0, 1 thread, 4096x4096
weight, 90% zeros; ``bench/README.md``, section speed, has the benchmark):

- ``torch.sparse.mm(W_csr, x.T).T`` with int32 indices: about 2x faster than
  dense at batch 1 (``torch.addmv``, used for one row: 4-5x), 5x at 8, 2x at
  64 and 256. With int64 indices it is slower; ``F.linear(x, W_csr)`` (which multiplies ``x @ W_csr.T``) is about
  as fast at batch 1, 4x slower than ``W @ x.T`` at batch 8 and 2.3-2.6x
  *slower than dense* at 64 and 256, so this module always uses the
  ``W @ x.T`` orientation (``addmv`` for one row).
- BSR (``torch.sparse.mm`` with a block-sparse weight) is supported on CPU:
  with 8x8 blocks at 90% block sparsity it is a little slower than CSR's
  ``addmv`` at batch 1 (0.78 vs 0.65 ms) and faster from batch 8-64 on (33
  vs 49 ms at batch 256); ``addmv`` with BSR is slower than ``mm``, so only
  CSR uses it. With 16x16 and 32x32 blocks BSR was *slower than CSR* at
  batch 8-64 (3.3 vs 1.6 ms at batch 8). Hence both are candidates and the
  measurement decides.
- Small layers (LeNet-300-100's 100x300 and 10x100) at batch 1: the sparse
  call's fixed cost (a few microseconds) is as much as the dense matmul, so
  they stay dense; its 300x784 layer gains 1.6x.

On CUDA, a weight with the 2:4 pattern (at most 2 nonzeros in every 4
consecutive inputs) can use ``torch.sparse.to_sparse_semi_structured``
(:class:`SemiStructuredLinear`), where the installed PyTorch and GPU support
it; it is a candidate like the others and timed the same way.

Saving and loading: a :class:`SparseLinear`'s ``state_dict`` holds its CSR
or BSR components (``crow_indices``, ``col_indices`` as int32 buffers,
``values`` and ``bias``) and an extra state with the layout, block size and
shape; loading accepts any number of nonzeros (the buffers are resized), so
``SparseLinear.from_dense(nn.Linear(i, o)).load_state_dict(sd)`` restores
any saved layer of that shape, and :func:`load_sparse_state_dict` restores a
whole converted model into a fresh dense one. :meth:`SparseLinear.to_dense`
gives back the ``nn.Linear``.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.targets import set_submodule
from sparseforge.timing import median_ms, time_interleaved

__all__ = [
    "FORMATS", "LayerChoice", "SemiStructuredLinear", "SparseLinear", "ToSparseReport",
    "detect_blocksize", "is_2to4", "load_sparse_state_dict", "to_sparse",
]

FORMATS: tuple[str, ...] = ("csr", "bsr", "2:4")
"""The formats :func:`to_sparse` knows: CSR, BSR (CPU and CUDA), 2:4 semi-structured (CUDA only)."""

BLOCK_SIZES: tuple[int, ...] = (32, 16, 8, 4)
"""Block sizes :func:`detect_blocksize` tries, largest first."""


def _quiet_sparse(fn, *args, **kwargs):
    # torch warns "sparse CSR support is in beta" on first use; the warning says nothing actionable here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return fn(*args, **kwargs)


def detect_blocksize(weight: torch.Tensor, max_overhead: float = 1.25) -> int | None:
    """The largest block size ``b`` in :data:`BLOCK_SIZES` that suits BSR storage of ``weight``, or None.

    Rule: ``b`` divides both dimensions, and storing every ``b x b`` block
    that holds a nonzero stores at most ``max_overhead`` (default 1.25) times
    the number of nonzeros. A ``block:8`` pruned weight gives 8; an
    unstructured one at 90% sparsity gives None (even 4x4 blocks would store
    about 6x its nonzeros).
    """
    out_f, in_f = weight.shape
    nnz = int(torch.count_nonzero(weight))
    if nnz == 0:
        return None
    for b in BLOCK_SIZES:
        if out_f % b or in_f % b:
            continue
        blocks = (weight != 0).reshape(out_f // b, b, in_f // b, b).any(dim=(1, 3))
        if int(blocks.sum()) * b * b <= max_overhead * nnz:
            return b
    return None


def is_2to4(weight: torch.Tensor) -> bool:
    """True when every 4 consecutive inputs of every output row hold at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as CSR or BSR (int32 indices); inference only.

    Computes ``torch.sparse.mm(W, x.T).T + b`` (``torch.addmv`` for a single
    row), which on CPU is much faster than ``F.linear(x, W_sparse)`` at batch
    sizes above 1 (see the module docstring). Inputs of any shape ``[..., in]``
    are flattened to 2-D and the result reshaped to ``[..., out]``. There is
    no backward pass through the weight (``values`` does not require grad):
    use it under ``torch.no_grad()`` / ``torch.inference_mode()``.

    Build one with :meth:`from_dense`; :meth:`to_dense` gives the ``nn.Linear``
    back. The ``state_dict`` holds ``crow_indices``, ``col_indices`` (int32),
    ``values`` (``[nnz]`` for CSR, ``[blocks, b, b]`` for BSR), ``bias`` if
    any, and an extra state ``{"layout", "blocksize", "in_features",
    "out_features", "bias"}``; loading one resizes the buffers to it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 layout: str = "csr", blocksize: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if layout not in ("csr", "bsr"):
            raise SparseforgeError(f"SparseLinear layout must be 'csr' or 'bsr', got {layout!r}")
        if layout == "bsr" and (not blocksize or out_features % blocksize or in_features % blocksize):
            raise SparseforgeError(
                f"a BSR SparseLinear needs a block size dividing both {out_features} and {in_features}, got {blocksize!r}"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.layout = layout
        self.blocksize = int(blocksize) if layout == "bsr" else None
        dtype = dtype or torch.get_default_dtype()
        rows = out_features // self.blocksize if self.blocksize else out_features
        self.register_buffer("crow_indices", torch.zeros(rows + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int32, device=device))
        vshape = (0, self.blocksize, self.blocksize) if self.blocksize else (0,)
        self.values = nn.Parameter(torch.zeros(vshape, dtype=dtype, device=device), requires_grad=False)
        self.register_parameter(
            "bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self._cache: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, layout: str = "csr", blocksize: int | None = None) -> SparseLinear:
        """Compress ``linear`` (its weight's zeros are dropped; the result computes the same outputs).

        ``layout``: ``"csr"`` (default) or ``"bsr"``; for BSR, ``blocksize``
        defaults to :func:`detect_blocksize` of the weight and is required to
        divide both dimensions.
        """
        if not isinstance(linear, nn.Linear):
            raise SparseforgeError(f"SparseLinear.from_dense takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if layout == "bsr" and blocksize is None:
            blocksize = detect_blocksize(w)
            if blocksize is None:
                raise SparseforgeError(
                    f"the {tuple(w.shape)} weight has no block structure for BSR (tried blocks {BLOCK_SIZES}); "
                    "pass blocksize= or use layout='csr'"
                )
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, layout=layout,
                     blocksize=blocksize, dtype=w.dtype, device=w.device)
        if layout == "csr":
            sparse = _quiet_sparse(w.to_sparse_csr)
        else:
            sparse = _quiet_sparse(w.to_sparse_bsr, (module.blocksize, module.blocksize))
        module.crow_indices = sparse.crow_indices().to(torch.int32)
        module.col_indices = sparse.col_indices().to(torch.int32)
        module.values = nn.Parameter(sparse.values().clone(), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @property
    def nnz(self) -> int:
        """Stored values (for BSR: every value of every stored block, zeros inside blocks included)."""
        return self.values.numel()

    def weight(self) -> torch.Tensor:
        """The sparse weight tensor.

        Cached: it shares memory with the ``crow_indices``/``col_indices``/
        ``values`` tensors, so in-place edits and same-shape loads show
        through; the cache is dropped when one is replaced, on ``.to()``/
        ``.half()``/... and on ``load_state_dict``. (The check per call would
        cost several microseconds, as much as a small layer's matmul.)
        """
        w = self._cache
        if w is None:
            size = (self.out_features, self.in_features)
            build = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
            w = _quiet_sparse(build, self.crow_indices, self.col_indices, self.values.detach(), size=size)
            self._cache = w
        return w

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("crow_indices", "col_indices", "values"):
            self.__dict__["_cache"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(), ...: tensors may be replaced
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) rebuilds the sparse tensor from its own copied components.
        return {**self.__dict__, "_cache": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` for ``x`` of shape ``[..., in_features]``."""
        w = self._cache if self._cache is not None else self.weight()
        bias = self._parameters.get("bias")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.shape[0] == 1 and self.layout == "csr":   # addmv: 2x faster than mm for CSR; slower for BSR
            y = (torch.mv(w, x2[0]) if bias is None else torch.addmv(bias, w, x2[0])).unsqueeze(0)
        else:
            # W @ x.T is the fast orientation, but its transpose is column-major: hand it on
            # row-major (one pass, fused with the bias), or every op downstream (a reshape,
            # LayerNorm over the last dim) pays for the strided layout, and to_sparse's timing,
            # which runs this forward, would not see that cost.
            yt = torch.sparse.mm(w, x2.T)
            y = torch.empty((x2.shape[0], self.out_features), dtype=yt.dtype, device=yt.device)
            if bias is None:
                y.copy_(yt.T)
            else:
                torch.add(yt.T, bias, out=y)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (zeros restored), on the same device and dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        linear.weight.copy_(self.weight().to_dense())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def get_extra_state(self) -> dict[str, Any]:
        return {"layout": self.layout, "blocksize": self.blocksize, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features):
            raise SparseforgeError(
                f"cannot load a {state['out_features']}x{state['in_features']} SparseLinear state into a "
                f"{self.out_features}x{self.in_features} one"
            )
        self.layout = state["layout"]
        self.blocksize = state["blocksize"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The number of nonzeros (and the layout) of the saved layer may differ from this one's:
        # take the saved shapes before the parent copies the values in.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
            if extra["bias"] and self.bias is None:
                self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.values.dtype,
                                                     device=self.values.device), requires_grad=False)
            elif not extra["bias"]:
                self.bias = None
        for name in ("crow_indices", "col_indices", "values"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(saved, torch.Tensor) and saved.shape != current.shape:
                fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
                if name == "values":
                    self.values = nn.Parameter(fresh, requires_grad=False)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._cache = None

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}{block}, density={density:.3f}")


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with a 2:4 weight as a CUDA ``SparseSemiStructuredTensor``; inference only.

    Needs a CUDA GPU with semi-structured sparsity support (compute capability
    8.0+) and a PyTorch with ``torch.sparse.to_sparse_semi_structured``; the
    dtype and shape limits are PyTorch's (e.g. fp16/bf16, both dimensions
    multiples of 64 or so): :meth:`from_dense` raises a
    :class:`SparseforgeError` quoting PyTorch's reason when they are not met.
    Not saved through ``state_dict`` in compressed form: save the dense model.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        to_ss = getattr(torch.sparse, "to_sparse_semi_structured", None)
        if to_ss is None:
            raise SparseforgeError("this PyTorch has no torch.sparse.to_sparse_semi_structured (2:4 needs torch >= 2.1)")
        if not is_2to4(linear.weight):
            raise SparseforgeError("the weight is not 2:4 along its inputs: prune it with pattern='2:4' first")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        try:
            w = to_ss(linear.weight.detach().contiguous())
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            raise SparseforgeError(f"2:4 semi-structured conversion failed: {e}") from e
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SemiStructuredLinear:
        """Compress a 2:4 ``linear`` on CUDA (raises :class:`SparseforgeError` where unsupported)."""
        return cls(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*lead, self.out_features)


@dataclass
class LayerChoice:
    """What :func:`to_sparse` measured and chose for one Linear layer.

    ``format`` is ``"dense"`` (kept) or the format swapped in; ``times_ms``
    maps each batch size measured to ``{"dense": ms, "<format>": ms, ...}``
    (median per call); ``reason`` says why in words.
    """

    name: str
    shape: tuple[int, int]
    density: float
    format: str
    blocksize: int | None = None
    speedup: float | None = None
    reason: str = ""
    times_ms: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class ToSparseReport:
    """Per-layer choices of :func:`to_sparse` and the rule's settings."""

    layers: list[LayerChoice]
    batch_size: int
    check_batch_sizes: tuple[int, ...]
    min_speedup: float
    formats: tuple[str, ...]
    threads: int

    @property
    def converted(self) -> list[str]:
        """Names of the layers that were swapped for a sparse module."""
        return [c.name for c in self.layers if c.format != "dense"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "check_batch_sizes": list(self.check_batch_sizes),
            "min_speedup": self.min_speedup, "formats": list(self.formats), "threads": self.threads,
            "layers": [asdict(c) | {"shape": list(c.shape),
                                    "times_ms": {str(b): t for b, t in c.times_ms.items()}} for c in self.layers],
        }

    def __str__(self) -> str:
        lines = [f"{'layer':24s} {'shape':>12s} {'density':>8s} {'format':>7s} {'speedup':>8s}  reason"]
        for c in self.layers:
            shape = f"{c.shape[0]}x{c.shape[1]}"
            sp = f"{c.speedup:.2f}x" if c.speedup is not None else "-"
            fmt = c.format + (f"/{c.blocksize}" if c.blocksize else "")
            lines.append(f"{c.name:24s} {shape:>12s} {c.density:8.3f} {fmt:>7s} {sp:>8s}  {c.reason}")
        return "\n".join(lines)


def _check_batch(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SparseforgeError(f"{name} must be a positive integer, got {value!r}")
    return value


def _candidates(name: str, layer: nn.Linear, formats: Sequence[str], blocksize: int | None,
                notes: list[str]) -> dict[str, nn.Module]:
    w = layer.weight.detach()
    found: dict[str, nn.Module] = {}
    for fmt in formats:
        if fmt == "csr":
            found["csr"] = SparseLinear.from_dense(layer, "csr")
        elif fmt == "bsr":
            b = blocksize if blocksize is not None else detect_blocksize(w)
            if b is None:
                notes.append("no block structure for bsr")
            elif w.shape[0] % b or w.shape[1] % b:
                notes.append(f"bsr block {b} does not divide {tuple(w.shape)}")
            else:
                found["bsr"] = SparseLinear.from_dense(layer, "bsr", b)
        elif fmt == "2:4":
            if not w.is_cuda:
                continue  # CPU: no 2:4 kernel; not worth a note on every layer
            try:
                module = SemiStructuredLinear(layer)
                # Untested GPU/dtype combinations may fail only at the first matmul: check one here.
                x = torch.randn(8, layer.in_features, dtype=w.dtype, device=w.device)
                if not torch.allclose(module(x), layer(x), rtol=1e-2, atol=1e-2):
                    raise SparseforgeError("2:4 output differs from dense")
                found["2:4"] = module
            except (SparseforgeError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                notes.append(f"2:4: {e}")
    return found


def to_sparse(
    model: nn.Module,
    *,
    batch_size: int = 1,
    check_batch_sizes: Sequence[int] = (8, 64, 256),
    min_speedup: float = 1.1,
    formats: Sequence[str] = ("csr", "bsr", "2:4"),
    layers: Sequence[str] | str | None = None,
    blocksize: int | None = None,
    rounds: int = 7,
) -> ToSparseReport:
    """Swap, in place, each Linear layer with zeros for a sparse module where that is faster here.

    Rule, per ``nn.Linear`` selected by ``layers``: a layer without zeros is
    kept dense, untimed. Otherwise the dense layer and each candidate format
    are timed on this machine, on random inputs of the layer's dtype and
    device: interleaved blocks, order flipping every round, the median of
    ``rounds`` blocks (:func:`sparseforge.timing.time_interleaved`), first at
    ``batch_size`` and then at each of ``check_batch_sizes``. A format
    qualifies when it is at least ``min_speedup`` times faster than dense at
    ``batch_size`` *and* not slower than dense (speedup >= 1) at every size in
    ``check_batch_sizes`` (sparse kernels lose their edge as the batch grows,
    so the large sizes guard "never slower than dense"). Among the qualifying
    formats the one with the highest geometric-mean speedup over the batch
    sizes measured replaces the layer (CSR and BSR can tie at batch 1 while
    BSR wins at large batches); if none qualifies the layer stays dense. Outputs equal the dense layer's to float
    rounding. Candidates: ``"csr"`` (any pattern), ``"bsr"`` (only when the
    zeros form blocks, :func:`detect_blocksize`, or ``blocksize`` is given),
    ``"2:4"`` (only for 2:4 weights on CUDA, with PyTorch's semi-structured
    support). The converted modules are inference-only.

    Args:
        model: the model, modified in place (its Linear layers are replaced).
        batch_size: the batch size the speedup is required at. Default 1.
        check_batch_sizes: batch sizes at which a converted layer must not be
            slower than dense. Default ``(8, 64, 256)``; ``()`` checks none.
        min_speedup: required dense/sparse time ratio at ``batch_size``. Default 1.1.
        formats: candidate formats, a subset of :data:`FORMATS`. Default all three.
        layers: module name globs (fnmatch) of the Linear layers to consider.
            Default: every Linear. A glob that matches no Linear is an error.
        blocksize: BSR block size; default: detected per layer.
        rounds: timed blocks per configuration. Default 7.

    Returns a :class:`ToSparseReport`: per layer its shape, density, chosen
    format, speedup at ``batch_size`` and the median times measured.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> r = sf.to_sparse(model, min_speedup=1e9)   # nothing is that much faster
        >>> r.converted, type(model[0]).__name__
        ([], 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise SparseforgeError(f"to_sparse takes an nn.Module, got {type(model).__name__}")
    batch_size = _check_batch("batch_size", batch_size)
    if isinstance(check_batch_sizes, int):
        check_batch_sizes = (check_batch_sizes,)
    check_batch_sizes = tuple(_check_batch("check_batch_sizes entries", b) for b in check_batch_sizes)
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SparseforgeError(f"unknown sparse format(s) {unknown or formats}; use some of {list(FORMATS)}")
    if not isinstance(min_speedup, (int, float)) or isinstance(min_speedup, bool) or not min_speedup > 0:
        raise SparseforgeError(f"min_speedup must be a positive number, got {min_speedup!r}")
    if blocksize is not None:
        _check_batch("blocksize", blocksize)
    _check_batch("rounds", rounds)

    if isinstance(model, nn.Linear):
        raise SparseforgeError(
            "to_sparse replaces the Linear layers inside a model; for a lone nn.Linear use "
            "SparseLinear.from_dense(layer) or wrap it in nn.Sequential"
        )
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layers is not None:
        globs = [layers] if isinstance(layers, str) else list(layers)
        for g in globs:
            if not any(fnmatch.fnmatchcase(n, g) for n, _ in linears):
                others = [n for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, g)]
                what = f" (it matches {', '.join(others[:5])}, not nn.Linear)" if others else ""
                raise SparseforgeError(
                    f"layers pattern {g!r} matches no nn.Linear{what}; Linear layers: "
                    f"{', '.join(n for n, _ in linears[:12]) or 'none'}"
                )
        linears = [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, g) for g in globs)]

    choices = []
    replacements: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, layer in linears:
            w = layer.weight
            density = float(torch.count_nonzero(w)) / w.numel()
            choice = LayerChoice(name, (layer.out_features, layer.in_features), density, "dense")
            choices.append(choice)
            if density == 1.0:
                choice.reason = "no zeros"
                continue
            notes: list[str] = []
            cands = _candidates(name, layer, formats, blocksize, notes)
            sync = torch.cuda.synchronize if w.is_cuda else None
            alive = dict(cands)
            for i, b in enumerate((batch_size, *check_batch_sizes)):
                if not alive:
                    break
                x = torch.randn(b, layer.in_features, dtype=w.dtype, device=w.device)
                fns = {"dense": (lambda m=layer, x=x: m(x))} | {f: (lambda m=m, x=x: m(x)) for f, m in alive.items()}
                times, _ = time_interleaved(fns, rounds, block_seconds=0.01, warmup_blocks=1, sync=sync)
                med = {k: round(median_ms(v), 5) for k, v in times.items()}
                choice.times_ms[b] = med
                need = min_speedup if i == 0 else 1.0
                for f in list(alive):
                    if med["dense"] / med[f] < need:
                        notes.append(f"{f}: {med['dense'] / med[f]:.2f}x at batch {b} (needs {need:g})")
                        del alive[f]
            if alive:
                def gain(f: str) -> float:  # geometric mean of the speedups over the batch sizes measured
                    r = [t2["dense"] / t2[f] for t2 in choice.times_ms.values()]
                    return math.prod(r) ** (1 / len(r))

                best = max(alive, key=gain)
                t = choice.times_ms[batch_size]
                choice.format = best
                choice.blocksize = getattr(alive[best], "blocksize", None)
                choice.speedup = round(t["dense"] / t[best], 3)
                checked = ", ".join(f"{t2['dense'] / t2[best]:.2f}x@{b}" for b, t2 in choice.times_ms.items())
                choice.reason = f"faster: {checked}"
                replacements[name] = alive[best]
            else:
                choice.reason = "; ".join(notes) or "no candidate format"
    for name, module in replacements.items():
        set_submodule(model, name, module)
    return ToSparseReport(choices, batch_size, check_batch_sizes, float(min_speedup), formats, torch.get_num_threads())


def load_sparse_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Load a state dict saved from a :func:`to_sparse` model into ``model`` (the same model, dense).

    Rule: each ``nn.Linear`` whose entry in ``state_dict`` has
    ``crow_indices`` is replaced by a :class:`SparseLinear` of the saved
    layout, then ``model.load_state_dict(state_dict, strict)`` runs. Returns
    ``model``.
    """
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear) and prefix + "crow_indices" in state_dict:
            if not name:
                raise SparseforgeError("load_sparse_state_dict: the model itself is a Linear; use SparseLinear directly")
            extra = state_dict.get(prefix + "_extra_state") or {}
            sparse = SparseLinear(module.in_features, module.out_features, module.bias is not None,
                                  layout=extra.get("layout", "csr"), blocksize=extra.get("blocksize"),
                                  dtype=module.weight.dtype, device=module.weight.device)
            set_submodule(model, name, sparse)
    model.load_state_dict(state_dict, strict=strict)
    return model
