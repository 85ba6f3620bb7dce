"""Modules that run what is left faster: sparse Linear layers (CSR/BSR on CPU, 2:4 semi-structured on CUDA)."""

from sparseforge.kernels.sparse_linear import SparseLinear, ToSparseReport, load_sparse_state_dict, to_sparse

__all__ = ["SparseLinear", "ToSparseReport", "load_sparse_state_dict", "to_sparse"]
