"""Streaming merges of safetensors files: one tensor of each model in memory at a time, not K models.

:func:`merge_files` merges K models stored as safetensors files (sparseforge
checkpoints or any other safetensors state dict) key by key: it first checks
every file's header (keys, shapes, dtypes) without reading a tensor, then for
each key reads that tensor from every input, merges it with the same
per-tensor rule the in-memory merges use (:func:`~sparseforge.merge.core.weighted_average`
on one key, or :func:`~sparseforge.merge.task_arithmetic.merge_tensors`), keeps
only the merged result and drops the inputs before reading the next key. The
result equals the in-memory merge of the fully loaded state dicts bit for bit.

Peak memory is about one model (the merged result, which
:func:`sparseforge.files.write_safetensors` writes one tensor at a time) plus one tensor per input
and the rule's float64 temporaries for that tensor, instead of K models.
Tensors are read with safetensors' ``pread`` backend where it has one (0.6
and later): each tensor is copied into memory the merge owns and freed when
dropped. Memory-mapped reads (the default backend, and the fallback here)
would leave every page read resident, and counted in the process's RSS, for
as long as the file stays open, so the fallback opens the file per tensor.
``python -m sparseforge.bench merge-memory`` measures it.

Methods: those of :data:`~sparseforge.merge.core.MERGE_METHODS` that merge
files (:func:`file_methods`): ``average`` (weighted average / uniform model
soup), the task-vector methods (presets of
:class:`~sparseforge.merge.task_arithmetic.TaskArithmetic`, which need the
base model), and any a plug-in registers. Fisher, RegMean and TALL need data
or masks besides the weights and are Python API only.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sparseforge.errors import SparseforgeError
from sparseforge.files import write_safetensors
from sparseforge.formats import (
    CHECKPOINT_FORMAT, CHECKPOINT_LEGACY_KEYS, CHECKPOINT_VERSION, HEADER_DIGEST, check_header, foreign_format,
    seal_metadata, stored_digests, tensor_digest, verify_tensor,
)
from sparseforge.merge.core import MERGE_METHODS, Rule, check_compatible, is_mergeable
from sparseforge.merge.task_arithmetic import TaskVectorMethod  # noqa: F401 - registers the task-vector presets
from sparseforge.progress import Progress, using

__all__ = ["file_methods", "merge_files", "merge_rule", "method_name"]

PathLike = str | os.PathLike[str]
_SHOW = 5  # how many files or keys an error lists

# safetensors dtype names (get_slice().get_dtype()) -> torch dtypes, for the header check.
_DTYPES = {name: getattr(torch, attr) for name, attr in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}.items() if hasattr(torch, attr)}


def file_methods() -> list[str]:
    """The merge methods of :data:`~sparseforge.merge.core.MERGE_METHODS` that merge files (not Python-only)."""
    return [name for name, m in MERGE_METHODS.items() if not m.python_only]


def _names(test: Callable[[Any], bool]) -> str:
    return ", ".join(name for name, m in MERGE_METHODS.items() if not m.python_only and test(m))


def method_name(method: str) -> str:
    """The registered name of a file merge method (``dare-ties`` -> ``dare_ties``), or a SparseforgeError
    suggesting the closest name and listing the choices."""
    if not isinstance(method, str) or method not in MERGE_METHODS:
        python_only = [name for name, m in MERGE_METHODS.items() if m.python_only]
        note = f"; {', '.join(python_only)} need data or masks and are Python API only" if python_only else ""
        raise MERGE_METHODS.error(method, known=file_methods(), note=note)
    name = MERGE_METHODS.canonical(method)
    why = MERGE_METHODS.get(name).python_only
    if why:
        raise SparseforgeError(
            f"merge method {method!r} is Python API only: {why}, which files of weights do not hold; "
            f"use sparseforge.merge.{name} from Python, or a file merge method: {', '.join(file_methods())}"
        )
    return name


def merge_rule(
    method: str,
    count: int,
    *,
    base: bool = False,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    lam: float = 1.0,
    seed: int = 0,
) -> Rule:
    """Validate a merge's options and return its per-tensor rule ``rule(name, base_tensor, tensors) -> merged``.

    Args:
        method: a file merge method of :data:`~sparseforge.merge.core.MERGE_METHODS`: ``average`` or a
            task-vector method (``task_arithmetic``, ``ties``, ``dare``, ``dare_ties``), or one a plug-in registered.
        count: how many models are merged (not counting the base).
        base: whether a base model is given; task-vector methods need one, the others take none.
        weights: one weight per model. ``average``: non-negative, not all zero,
            normalized to sum 1 (:func:`~sparseforge.merge.core.normalize_weights`);
            task-vector methods: multiply each task vector (see
            :class:`~sparseforge.merge.task_arithmetic.TaskArithmetic`). Default: uniform / all 1.
        density: fraction of each task vector kept by the methods that sparsify task vectors
            (default: the preset's, 0.2 for TIES, 0.1 for DARE); other methods take none.
        lam: the scaling coefficient lambda of the merged task vector (default 1.0); methods without it take none.
        seed: seed of DARE's drops (default 0); the methods that draw nothing ignore it.

    Raises :class:`SparseforgeError` naming the bad option. The rule is the
    one the in-memory merges apply, so the streamed merge equals
    :func:`~sparseforge.merge.core.weighted_average` /
    :func:`~sparseforge.merge.task_arithmetic.merge_task_arithmetic` bit for bit.
    """
    name = method_name(method)
    spec = MERGE_METHODS.get(name)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SparseforgeError(f"need at least one model to merge, got {count!r}")
    if density is not None and "density" not in spec.options:
        raise SparseforgeError(f"density applies to {_names(lambda m: 'density' in m.options)} (which sparsify "
                               f"task vectors), not to {name}")
    if base and not spec.needs_base:
        raise SparseforgeError(f"{name} does not use a base model; a base is for the task-vector methods "
                               f"({_names(lambda m: m.needs_base)})")
    if lam != 1.0 and "lam" not in spec.options:
        raise SparseforgeError(f"lambda scales task vectors ({_names(lambda m: 'lam' in m.options)}); {name} takes "
                               f"none, got {lam}")
    if spec.needs_base and not base:
        raise SparseforgeError(f"{name} merges task vectors (model - base): give the base (pre-trained) model "
                               "the others were fine-tuned from (--base, or base=)")
    given = {"density": density, "lam": lam, "seed": seed}
    options = {k: v for k, v in given.items() if k in spec.options and v is not None}
    return spec.build(count, weights=weights, **options)


class _Source:
    """One safetensors file, header read and checked; hands out one tensor at a time (verified)."""

    def __init__(self, path: Path, role: str, stack: contextlib.ExitStack) -> None:
        self.path = path
        self.role = role
        if not path.is_file():
            raise SparseforgeError(f"{role} {path} does not exist (or is not a file)")
        try:
            with safe_open(str(path), framework="pt") as f:
                self.metadata: dict[str, str] = dict(f.metadata() or {})
                self.meta_state: dict[str, Tensor] = {}
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    if dtype not in _DTYPES:
                        raise SparseforgeError(f"{role} {path}: tensor {key!r} has dtype {dtype}, which torch cannot hold")
                    # Meta tensors: shape and dtype without data, so core.check_compatible checks headers.
                    self.meta_state[key] = torch.empty(piece.get_shape(), dtype=_DTYPES[dtype], device="meta")
                if HEADER_DIGEST in self.metadata or self.metadata.get("format") == CHECKPOINT_FORMAT:
                    # A sparseforge checkpoint's header digest: the metadata carried into the output is intact.
                    check_header(f"{role} {path}", f, self.metadata, CHECKPOINT_LEGACY_KEYS, CHECKPOINT_VERSION)
        except SafetensorError as e:
            hint = foreign_format(path)
            raise SparseforgeError(f"{role} {hint}" if hint else f"{role} {path} is not a safetensors file or is "
                                   f"corrupted (its header cannot be read: {e})") from None
        except OSError as e:
            raise SparseforgeError(f"cannot read {role} {path}: {e}") from None
        fmt = self.metadata.get("format", "")
        if fmt.startswith("sparseforge-") and fmt != CHECKPOINT_FORMAT:
            raise SparseforgeError(
                f"{role} {path} is a {fmt} file (packed bitmasks and values), not a state dict; convert it first: "
                f"sparseforge export {path} --format safetensors --out plain.safetensors"
            )
        try:
            self.digests = stored_digests(self.metadata) if fmt == CHECKPOINT_FORMAT else {}
        except json.JSONDecodeError:
            raise SparseforgeError(f"{role} {path} is corrupted: its 'sha256' metadata is not valid JSON") from None
        missing = [k for k in self.digests if k not in self.meta_state]
        if missing:
            raise SparseforgeError(f"{role} {path} is missing tensors listed in its metadata: {', '.join(missing[:_SHOW])}")
        self._handle = _open_pread(path, stack)

    def read(self, key: str) -> Tensor:
        """Tensor ``key``, in memory the caller owns (not a view of a mapped file), checked against its digest."""
        try:
            if self._handle is not None:
                tensor = self._handle.get_tensor(key)
            else:
                # No pread backend: a mapped file keeps every page read resident while it is open,
                # so open it for this one tensor, copy the tensor out and close (unmap) it again.
                with safe_open(str(self.path), framework="pt") as f:
                    tensor = f.get_tensor(key).clone()
        except SafetensorError as e:
            raise SparseforgeError(f"{self.role} {self.path} is truncated or corrupted: reading {key!r} failed: {e}") from None
        except OSError as e:
            raise SparseforgeError(f"cannot read {self.role} {self.path}: {e}") from None
        verify_tensor(self.path, key, tensor, self.digests)
        return tensor


def _open_pread(path: Path, stack: contextlib.ExitStack):
    """The file opened with safetensors' ``pread`` backend, kept open for the merge; None where there is none."""
    try:
        return stack.enter_context(safe_open(str(path), framework="pt", backend="pread"))
    except TypeError:  # safetensors < 0.6: no backend argument
        return None


def _glibc_trim() -> Callable[[], None]:
    """A function that hands freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Merged tensors stay allocated while each tensor's temporaries are freed:
    glibc keeps the freed holes between them resident (its mmap threshold
    grows to the temporaries' size after the first free, so they come from the
    heap), and measured peaks varied from 1.4x to 2.9x a model between
    identical runs. Trimming after each tensor returns those pages.
    """
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def merge_files(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    method: str = "average",
    base: PathLike | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    lam: float = 1.0,
    seed: int = 0,
    progress: bool | Progress = False,
) -> dict[str, Any]:
    """Merge safetensors files tensor by tensor into ``out``, holding one tensor per input at a time.

    The per-tensor rules are those of the in-memory merges (see
    :func:`merge_rule`): ``average`` is the weighted mean of "Model soups:
    averaging weights of multiple fine-tuned models improves accuracy without
    increasing inference time" (Wortsman et al., ICML 2022); ``task_arithmetic``
    ("Editing Models with Task Arithmetic", Ilharco et al., ICLR 2023),
    ``ties`` ("TIES-Merging: Resolving Interference When Merging Models",
    Yadav et al., NeurIPS 2023; density 0.2), ``dare`` and ``dare_ties``
    ("Language Models are Super Mario", Yu et al., ICML 2024; density 0.1)
    merge task vectors ``model - base`` scaled by ``lam``. Floating tensors
    are merged in float64 and cast back; non-floating ones (counters, integer
    buffers) are copied from the base, or from the first model for ``average``.

    Args:
        inputs: the models' safetensors files (fine-tuned models for task-vector methods).
        out: the merged file; written atomically (a failed merge leaves no file).
            It must not be one of the inputs.
        method: ``average`` (default), ``task_arithmetic``, ``ties``, ``dare``, ``dare_ties``.
        base: the base (pre-trained) model's file, required by the task-vector methods.
        weights, density, lam, seed: the method's hyperparameters (see :func:`merge_rule`).
        progress: show progress on stderr, one step per tensor (see :mod:`sparseforge.progress`):
            True, or a :class:`~sparseforge.progress.Progress` to report to. Default False.

    Before reading any tensor, every file's header is checked: keys, shapes
    and dtypes must agree (the message names the file and the first few
    differing keys), and a file that is not safetensors or whose header is
    corrupted is named. Inputs that are sparseforge checkpoints are verified
    against their SHA-256 digests as each tensor is read. The output carries
    the metadata of the base (or first input); for a sparseforge checkpoint
    the digests are recomputed for the merged tensors and ``extra`` gains a
    ``merge`` record, so ``load_checkpoint`` and ``sparseforge inspect`` read it.

    Returns:
        A report: ``method``, ``inputs``, ``base``, ``out``, ``tensors`` (keys
        merged), ``bytes`` (output size), ``seconds`` and ``peak_rss_bytes``
        (the process's peak resident memory so far, ``getrusage``).
    """
    start = time.perf_counter()
    name = method_name(method)
    paths = [Path(p) for p in inputs] if not isinstance(inputs, (str, os.PathLike)) else None
    if not paths:
        raise SparseforgeError("need at least one model file to merge; pass a list of paths")
    rule = merge_rule(name, len(paths), base=base is not None, weights=weights, density=density, lam=lam, seed=seed)
    out_path = Path(out)
    base_path = Path(base) if base is not None else None
    for p in paths + ([base_path] if base_path is not None else []):
        if _same_file(out_path, p):
            raise SparseforgeError(f"the output {out_path} is one of the inputs ({p}); write the merge to a new file")

    with contextlib.ExitStack() as stack:
        sources = [_Source(p, f"model {i}", stack) for i, p in enumerate(paths)]
        base_source = _Source(base_path, "base model", stack) if base_path is not None else None
        everyone = ([base_source] if base_source else []) + sources
        # The reference (first) is the base when there is one: the others must match it.
        check_compatible([s.meta_state for s in everyone], names=[f"{s.role} {s.path}" for s in everyone])
        reference = everyone[0]
        keys = list(reference.meta_state)
        carry_digests = reference.metadata.get("format") == CHECKPOINT_FORMAT
        merged: dict[str, Tensor] = {}
        digests: dict[str, str] = {}
        trim = _glibc_trim()
        reporter = stack.enter_context(using(progress))
        with reporter.task(f"merging {out_path.name}: tensors", len(keys)) as bar:
            for key in keys:
                tensors = [s.read(key) for s in sources]
                base_tensor = base_source.read(key) if base_source is not None else None
                if is_mergeable(tensors[0]):
                    result = rule(key, base_tensor, tensors)
                else:  # counters and integer buffers: copied from the base (first model for average), as in core
                    result = (base_tensor if base_tensor is not None else tensors[0]).clone()
                del tensors, base_tensor  # only the merged tensor stays
                merged[key] = result.contiguous()
                if carry_digests:
                    digests[key] = tensor_digest(merged[key])
                trim()
                bar.advance()

    metadata = dict(reference.metadata)
    if carry_digests:
        metadata["sha256"] = json.dumps(digests)
        try:
            extra = json.loads(metadata.get("extra", "{}"))
        except json.JSONDecodeError:
            extra = {}
        extra = extra if isinstance(extra, dict) else {}
        extra["merge"] = {
            "method": name, "models": [str(p) for p in paths], "base": None if base_path is None else str(base_path),
            "weights": None if weights is None else [float(w) for w in weights], "density": density,
            "lambda": lam, "seed": seed if "seed" in MERGE_METHODS.get(name).options else None,
        }
        metadata["extra"] = json.dumps(extra)
        metadata = seal_metadata(metadata, merged)
    write_safetensors(out_path, merged, metadata or None)
    return {
        "method": name,
        "inputs": [str(p) for p in paths],
        "base": None if base_path is None else str(base_path),
        "out": str(out_path),
        "tensors": len(merged),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 4),
        "peak_rss_bytes": _peak_rss_bytes(),
    }
