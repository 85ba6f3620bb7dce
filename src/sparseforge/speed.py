"""How fast a model runs on this machine on each path a person could deploy it on: the measurement behind
``sparseforge speed`` and ``python -m sparseforge.bench decode``.

A *path* is one way of running the whole model (names from
:data:`~sparseforge.kernels.choose.DENSE_PATHS` and
:data:`~sparseforge.kernels.choose.FORMATS`, filtered by a precision policy
of :data:`~sparseforge.kernels.choose.PRECISIONS`):

- ``dense``: the model as it is (float32 as loaded);
- ``dense-bf16``: the whole model ``.to(torch.bfloat16)``, what a user would do;
- ``dense-int8``: every ``nn.Linear`` (the LM head included) swapped for
  :class:`~sparseforge.kernels.dense.Int8Linear` (PyTorch's int8
  weight-only kernel), the rest bfloat16;
- ``packed-fp32`` / ``packed-bf16`` / ``packed-int8``: the model's own zeros
  packed, :class:`~sparseforge.kernels.packed.PackedLinear` with those values
  for every Linear in the repeated blocks (a decoder's attention and FFN
  projections; :func:`linear_layers`); everything else (attention itself,
  norms, embeddings, the LM head) runs on the dense path of the same
  precision: float32 for fp32 values, bfloat16 for bf16 values, bfloat16
  with an int8 weight-only LM head for int8 values (:func:`rest_of`);
- ``to_sparse``: a float32 copy converted by :func:`sparseforge.to_sparse`
  under the policy, which picks per layer by measurement.

:func:`build_path` makes one; :func:`time_paths` times several
interleaved (:func:`sparseforge.timing.time_interleaved`: alternating
blocks, the order flipping every round, medians), as forward passes at
given batch sizes (ms per batch) and, for a causal LM, as token generation
(``model.generate(do_sample=False)`` with its KV cache, batch 1: tokens/s
of the decode steps, the prompt's prefill timed apart);
:func:`measure_speed` does both for one model and returns a
:class:`SpeedReport`, the table ``sparseforge speed`` prints.

Memory per path is stated two ways: ``estimate_bytes`` = the bytes of the
path's weights (every parameter and buffer, counted once) plus the KV cache
of one generation (computed from the config, not measured); and, when asked
(:func:`measure_peak_rss`), the peak resident memory of a fresh process that
loads the model, builds the path, and runs it (freed memory is trimmed and the peak reset after the
path is built, so the float32 source model it was built from is not counted;
the Python and PyTorch runtime is, and is reported as ``baseline_rss_bytes``).
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.kernels.choose import DENSE_PATHS, PRECISIONS, ToSparseReport, apply_choices, to_sparse
from sparseforge.kernels.dense import Int8Linear, int8_weight_only_available
from sparseforge.kernels.packed import VALUE_DTYPES, PackedLinear
from sparseforge.layers import is_hf_model
from sparseforge.targets import set_submodule
from sparseforge.timing import median_ms, time_interleaved

__all__ = [
    "PACKED_PATHS", "TO_SPARSE", "BuiltPath", "PathTiming", "SpeedReport", "Workload", "build_path",
    "is_causal_lm", "linear_layers", "load_model", "measure_peak_rss", "measure_speed", "path_names", "rest_of",
    "time_paths",
]

PACKED_PATHS: dict[str, str] = {f"packed-{v}": v for v in VALUE_DTYPES}
"""Whole-model packed paths by name, and the value encoding of their packed layers."""

TO_SPARSE = "to_sparse"
"""The path :func:`sparseforge.to_sparse` chooses layer by layer."""


def path_names(precision: str = "int8") -> tuple[str, ...]:
    """The paths a precision policy allows: its dense paths, its packed formats, then ``to_sparse``.

    >>> path_names("exact")
    ('dense', 'packed-fp32', 'to_sparse')
    """
    if precision not in PRECISIONS:
        raise SparseforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dense, sparse = PRECISIONS[precision]
    return (*dense, *(f for f in sparse if f in PACKED_PATHS), TO_SPARSE)


def rest_of(path: str) -> str:
    """The dense path that runs what a path does not pack (attention, norms, embeddings, the LM head).

    A packed path keeps the precision of its values: fp32 values with the
    float32 model, bf16 values with the bfloat16 model, int8 values with the
    int8 weight-only model (bf16 elsewhere, the LM head int8).

    >>> [rest_of(p) for p in ("packed-fp32", "packed-bf16", "packed-int8", "dense-bf16")]
    ['dense', 'dense-bf16', 'dense-int8', 'dense-bf16']
    """
    if path in DENSE_PATHS or path == TO_SPARSE:
        return "dense" if path == TO_SPARSE else path
    if path not in PACKED_PATHS:
        raise SparseforgeError(f"unknown path {path!r}; paths: {', '.join(path_names('int8'))}")
    values = PACKED_PATHS[path]
    return "dense" if values == "fp32" else f"dense-{values}"  # DENSE_PATHS names the precision after "dense-"


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model that can ``generate`` (a causal LM)."""
    if not is_hf_model(model):
        return False
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers a packed path packs: those inside the model's repeated blocks
    (a decoder's or encoder's layers: attention and FFN projections, not the LM head or a pooler), or
    every ``nn.Linear`` of a model without such blocks. The rule of one-shot pruning's default target."""
    from sparseforge.oneshot.calibration import select_layers

    return [n for n, m in select_layers(model).items() if isinstance(m, nn.Linear)]


