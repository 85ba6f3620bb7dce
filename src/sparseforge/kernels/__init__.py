"""Modules that run what is left faster, and the one place that chooses among them per layer.

- :mod:`~sparseforge.kernels.packed`: bitmask + values packed weights and :class:`PackedLinear`, on
  sparseforge's native CPU kernels (:mod:`~sparseforge.kernels.native`) or a plain PyTorch fallback;
- :mod:`~sparseforge.kernels.dense`: the dense bf16 and int8 weight-only paths (the baselines);
- :mod:`~sparseforge.kernels.sparse_linear`: PyTorch's CSR/BSR (CPU, CUDA) and 2:4 (CUDA);
- :mod:`~sparseforge.kernels.choose`: :func:`to_sparse`, which times them per layer under a precision policy;
- :mod:`~sparseforge.kernels.activation`: activation sparsity at decode (TEAL thresholds, column-block kernel).
"""

from sparseforge.kernels.activation import ActivationSparseLinear, activation_sparsity, calibrate_thresholds
from sparseforge.kernels.choose import DENSE_PATHS, FORMATS, PRECISIONS, LayerChoice, ToSparseReport, to_sparse
from sparseforge.kernels.dense import BF16Linear, Int8Linear
from sparseforge.kernels.packed import PackedLinear, PackedWeight, pack, packed_matmul
from sparseforge.kernels.sparse_linear import SemiStructuredLinear, SparseLinear, load_sparse_state_dict

__all__ = [
    "ActivationSparseLinear", "activation_sparsity", "calibrate_thresholds", "DENSE_PATHS", "FORMATS", "PRECISIONS", "BF16Linear", "Int8Linear", "LayerChoice", "PackedLinear",
    "PackedWeight", "SemiStructuredLinear", "SparseLinear", "ToSparseReport", "load_sparse_state_dict", "pack",
    "packed_matmul", "to_sparse",
]
