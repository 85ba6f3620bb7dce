"""File size of sparse weights: dense safetensors, sfz (bitmask + fp32/fp16/int8 values), torch.save CSR, against the entropy bound.

Subjects: a 4096x4096 matrix of standard normal weights pruned to 90% by
magnitude (quick: 512x512), and the zoo models LeNet-300-100 and Conv-4
(freshly initialised, seeded) pruned to 90% with ``sf.prune`` (magnitude,
uniform over their Linear/Conv weights). For each, the bytes on disk of:
the plain checkpoint (dense safetensors, fp32), ``sf.save`` with fp32, fp16
and int8 values, and, for the matrix, ``torch.save`` of the CSR tensor.

The bound for a value width b is what an ideal coder needs for the same
content: for each sparse weight of n entries and density d, ``n H(d)``
bits (H the binary entropy: the mask of a random pattern at that density)
plus ``nnz * b`` bits for the values; every other tensor at its own width.
The ratio is file bytes / bound bytes; int8 files also carry float32 scales
(one per output channel), which the bound leaves out. Targets (issue 5):
sfz fp16 <= 1.3x and sfz int8 <= 1.5x the bound on the 4096x4096 matrix.
File sizes do not depend on timing, so the shared machine does not matter.
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseforge.io.checkpoint import save_checkpoint
from sparseforge.io.sfz import read_sfz, save
from sparseforge.oneshot.prune import prune
from sparseforge.report import LAYER_TYPES
from sparseforge.zoo.models import build_model

TARGETS = {"sfz_fp16": 1.3, "sfz_int8": 1.5}
VALUE_BITS = {"fp32": 32, "fp16": 16, "int8": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=None, help="side of the square matrix (default 4096, quick 512)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="(default 0.9)")
    parser.add_argument("--models", nargs="+", default=["lenet300", "conv4"], help="zoo models (default lenet300 conv4)")
    parser.add_argument("--seed", type=int, default=0)


def entropy_bits(n: int, nnz: int) -> float:
    """``n H(nnz / n)`` bits: the entropy bound of a random mask with ``nnz`` ones among ``n``."""
    d = nnz / n if n else 0.0
    if d <= 0.0 or d >= 1.0:
        return 0.0
    return n * -(d * math.log2(d) + (1 - d) * math.log2(1 - d))


def bound_bytes(model: nn.Module, value_bits: int) -> float:
    """Entropy bound (bytes) of ``model``'s state: sparse Linear/Conv weights at ``value_bits``, the rest as is."""
    weights = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    bits = 0.0
    for name, t in model.state_dict().items():
        if name in weights and t.is_floating_point():
            nnz = int(t.count_nonzero())
            bits += entropy_bits(t.numel(), nnz) + nnz * value_bits
        else:
            bits += t.numel() * t.element_size() * 8
    return bits / 8


def _torch_save_bytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def csr_sizes(w: torch.Tensor) -> dict[str, int]:
    """``torch.save`` bytes of ``w`` as a CSR tensor: as is, its parts cloned, and with int32 indices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = w.to_sparse_csr()
    crow, col, vals = csr.crow_indices(), csr.col_indices(), csr.values()
    return {
        "torch_save_csr": _torch_save_bytes(csr),
        "torch_save_csr_parts_cloned": _torch_save_bytes({"crow": crow.clone(), "col": col.clone(), "values": vals.clone()}),
        "torch_save_csr_int32_indices": _torch_save_bytes(
            {"crow": crow.to(torch.int32), "col": col.to(torch.int32), "values": vals.clone()}),
        # to_sparse_csr's col_indices is a view into a larger buffer (the COO row and column
        # indices together): torch.save writes that whole storage, hence the first figure.
        "col_indices_storage_bytes": col.untyped_storage().nbytes(),
        "col_indices_bytes": col.numel() * col.element_size(),
    }


def measure(name: str, model: nn.Module, folder: Path) -> dict[str, Any]:
    """File sizes of ``model`` in every format, the bounds and the ratios."""
    weights = [m.weight for m in model.modules() if isinstance(m, LAYER_TYPES)]
    n = sum(w.numel() for w in weights)
    nnz = sum(int(w.count_nonzero()) for w in weights)
    files: dict[str, int] = {}
    p = folder / f"{name}.safetensors"
    save_checkpoint(model, p)
    files["dense_safetensors_fp32"] = p.stat().st_size
    parts: dict[str, dict[str, int]] = {}
    for v in VALUE_BITS:
        p = folder / f"{name}-{v}.sfz"
        save(model, p, values=v)
        files[f"sfz_{v}"] = p.stat().st_size
        _, meta, _ = read_sfz(p)
        parts[f"sfz_{v}"] = {"tensor_bytes": sum(t["bytes"] for t in meta["tensors"].values())}
        parts[f"sfz_{v}"]["header_bytes"] = files[f"sfz_{v}"] - parts[f"sfz_{v}"]["tensor_bytes"]
    bounds = {v: bound_bytes(model, b) for v, b in VALUE_BITS.items()}
    ratios = {"dense_safetensors_fp32": files["dense_safetensors_fp32"] / bounds["fp32"]}
    ratios |= {f"sfz_{v}": files[f"sfz_{v}"] / bounds[v] for v in VALUE_BITS}
    return {
        "subject": name, "weights": n, "weight_nonzeros": nnz, "weight_density": nnz / n if n else 0.0,
        "params": sum(t.numel() for t in model.state_dict().values()),
        "bytes": files, "bound_bytes": {v: round(b) for v, b in bounds.items()},
        "ratio_to_bound": {k: round(r, 4) for k, r in ratios.items()}, "sfz_parts": parts,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    side = args.size or (512 if args.quick else 4096)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(args.seed)
        layer = nn.Linear(side, side, bias=False)
        with torch.no_grad():
            layer.weight.normal_()
        prune(layer, "magnitude", sparsity=args.sparsity)
        r = measure(f"matrix{side}", layer, folder)
        csr = csr_sizes(layer.weight.detach())
        r["bytes"] |= {k: v for k, v in csr.items() if k.startswith("torch_save")}
        r["csr_col_indices"] = {"storage_bytes": csr["col_indices_storage_bytes"], "bytes": csr["col_indices_bytes"]}
        r["ratio_to_bound"] |= {k: round(v / r["bound_bytes"]["fp32"], 4) for k, v in csr.items()
                                if k.startswith("torch_save")}
        r["targets"] = {k: {"max_ratio": t, "ratio": r["ratio_to_bound"][k], "holds": r["ratio_to_bound"][k] <= t}
                        for k, t in TARGETS.items()}
        results.append(r)
        del layer
        for name in args.models:
            torch.manual_seed(args.seed)
            model = build_model(name)
            prune(model, "magnitude", sparsity=args.sparsity)
            results.append(measure(name, model, folder))
    header = f"{'subject':12s} {'format':30s} {'bytes':>12s} {'bound':>12s} {'ratio':>7s}"
    print(header)
    for r in results:
        for k, b in r["bytes"].items():
            width = "fp32" if k.startswith(("dense", "torch")) else k.removeprefix("sfz_")
            print(f"{r['subject']:12s} {k:30s} {b:12,d} {r['bound_bytes'][width]:12,d} {r['ratio_to_bound'][k]:7.3f}")
    for k, t in results[0]["targets"].items():
        print(f"target {k} <= {t['max_ratio']}x bound: {t['ratio']:.3f} ({'meets' if t['holds'] else 'MISSES'})")
    return {
        "benchmark": "size", "quick": bool(args.quick), "torch": torch.__version__, "sparsity": args.sparsity,
        "seed": args.seed, "results": results,
    }