def load_model(path: str) -> nn.Module:
    """The model of a Hugging Face folder, a sparseforge checkpoint or a ``.sfz`` file (float32, eval mode)."""
    from sparseforge.pipelines import load_any

    model, _ = load_any(path)
    return model.eval()


# -- paths ---------------------------------------------------------------------------------------


@dataclass
class BuiltPath:
    """One path, ready to run: the module, what runs where, the dtype of its float inputs, and its bytes.

    ``weight_bytes``: every parameter and buffer, counted once (tied tensors
    once). ``bytes_per_token``: what one forward pass over one token reads:
    all of them but embedding tables (one row per token), packed layers by
    their mask, values, row starts and scales
    (:attr:`~sparseforge.kernels.packed.PackedWeight.nbytes`).
    """

    name: str
    module: nn.Module
    description: str
    input_dtype: torch.dtype
    weight_bytes: int
    bytes_per_token: int
    to_sparse: ToSparseReport | None = None


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes(model: nn.Module) -> tuple[int, int]:
    """(weight_bytes, bytes_per_token) of a module, as :class:`BuiltPath` defines them."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _tensor_bytes(t)
    read: set[int] = set()
    per_token = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            continue
        if isinstance(m, PackedLinear):
            if id(m) not in read:
                read.add(id(m))
                per_token += m.packed.nbytes + (_tensor_bytes(m.bias) if m.bias is not None else 0)
            continue
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t.data_ptr() not in read:
                read.add(t.data_ptr())
                per_token += _tensor_bytes(t)
    return total, per_token


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _swap_int8(path: nn.Module, source: nn.Module, names: Sequence[str]) -> list[str]:
    """Swap the named Linear layers for Int8Linear; return those PyTorch's kernel cannot take (left bf16)."""
    kept = []
    for n in names:
        layer = source.get_submodule(n)
        if int8_weight_only_available(layer):
            set_submodule(path, n, Int8Linear(layer))
        else:
            kept.append(n)
    return kept


