"""Sparse Linear layers on PyTorch's own sparse tensors: CSR/BSR (CPU, CUDA) and 2:4 semi-structured (CUDA).

:class:`SparseLinear` is an inference-only drop-in for ``nn.Linear`` whose
weight is stored compressed, as CSR (any zero pattern) or BSR (block-sparse
patterns), with int32 indices. :func:`sparseforge.to_sparse`
(:mod:`sparseforge.kernels.choose`) times them beside the dense paths and
sparseforge's own packed kernels (:mod:`sparseforge.kernels.packed`) and
keeps one only where it is measurably faster.

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

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.targets import set_submodule

__all__ = ["SemiStructuredLinear", "SparseLinear", "detect_blocksize", "is_2to4", "load_sparse_state_dict"]

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
