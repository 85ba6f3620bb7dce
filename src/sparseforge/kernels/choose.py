"""Choose, per Linear layer and by measurement on this machine, the fastest path a precision policy allows.

:func:`to_sparse` is the one place where sparseforge decides how a layer
runs. The candidates are the dense paths a user could pick anyway (float32,
bfloat16 on the CPU's AMX units, PyTorch's int8 weight-only kernel) and the
sparse formats (sparseforge's packed bitmask kernels, PyTorch's CSR / BSR,
2:4 on CUDA). A sparse format is kept only where it beats the *best dense
path the policy allows*, not float32: "faster" means faster than what the
user would otherwise deploy.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.kernels.dense import BF16Linear, Int8Linear, int8_weight_only_available
from sparseforge.kernels.packed import PackedLinear
from sparseforge.kernels.sparse_linear import SemiStructuredLinear, SparseLinear, detect_blocksize
from sparseforge.progress import Progress, using
from sparseforge.targets import set_submodule
from sparseforge.timing import median_ms, time_interleaved

__all__ = ["DENSE_PATHS", "FORMATS", "PRECISIONS", "LayerChoice", "ToSparseReport", "apply_choices", "to_sparse"]

FORMATS: tuple[str, ...] = ("packed-fp32", "packed-bf16", "packed-int8", "csr", "bsr", "2:4")
"""Sparse formats: sparseforge's packed bitmask + values (fp32, bf16, int8 values; CPU), PyTorch's CSR and
BSR (CPU and CUDA) and 2:4 semi-structured (CUDA only)."""

DENSE_PATHS: tuple[str, ...] = ("dense", "dense-bf16", "dense-int8")
"""Dense paths: the layer as it is (``dense``), bf16 weights and activations, int8 weights (PyTorch's kernel)."""

PRECISIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "exact": (("dense",), ("packed-fp32", "csr", "bsr", "2:4")),
    "bf16": (("dense", "dense-bf16"), ("packed-fp32", "packed-bf16", "csr", "bsr", "2:4")),
    "int8": (("dense", "dense-bf16", "dense-int8"),
             ("packed-fp32", "packed-bf16", "packed-int8", "csr", "bsr", "2:4")),
}
"""Per precision policy, the dense paths and sparse formats it allows. ``exact``: results in the layer's
own precision (float32 products, summation order aside); ``bf16``: also bfloat16 weights (and, on the
dense path and the AVX512-BF16 packed kernel, bfloat16 activations); ``int8``: also int8 weights with
per-output-channel scales."""


@dataclass
class LayerChoice:
    """What :func:`to_sparse` measured and chose for one Linear layer.

    ``format`` is the path chosen: a dense path (``"dense"`` kept as it is,
    ``"dense-bf16"``, ``"dense-int8"``) or a sparse format. ``times_ms`` maps
    each batch size measured to ``{candidate: median ms per call}``;
    ``speedup`` is the float32 layer's time over the chosen path's, and
    ``vs_best_dense`` the best allowed dense path's time over it, both at
    the first batch size; ``dense_above`` is the batch size above which a
    packed layer multiplies densely; ``reason`` says why in words.
    """

    name: str
    shape: tuple[int, int]
    density: float
    format: str
    blocksize: int | None = None
    speedup: float | None = None
    vs_best_dense: float | None = None
    dense_above: int | None = None
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
    precision: str = "exact"
    kernels: str = ""

    @property
    def converted(self) -> list[str]:
        """Names of the layers that now run on another path than the original dense layer."""
        return [c.name for c in self.layers if c.format != "dense"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "kernels": self.kernels,
            "batch_size": self.batch_size, "check_batch_sizes": list(self.check_batch_sizes),
            "min_speedup": self.min_speedup, "formats": list(self.formats), "threads": self.threads,
            "layers": [asdict(c) | {"shape": list(c.shape),
                                    "times_ms": {str(b): t for b, t in c.times_ms.items()}} for c in self.layers],
        }

    def __str__(self) -> str:
        lines = [f"precision {self.precision}, kernels {self.kernels or '-'}, {self.threads} threads",
                 f"{'layer':28s} {'shape':>11s} {'density':>8s} {'path':>12s} {'vs fp32':>8s} {'vs dense':>8s}  reason"]
        for c in self.layers:
            shape = f"{c.shape[0]}x{c.shape[1]}"
            sp = f"{c.speedup:.2f}x" if c.speedup is not None else "-"
            vd = f"{c.vs_best_dense:.2f}x" if c.vs_best_dense is not None else "-"
            fmt = c.format + (f"/{c.blocksize}" if c.blocksize else "")
            lines.append(f"{c.name:28s} {shape:>11s} {c.density:8.3f} {fmt:>12s} {sp:>8s} {vd:>8s}  {c.reason}")
        return "\n".join(lines)