def build_path(model: nn.Module, name: str, *, layers: Sequence[str] | None = None,
               to_sparse_options: Mapping[str, Any] | None = None,
               choices: Sequence[Any] | None = None) -> BuiltPath:
    """Build path ``name`` (see the module docstring) of a float32 ``model``, which is left unchanged.

    Args:
        model: the model; ``dense`` is the model itself, every other path a copy.
        name: a path of :func:`path_names`.
        layers: the Linear layers a packed path packs (default :func:`linear_layers`).
        to_sparse_options: keyword arguments of :func:`sparseforge.to_sparse` for the ``to_sparse``
            path (``precision`` included).
        choices: instead of measuring, apply these ``to_sparse`` choices
            (a :class:`~sparseforge.kernels.choose.ToSparseReport`'s ``layers``; see
            :func:`~sparseforge.kernels.choose.apply_choices`).
    """
    allowed = path_names("int8")
    if name not in allowed:
        raise SparseforgeError(f"unknown path {name!r}; paths: {', '.join(allowed)}")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SparseforgeError(f"{type(model).__name__} has no nn.Linear layers: the paths compared here (bf16, "
                               "int8 weight-only, packed sparse) are paths of Linear layers")
    rest = rest_of(name)
    if rest == "dense-int8" and not int8_weight_only_available():
        raise SparseforgeError(f"path {name} needs PyTorch's int8 weight-only kernel (aten._weight_int8pack_mm), "
                               "which this PyTorch lacks")
    report = None
    if name == "dense":
        module, what = model, f"the model as it is ({str(_dtype_of(model)).removeprefix('torch.')})"
    elif name == TO_SPARSE:
        opts = dict(to_sparse_options or {})
        with torch.no_grad():
            module = copy.deepcopy(model)
            if opts.get("precision", "exact") != "exact":
                # the bf16 and int8 policies start from the model in bf16, as a user deploying in bf16 would:
                # the layers to_sparse keeps dense and everything around them (attention, norms) then run as
                # in the dense bf16 path, so the choice is measured against that path, not against fp32
                module = module.to(torch.bfloat16)
        if choices is not None:
            apply_choices(module, choices)
            what = "to_sparse's choices, applied"
        else:
            report = to_sparse(module, **opts)
            kinds: dict[str, int] = {}
            for c in report.layers:
                kinds[c.format] = kinds.get(c.format, 0) + 1
            what = (f"to_sparse(precision={report.precision!r}) per layer: "
                    + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    else:
        with torch.no_grad():
            module = copy.deepcopy(model)
            if rest != "dense":
                module = module.to(torch.bfloat16)
        packed = list(layers) if layers is not None else linear_layers(model)
        others = [n for n in linears if n not in set(packed)]
        if name in PACKED_PATHS:
            values = PACKED_PATHS[name]
            for n in packed:
                source = model.get_submodule(n)
                if not isinstance(source, nn.Linear):
                    raise SparseforgeError(f"layer {n} is a {type(source).__name__}, not an nn.Linear to pack")
                # packed from the float32 weight: one rounding to the value dtype, not two
                set_submodule(module, n, PackedLinear.from_dense(source, values))
            head = {"dense": "float32", "dense-bf16": "bf16", "dense-int8": "int8 weight-only"}[rest]
            what = (f"{len(packed)} Linear packed ({values} values); other Linear {head}; "
                    f"rest {'float32' if rest == 'dense' else 'bf16'}")
            if rest == "dense-int8":
                left = _swap_int8(module, model, others)
                if left:
                    what += f"; {len(left)} Linear bf16 (in_features not a multiple of 16: {', '.join(left[:4])})"
        elif name == "dense-int8":
            left = _swap_int8(module, model, linears)
            what = f"{len(linears) - len(left)} Linear int8 weight-only; rest bf16"
            if left:
                what += f" (also {len(left)} Linear whose in_features is not a multiple of 16: {', '.join(left[:4])})"
        else:
            what = "the whole model in bf16"
    total, per_token = _bytes(module)
    input_dtype = torch.float32 if rest == "dense" and name != TO_SPARSE else _dtype_of(module)
    return BuiltPath(name, module.eval(), what, input_dtype, total, per_token, report)


# -- workloads and timing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What each path runs.

    ``batch_sizes``: forward passes at these batch sizes (for a
    ``transformers`` model, sequences of ``seq_len`` random token ids; for
    any other model, random inputs of ``input_shape``, default
    ``(in_features,)`` of its first layer when that is an ``nn.Linear``).
    ``tokens``: new tokens of ``model.generate`` after a ``prompt_len``-token
    random prompt, batch 1, greedy (0: no generation). ``rounds``: timed
    rounds; ``seed``: of the random inputs.
    """

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    tokens: int = 0
    prompt_len: int = 32
    seq_len: int = 128
    input_shape: tuple[int, ...] | None = None
    rounds: int = 5
    seed: int = 0

    def rows(self, model: nn.Module, batch: int) -> int:
        """Rows a Linear layer sees in a forward pass at ``batch`` (tokens for a transformers model)."""
        return batch * self.seq_len if is_hf_model(model) else batch


def _check_positive(name: str, value: Any, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise SparseforgeError(f"{name} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}")
    return value


def _check_workload(model: nn.Module, w: Workload) -> None:
    for b in w.batch_sizes:
        _check_positive("batch sizes", b)
    _check_positive("tokens", w.tokens, zero=True)
    _check_positive("rounds", w.rounds)
    _check_positive("seq_len", w.seq_len)
    _check_positive("prompt_len", w.prompt_len)
    if not w.batch_sizes and not w.tokens:
        raise SparseforgeError("nothing to measure: give batch sizes, tokens to generate, or both")
    if w.tokens and not is_causal_lm(model):
        raise SparseforgeError(f"tokens={w.tokens}: only a transformers causal LM generates tokens, and "
                               f"{type(model).__name__} is not one; measure forward passes (batch sizes) only")
    if is_hf_model(model):
        limit = getattr(model.config, "max_position_embeddings", None)
        longest = max(w.seq_len if w.batch_sizes else 0, w.prompt_len + w.tokens if w.tokens else 0)
        if limit is not None and longest > limit:
            raise SparseforgeError(f"{longest} tokens exceed the model's {limit} positions: use fewer tokens or a "
                                   "shorter seq_len / prompt")


def _input_shape(model: nn.Module, w: Workload) -> tuple[int, ...]:
    if w.input_shape is not None:
        return tuple(w.input_shape)
    first = next((m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters())), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise SparseforgeError(f"cannot tell the input shape of {type(model).__name__} (its first layer is "
                           f"{type(first).__name__ if first is not None else 'missing'}): give input_shape, "
                           "e.g. --input-shape 1,28,28")


def _vocab(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else int(model.config.vocab_size)


def _forward_call(path: BuiltPath, model: nn.Module, w: Workload, batch: int) -> Callable[[], Any]:
    gen = torch.Generator().manual_seed(w.seed + batch)
    m = path.module
    if is_hf_model(model):
        ids = torch.randint(0, _vocab(model), (batch, w.seq_len), generator=gen)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if is_causal_lm(model):
            kwargs["use_cache"] = False
        return lambda: m(**kwargs)
    x = torch.randn(batch, *_input_shape(model, w), generator=gen).to(path.input_dtype)
    return lambda: m(x)


def _prompt(model: nn.Module, w: Workload) -> torch.Tensor:
    gen = torch.Generator().manual_seed(w.seed)
    return torch.randint(0, _vocab(model), (1, w.prompt_len), generator=gen)


def generate(module: nn.Module, prompt: torch.Tensor, tokens: int, stamps: list[float] | None = None) -> torch.Tensor:
    """Greedy generation of exactly ``tokens`` new tokens with the KV cache (end-of-text suppressed until then).

    With ``stamps``, the time of each decode step is appended to it (a
    logits processor records when each step's logits arrive: the first
    after the prompt's prefill, then one per new token).
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append(time.perf_counter())  # type: ignore[union-attr]
            return scores

    cfg = module.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    extra = {"logits_processor": LogitsProcessorList([_Clock()])} if stamps is not None else {}
    with torch.inference_mode():
        out = module.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0 if pad is None else pad,
                              **extra)
    if out.shape[1] != prompt.shape[1] + tokens:
        raise SparseforgeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, not {tokens}")
    return out


@dataclass
class PathTiming:
    """What :func:`time_paths` measured for one path (medians over the rounds).

    ``forward_ms``: ms per forward pass, by batch size. ``ms_per_token`` /
    ``tokens_per_s``: the decode steps of generation (prefill apart);
    ``prefill_ms``: the prompt's forward pass and first token;
    ``generate_s``: the whole ``generate`` call.
    """

    forward_ms: dict[int, float] = field(default_factory=dict)
    ms_per_token: float | None = None
    tokens_per_s: float | None = None
    prefill_ms: float | None = None
    generate_s: float | None = None


def time_paths(paths: Mapping[str, BuiltPath], model: nn.Module, workload: Workload,
               log: Callable[[str], None] | None = None) -> dict[str, PathTiming]:
    """Time every path on ``workload``, interleaved; ``model`` is the source model (for its inputs).

    Forward passes: one :func:`~sparseforge.timing.time_interleaved` per
    batch size over all paths (blocks of about 0.05 s). Generation: one
    over all paths with one ``generate`` call per block; each call's decode
    steps are timed by :func:`generate`'s clock, and the medians over the
    timed rounds are reported.
    """
    _check_workload(model, workload)
    out = {name: PathTiming() for name in paths}
    with torch.inference_mode():
        for b in workload.batch_sizes:
            fns = {name: _forward_call(p, model, workload, b) for name, p in paths.items()}
            raw, _ = time_interleaved(fns, workload.rounds, block_seconds=0.05, warmup_blocks=1)
            for name, secs in raw.items():
                out[name].forward_ms[b] = round(median_ms(secs), 4)
            if log:
                log(f"forward at batch {b}: " + ", ".join(f"{n} {out[n].forward_ms[b]:.3g} ms" for n in paths))
    if workload.tokens:
        prompt = _prompt(model, workload)
        steps: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}

        def call(name: str, module: nn.Module) -> Callable[[], Any]:
            def run() -> None:
                stamps: list[float] = []
                start = time.perf_counter()
                generate(module, prompt, workload.tokens, stamps)
                first = stamps[0] - start
                per = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
                steps[name].append((first, per))
            return run

        fns = {name: call(name, p.module) for name, p in paths.items()}
        raw, per_block = time_interleaved(fns, workload.rounds, block_seconds=0.0, warmup_blocks=1)
        for name, secs in raw.items():
            timed = steps[name][-workload.rounds * per_block:]  # the probe and warm-up calls came first
            t = out[name]
            t.generate_s = round(median_ms(secs) / 1e3, 4)
            if workload.tokens > 1:
                t.ms_per_token = round(median_ms([p for _, p in timed]), 4)
                t.tokens_per_s = round(1e3 / t.ms_per_token, 3)
            t.prefill_ms = round(median_ms([f for f, _ in timed]), 4)
        if log:
            log("generation: " + ", ".join(f"{n} {out[n].tokens_per_s} tok/s" for n in paths))
    return out


def kv_cache_bytes(model: nn.Module, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of a ``transformers`` decoder's KV cache holding ``tokens`` positions (keys and values, every layer)."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if cfg is None or not layers or not heads:
        return 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * tokens * batch * torch.empty(0, dtype=dtype).element_size()


# -- peak memory in a fresh process --------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]


def _reset_peak() -> bool:
    """Reset this process's peak resident set (Linux: ``clear_refs`` 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that RSS shows what is still in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also holds freed, untrimmed heap
        pass


def _load(loader: str, kwargs: Mapping[str, Any]) -> nn.Module:
    module, _, attr = loader.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    return fn(**kwargs)


def peak_rss_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run in a fresh process by :func:`measure_peak_rss`: load, build the path, run it, report memory (bytes)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import transformers  # noqa: F401  - the runtime is part of the baseline, not of the path

    baseline = _status_kib("VmRSS") * 1024
    model = _load(spec["loader"], spec.get("loader_kwargs", {}))
    w = Workload(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["workload"].items()})
    if not is_hf_model(model):
        w = replace(w, input_shape=_input_shape(model, w))
    path = build_path(model, spec["path"], layers=spec.get("layers"), choices=spec.get("choices"),
                      to_sparse_options={"precision": spec.get("precision", "exact")})
    model = path.module  # the source is not part of the path's footprint: only the path keeps it alive
    gc.collect()
    _trim()
    resident = _status_kib("VmRSS") * 1024
    exact = _reset_peak()
    with torch.inference_mode():
        if w.tokens:
            generate(path.module, _prompt(model, w), w.tokens)
        for b in w.batch_sizes:
            _forward_call(path, model, w, b)()
    return {"baseline_rss_bytes": baseline, "resident_rss_bytes": resident,
            "peak_rss_bytes": _status_kib("VmHWM") * 1024, "peak_reset": exact}


def measure_peak_rss(loader: str, path: str, workload: Workload, *, loader_kwargs: Mapping[str, Any] | None = None,
                     layers: Sequence[str] | None = None, choices: Sequence[Any] | None = None,
                     precision: str = "exact", threads: int | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
    """Peak resident memory of running ``path`` in a fresh process (Linux ``/proc``; bytes).

    The child imports ``loader`` (``"module:function"``, called with
    ``loader_kwargs``, returning the float32 model), builds the path
    (``to_sparse`` from ``choices``, not re-measured), frees the source,
    resets its peak RSS, then generates ``workload.tokens`` tokens and runs
    one forward pass per batch size. Returns ``baseline_rss_bytes`` (the
    runtime before the model is loaded), ``resident_rss_bytes`` (after the
    path is built), ``peak_rss_bytes`` (while running; since the start of
    the process where the peak cannot be reset, and ``peak_reset`` False).
    """
    spec = {"loader": loader, "loader_kwargs": dict(loader_kwargs or {}), "path": path,
            "workload": asdict(workload), "layers": list(layers) if layers is not None else None,
            "choices": [c if isinstance(c, dict) else asdict(c) for c in choices] if choices is not None else None,
            "precision": precision, "threads": threads or torch.get_num_threads()}
    code = ("import json, sys\nfrom sparseforge.speed import peak_rss_child\n"
            "print('SPARSEFORGE-RSS ' + json.dumps(peak_rss_child(json.loads(sys.argv[1]))))")
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        raise SparseforgeError(f"measuring the peak memory of {path} took over {timeout} s") from None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SPARSEFORGE-RSS ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SparseforgeError(f"the process measuring the memory of path {path} failed: {tail}")
    return json.loads(line.removeprefix("SPARSEFORGE-RSS "))


# -- the report ----------------------------------------------------------------------------------


@dataclass
class SpeedReport:
    """Every path's timings, bytes and memory, with ratios against the best dense path the policy allows.

    ``rows``: one dict per path (see :meth:`to_dict`); ``best_dense``: per
    workload (``"decode"`` and each batch size) the fastest dense path.
    """

    model: str
    precision: str
    workload: Workload
    rows: list[dict[str, Any]]
    best_dense: dict[str, str]
    threads: int
    kernels: str
    inputs: str = "inputs"
    to_sparse: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "precision": self.precision, "workload": asdict(self.workload),
                "threads": self.threads, "kernels": self.kernels, "inputs": self.inputs, "best_dense": self.best_dense,
                "paths": self.rows, "to_sparse": self.to_sparse, "notes": self.notes}

    def __str__(self) -> str:
        w = self.workload
        head = ["path", "weights MiB"]
        if w.tokens:
            head += ["tok/s", "ms/tok", "x best"]
        for b in w.batch_sizes:
            head += [f"b{b} ms", "x best"]
        head += ["memory MiB"]
        table = [head]
        for r in self.rows:
            cells = [r["path"], f"{r['weight_bytes'] / 2**20:,.1f}"]
            if w.tokens:
                d = r["decode"]
                cells += [f"{d['tokens_per_s']:.2f}", f"{d['ms_per_token']:.2f}", f"{d['vs_best_dense']:.2f}x"]
            for b in w.batch_sizes:
                f = r["forward"][str(b)]
                cells += [f"{f['ms']:.3f}", f"{f['vs_best_dense']:.2f}x"]
            mem = r["memory"]
            cells.append(f"{(mem.get('peak_rss_bytes') or mem['estimate_bytes']) / 2**20:,.1f}")
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = [f"{self.model}: precision {self.precision}, {self.threads} threads, kernels {self.kernels}"]
        what = []
        if w.tokens:
            what.append(f"generation: {w.tokens} new tokens after a {w.prompt_len}-token prompt, batch 1, greedy, "
                        "KV cache (tok/s of the decode steps)")
        if w.batch_sizes:
            what.append(f"forward passes: ms per batch of {self.inputs}")
        lines += what
        lines.append(f"x best: the best dense path's time over the path's ({', '.join(sorted(set(self.best_dense.values())))}"
                     f"); medians of {w.rounds} interleaved rounds")
        lines.append("")
        for row in table:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        lines.append("")
        rss = any(r["memory"].get("peak_rss_bytes") for r in self.rows)
        lines.append("memory: " + ("peak RSS of a fresh process running the path (runtime included)" if rss else
                                   "weights + KV cache of one generation (computed, not measured)"))
        for r in self.rows:
            lines.append(f"  {r['path']}: {r['description']}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def report_rows(paths: Mapping[str, BuiltPath], timings: Mapping[str, PathTiming], model: nn.Module,
                workload: Workload, memory: Mapping[str, Mapping[str, Any]] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The rows of a :class:`SpeedReport` and the best dense path per workload (ratios: best dense time / path time)."""
    dense = [n for n in paths if n in DENSE_PATHS]
    if not dense:
        raise SparseforgeError("no dense path to compare against")
    best: dict[str, str] = {}
    if workload.tokens:
        best["decode"] = min(dense, key=lambda n: timings[n].ms_per_token or float("inf"))
    for b in workload.batch_sizes:
        best[str(b)] = min(dense, key=lambda n: timings[n].forward_ms[b])
    rows = []
    for name, p in paths.items():
        t = timings[name]
        kv = kv_cache_bytes(model, workload.prompt_len + workload.tokens,
                            torch.float32 if p.input_dtype == torch.float32 else torch.bfloat16) if workload.tokens else 0
        row: dict[str, Any] = {"path": name, "description": p.description, "weight_bytes": p.weight_bytes, "bytes_per_token": p.bytes_per_token}
        if workload.tokens:
            ref = timings[best["decode"]].ms_per_token
            row["decode"] = {"tokens_per_s": t.tokens_per_s, "ms_per_token": t.ms_per_token,
                             "prefill_ms": t.prefill_ms, "generate_s": t.generate_s,
                             "vs_best_dense": round(ref / t.ms_per_token, 3) if ref and t.ms_per_token else None}
        row["forward"] = {str(b): {"ms": t.forward_ms[b],
                                   "vs_best_dense": round(timings[best[str(b)]].forward_ms[b] / t.forward_ms[b], 3)}
                          for b in workload.batch_sizes}
        row["memory"] = {"estimate_bytes": p.weight_bytes + kv, "kv_cache_bytes": kv,
                         "estimate": "weights + KV cache (computed)"} | dict((memory or {}).get(name, {}))
        rows.append(row)
    return rows, best


def measure_speed(model: nn.Module, *, precision: str = "int8", workload: Workload | None = None,
                  paths: Sequence[str] | None = None, to_sparse_precision: str | None = None,
                  layers: Sequence[str] | None = None, loader: tuple[str, Mapping[str, Any]] | None = None,
                  name: str = "", log: Callable[[str], None] | None = None) -> SpeedReport:
    """Build every path the policy allows of a float32 ``model``, time them interleaved, and report.

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` layers, or a ``transformers``
            causal LM (then ``workload.tokens`` may ask for generation). Packed
            layers in it (a model loaded from ``.sfz`` on packed layers) are
            unpacked first, in place: every path starts from the same weights.
        precision: the policy (``"exact"``, ``"bf16"``, ``"int8"``, default:
            every path): which dense paths and packed formats are listed and
            compared against (:func:`path_names`).
        workload: what to run (:class:`Workload`; default batch sizes 1, 8, 64).
        paths: a subset of the policy's paths (default all).
        to_sparse_precision: the policy of the ``to_sparse`` path (default ``precision``).
        layers: the Linear layers the packed paths pack (default :func:`linear_layers`).
        loader: ``("module:function", kwargs)`` that loads ``model`` again in
            a fresh process: then each path's peak RSS is measured
            (:func:`measure_peak_rss`); default: memory is estimated.
        name: what to call the model in the report.
        log: called with progress lines.

    ``to_sparse`` is asked to be no slower than the best dense path at
    every row count the workload runs (1 for generation; batch x seq_len
    tokens for a transformers model's forward passes).
    """
    if not isinstance(model, nn.Module):
        raise SparseforgeError(f"measure_speed takes an nn.Module, got {type(model).__name__}")
    workload = workload or Workload()
    allowed = path_names(precision)
    chosen = tuple(paths) if paths is not None else allowed
    refused = [p for p in chosen if p not in allowed]
    if refused:
        raise SparseforgeError(f"precision {precision!r} allows the paths {', '.join(allowed)}; not {refused}")
    if not any(p in DENSE_PATHS for p in chosen):
        raise SparseforgeError("the paths must include a dense one: ratios are against the best dense path")
    for n, m in list(model.named_modules()):
        if isinstance(m, PackedLinear):
            set_submodule(model, n, m.to_dense())
    model.eval()
    _check_workload(model, workload)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise SparseforgeError(f"{type(model).__name__} has no nn.Linear layers: nothing for the bf16, int8 or "
                               "sparse paths to run faster")
    if not is_hf_model(model):
        _input_shape(model, workload)  # fails early, with the fix, before anything is built
    notes: list[str] = []
    rows_seen = sorted({workload.rows(model, b) for b in workload.batch_sizes} | ({1} if workload.tokens else set()))
    ts_opts = {"precision": to_sparse_precision or precision, "batch_size": rows_seen[0],
               "check_batch_sizes": tuple(rows_seen[1:]), "rounds": workload.rounds}
    built: dict[str, BuiltPath] = {}
    for p in chosen:
        if rest_of(p) == "dense-int8" and not int8_weight_only_available():
            notes.append(f"{p}: skipped, this PyTorch has no int8 weight-only kernel")
            continue
        if log:
            log(f"building {p}")
        built[p] = build_path(model, p, layers=layers, to_sparse_options=ts_opts)
    timings = time_paths(built, model, workload, log)
    memory: dict[str, dict[str, Any]] = {}
    if loader is not None:
        report = built[TO_SPARSE].to_sparse if TO_SPARSE in built else None
        for p in built:
            if log:
                log(f"peak memory of {p} (a fresh process)")
            memory[p] = measure_peak_rss(loader[0], p, workload, loader_kwargs=loader[1], layers=layers,
                                         choices=report.layers if p == TO_SPARSE and report else None,
                                         precision=report.precision if p == TO_SPARSE and report else "exact")
    rows, best = report_rows(built, timings, model, workload, memory)
    from sparseforge.kernels.native import native_status

    ts = built[TO_SPARSE].to_sparse if TO_SPARSE in built else None
    inputs = (f"sequences of {workload.seq_len} random token ids" if is_hf_model(model)
              else f"random inputs of shape {list(_input_shape(model, workload))}")
    return SpeedReport(name or type(model).__name__, precision, workload, rows, best, torch.get_num_threads(),
                       str(native_status()["isa"]), inputs, ts.to_dict() if ts is not None else None, notes)