def _check_batch(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SparseforgeError(f"{name} must be a positive integer, got {value!r}")
    return value


def _build(fmt: str, layer: nn.Linear, blocksize: int | None, notes: list[str]) -> nn.Module | None:
    """The module running ``layer`` on path ``fmt``, or None (with a note) where it cannot."""
    w = layer.weight.detach()
    if fmt == "dense":
        return layer
    if fmt == "dense-bf16":
        return BF16Linear(layer)
    if fmt == "dense-int8":
        if w.is_cuda or not int8_weight_only_available():
            notes.append("dense-int8: needs PyTorch's CPU _weight_int8pack_mm")
            return None
        if not int8_weight_only_available(layer):
            notes.append("dense-int8: PyTorch's kernel needs in_features % 16 == 0")
            return None
        return Int8Linear(layer)
    if fmt.startswith("packed-"):
        if w.device.type != "cpu":
            return None  # CPU kernels: not worth a note on every layer of a GPU model
        return PackedLinear.from_dense(layer, fmt.removeprefix("packed-"))
    if fmt in ("csr", "bsr") and not w.is_cuda and w.dtype not in (torch.float32, torch.float64):
        notes.append(f"{fmt}: PyTorch's CPU sparse matmul takes float32/float64, not {str(w.dtype)[6:]}")
        return None
    if fmt == "csr":
        return SparseLinear.from_dense(layer, "csr")
    if fmt == "bsr":
        b = blocksize if blocksize is not None else detect_blocksize(w)
        if b is None:
            notes.append("no block structure for bsr")
        elif w.shape[0] % b or w.shape[1] % b:
            notes.append(f"bsr block {b} does not divide {tuple(w.shape)}")
        else:
            return SparseLinear.from_dense(layer, "bsr", b)
        return None
    if fmt == "2:4":
        if not w.is_cuda:
            return None  # CPU: no 2:4 kernel (2:4 weights run on the packed formats)
        try:
            module = SemiStructuredLinear(layer)
            # Untested GPU/dtype combinations may fail only at the first matmul: check one here.
            x = torch.randn(8, layer.in_features, dtype=w.dtype, device=w.device)
            if not torch.allclose(module(x), layer(x), rtol=1e-2, atol=1e-2):
                raise SparseforgeError("2:4 output differs from dense")
            return module
        except (SparseforgeError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            notes.append(f"2:4: {e}")
            return None
    raise AssertionError(fmt)


def apply_choices(model: nn.Module, choices: Sequence[LayerChoice | dict[str, Any]]) -> list[str]:
    """Swap ``model``'s Linear layers, in place, for the paths ``choices`` name, without timing anything.

    ``choices`` are a :class:`ToSparseReport`'s ``layers`` (or their
    ``to_dict()`` form, e.g. read back from JSON): each names a layer, its
    ``format``, ``blocksize`` and ``dense_above``. This rebuilds what
    :func:`to_sparse` chose on another copy of the same model (another
    process, a reloaded checkpoint) without measuring again. Returns the
    names of the layers swapped. A choice naming a missing layer, a layer
    that is not an ``nn.Linear``, or a path that cannot be built here
    (e.g. 2:4 off CUDA) is an error.
    """
    swapped: list[str] = []
    for c in choices:
        c = c if isinstance(c, dict) else asdict(c)
        fmt, name = c["format"], c["name"]
        if fmt == "dense":
            continue
        if fmt not in FORMATS + DENSE_PATHS:
            raise SparseforgeError(f"layer {name}: unknown path {fmt!r}; paths: {list(DENSE_PATHS + FORMATS)}")
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise SparseforgeError(f"the model has no layer {name!r} to apply a to_sparse choice to") from None
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"layer {name} is a {type(layer).__name__}, not the nn.Linear to_sparse chose for")
        notes: list[str] = []
        module = _build(fmt, layer, c.get("blocksize"), notes)
        if module is None:
            raise SparseforgeError(f"layer {name}: cannot build {fmt} here ({'; '.join(notes) or 'wrong device'})")
        if isinstance(module, PackedLinear):
            module.dense_above = c.get("dense_above")
        set_submodule(model, name, module)
        swapped.append(name)
    return swapped


def _gmean(values: list[float]) -> float:
    return math.prod(values) ** (1 / len(values))


def _measure(layer: nn.Linear, sizes: tuple[int, ...], dense: dict[str, nn.Module], sparse: dict[str, nn.Module],
             min_speedup: float, rounds: int, notes: list[str]) -> tuple[dict[int, dict[str, float]], dict[str, nn.Module]]:
    """Time every path at every size; return the times and the sparse candidates that stay qualified.

    A sparse candidate qualifies when it is ``min_speedup`` times faster than the best dense path at the
    first size and not slower than it at every other size. A packed candidate that loses at a larger size
    gets a second chance as a hybrid: packed up to the largest size where it won, dense above it (re-timed).
    """
    w = layer.weight
    sync: Callable[[], None] | None = torch.cuda.synchronize if w.is_cuda else None
    alive = dict(sparse)
    times: dict[int, dict[str, float]] = {}
    won: dict[str, int] = {}
    for i, b in enumerate(sizes):
        x = torch.randn(b, layer.in_features, dtype=w.dtype, device=w.device)
        fns = {k: (lambda m=m, x=x: m(x)) for k, m in (dense | alive).items()}
        raw, _ = time_interleaved(fns, rounds, block_seconds=0.01, warmup_blocks=1, sync=sync)
        med = {k: round(median_ms(v), 5) for k, v in raw.items()}
        times[b] = med
        best = min(med[d] for d in dense)
        need = min_speedup if i == 0 else 1.0
        for f in list(alive):
            ratio = best / med[f]
            if ratio >= need:
                won[f] = b
                continue
            module = alive[f]
            if isinstance(module, PackedLinear) and module.dense_above is None and f in won:
                module.dense_above = won[f]  # try it as a hybrid at this and the remaining sizes
                raw2, _ = time_interleaved({f: lambda m=module, x=x: m(x)} | {k: fns[k] for k in dense}, rounds,
                                           block_seconds=0.01, warmup_blocks=1, sync=sync)
                hybrid = round(median_ms(raw2[f]), 5)
                best2 = min(round(median_ms(raw2[d]), 5) for d in dense)
                med[f + "@dense"] = hybrid
                if best2 / hybrid >= 1.0:
                    continue
                notes.append(f"{f}: {ratio:.2f}x at batch {b}, {best2 / hybrid:.2f}x dense above {won[f]} (needs 1)")
            else:
                notes.append(f"{f}: {ratio:.2f}x of the best dense path at batch {b} (needs {need:g})")
            del alive[f]
    return times, alive


def _decide(choice: LayerChoice, layer: nn.Linear, dense_paths: Sequence[str], formats: Sequence[str],
            bsize: int | None, sizes: tuple[int, ...], min_speedup: float, rounds: int,
            notes: list[str]) -> nn.Module | None:
    """Measure one layer's candidates and fill ``choice`` (steps 1-4 of :func:`to_sparse`'s rule).

    Returns the module to swap in, or None where the layer stays as it is.
    """
    dense = {d: m for d in dense_paths if (m := _build(d, layer, None, notes)) is not None}
    sparse = {} if choice.density == 1.0 else {
        f: m for f in formats if (m := _build(f, layer, bsize, notes)) is not None}
    times, alive = _measure(layer, sizes, dense, sparse, min_speedup, rounds, notes)
    choice.times_ms = times
    first = times[sizes[0]]
    if alive:
        def gain(f: str) -> float:
            return _gmean([min(t[d] for d in dense) / t.get(f + "@dense", t[f]) for t in times.values()])

        fmt = max(alive, key=gain)
        module = alive[fmt]
    else:
        ok = [d for d in dense if d != "dense"
              and first["dense"] / first[d] >= min_speedup
              and all(t["dense"] / t[d] >= 1.0 for t in times.values())]
        fmt = max(ok, key=lambda d: _gmean([t["dense"] / t[d] for t in times.values()])) if ok else "dense"
        module = dense[fmt]
    choice.format = fmt
    choice.blocksize = getattr(module, "blocksize", None)
    choice.dense_above = getattr(module, "dense_above", None)
    choice.speedup = round(first["dense"] / first[fmt], 3)
    choice.vs_best_dense = round(min(first[d] for d in dense) / first[fmt], 3)
    at = ", ".join(f"{min(t[d] for d in dense) / t.get(fmt + '@dense', t[fmt]):.2f}x@{b}" for b, t in times.items())
    if fmt in alive:
        choice.reason = f"vs best dense: {at}"
    elif fmt != "dense":
        choice.reason = f"dense path faster than fp32; {'; '.join(notes)}" if notes else "dense path faster than fp32"
    else:
        choice.reason = "; ".join(notes) or "no candidate faster"
    return None if fmt == "dense" else module


def to_sparse(
    model: nn.Module,
    *,
    precision: str = "exact",
    batch_size: int = 1,
    check_batch_sizes: Sequence[int] | int = (8, 64, 256),
    min_speedup: float = 1.1,
    formats: Sequence[str] | str | None = None,
    layers: Sequence[str] | str | None = None,
    blocksize: int | None = None,
    rounds: int = 7,
    progress: bool | Progress = False,
) -> ToSparseReport:
    """Swap, in place, each Linear layer for the fastest path on this machine that ``precision`` allows.

    Rule, per ``nn.Linear`` selected by ``layers``:

    1. Candidates: the dense paths of :data:`PRECISIONS` [``precision``]
       (``"dense"``, the layer as it is; ``"dense-bf16"``; ``"dense-int8"``)
       and, when the weight has zeros, its sparse formats (restricted to
       ``formats`` when given): packed bitmask kernels
       (:class:`~sparseforge.kernels.packed.PackedLinear`, CPU), CSR, BSR
       (only when the zeros form blocks, or ``blocksize`` is given), 2:4
       (CUDA, PyTorch's semi-structured support). Under ``"exact"`` a layer
       without zeros stays as it is, untimed.
    2. Every candidate is timed on random inputs of the layer's dtype and
       device (interleaved blocks, order flipping every round, the median of
       ``rounds`` blocks: :func:`sparseforge.timing.time_interleaved`), at
       ``batch_size`` and at each of ``check_batch_sizes``.
    3. A sparse format qualifies when it is at least ``min_speedup`` times
       faster than the *best dense path allowed* at ``batch_size`` and not
       slower than it at every size checked; a packed format that loses at a
       larger size is re-timed as a hybrid (packed up to the largest size it
       won at, unpacked into a dense bf16/fp32 matmul above) and qualifies if
       that is not slower. Among qualifying formats the one with the highest
       geometric-mean gain over the sizes measured is chosen.
    4. Otherwise the best dense path is chosen by the same rule against the
       float32 layer (a bf16 or int8 path must be ``min_speedup`` faster at
       ``batch_size`` and never slower); else the layer stays as it is.

    Layers of the same shape, dtype, bias and density (to 1%) share one
    measurement (LLMs have dozens of identical layers). So the choice never
    makes a layer slower than the best dense path the policy allows, at any
    batch size measured: give ``check_batch_sizes`` the sizes your
    deployment runs (``(1,)``-``(8,)`` for token generation; prefill and
    encoder batches favour the dense AMX path). For the ``"bf16"`` and
    ``"int8"`` policies, convert the model to bfloat16 first
    (``model.to(torch.bfloat16)``): the layers kept dense, and attention and
    norms around them, then run as the dense bf16 model does, and the
    choice is measured against that. Outputs: ``"exact"`` equals
    the float32 layer up to summation order; bf16 and int8 paths differ by
    the rounding of the weights (bf16 paths also round the activations).

    Args:
        model: the model, modified in place (its Linear layers are replaced).
        precision: ``"exact"`` (default), ``"bf16"`` or ``"int8"``.
        batch_size: the batch size (rows of the flattened input) the gain is
            required at. Default 1.
        check_batch_sizes: sizes at which the choice must not be slower
            than the best dense path. Default ``(8, 64, 256)``; ``()`` none.
        min_speedup: required gain at ``batch_size``. Default 1.1.
        formats: sparse formats to consider, a subset of :data:`FORMATS`;
            default all that ``precision`` allows.
        layers: module name globs (fnmatch) of the Linear layers to consider.
            Default: every Linear. A glob that matches no Linear is an error.
        blocksize: BSR block size; default: detected per layer.
        rounds: timed blocks per configuration. Default 7.
        progress: show a progress bar (``True`` or a :class:`~sparseforge.progress.Progress`).

    Returns a :class:`ToSparseReport`: per layer every candidate's median
    times, the chosen path and why.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> r = sf.to_sparse(model, min_speedup=1e9)   # nothing is that much faster
        >>> r.converted, type(model[0]).__name__
        ([], 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise SparseforgeError(f"to_sparse takes an nn.Module, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise SparseforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dense_paths, allowed = PRECISIONS[precision]
    batch_size = _check_batch("batch_size", batch_size)
    if isinstance(check_batch_sizes, int):
        check_batch_sizes = (check_batch_sizes,)
    check_batch_sizes = tuple(_check_batch("check_batch_sizes entries", b) for b in check_batch_sizes)
    sizes = tuple(dict.fromkeys((batch_size, *check_batch_sizes)))
    if formats is None:
        formats = allowed
    elif isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SparseforgeError(f"unknown sparse format(s) {unknown or formats}; use some of {list(FORMATS)}")
    refused = [f for f in formats if f not in allowed]
    if refused:
        raise SparseforgeError(f"precision {precision!r} does not allow {refused}: it allows {list(allowed)}; "
                               "pass precision='bf16' or 'int8' for those")
    if not isinstance(min_speedup, (int, float)) or isinstance(min_speedup, bool) or not min_speedup > 0:
        raise SparseforgeError(f"min_speedup must be a positive number, got {min_speedup!r}")
    if blocksize is not None:
        _check_batch("blocksize", blocksize)
    _check_batch("rounds", rounds)

    if isinstance(model, nn.Linear):
        raise SparseforgeError(
            "to_sparse replaces the Linear layers inside a model; for a lone nn.Linear use "
            "PackedLinear.from_dense(layer) / SparseLinear.from_dense(layer) or wrap it in nn.Sequential"
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

    from sparseforge.kernels.native import native_status

    choices: list[LayerChoice] = []
    replacements: dict[str, nn.Module] = {}
    measured: dict[tuple, LayerChoice] = {}
    with torch.no_grad(), using(progress) as shown, shown.task("to_sparse: layers", len(linears)) as bar:
        for name, layer in linears:
            bar.advance(info=name)
            w = layer.weight
            density = float(torch.count_nonzero(w)) / w.numel()
            choice = LayerChoice(name, (layer.out_features, layer.in_features), density, "dense")
            choices.append(choice)
            if density == 1.0 and precision == "exact":
                choice.reason = "no zeros"
                continue
            bsize = blocksize
            if bsize is None and "bsr" in formats and density < 1.0:
                bsize = detect_blocksize(w)
            key = (tuple(w.shape), layer.bias is not None, w.dtype, str(w.device), round(density, 2), bsize)
            notes: list[str] = []
            if key in measured:
                seen = measured[key]
                fmt, dense_above = seen.format, seen.dense_above
                choice.format, choice.blocksize, choice.speedup = fmt, seen.blocksize, seen.speedup
                choice.vs_best_dense, choice.dense_above = seen.vs_best_dense, dense_above
                choice.reason = f"as {seen.name} (same shape and density)"
                if fmt != "dense":
                    module = _build(fmt, layer, bsize, notes)
                    if isinstance(module, PackedLinear):
                        module.dense_above = dense_above
                    replacements[name] = module  # type: ignore[assignment]
                continue
            measured[key] = choice
            module = _decide(choice, layer, dense_paths, formats, bsize, sizes, min_speedup, rounds, notes)
            if module is not None:
                replacements[name] = module
    for name, module in replacements.items():
        set_submodule(model, name, module)
    status = native_status()
    return ToSparseReport(choices, batch_size, check_batch_sizes, float(min_speedup), formats,
                          torch.get_num_threads(), precision, str(status["isa"]))
