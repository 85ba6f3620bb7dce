"""Transformer blocks as data: where a block keeps its projections, head sizes and activation.

:mod:`sparseforge.compact.transformer` removes attention heads and FFN hidden
units from Hugging Face models, whose forwards ``torch.fx`` cannot trace. It
finds the blocks by trying every layout registered in :data:`LAYOUTS` on every
module, in registration order; the first layout of each kind (attention,
FFN) that fits a module describes it. A layout is plain data, so a model
family sparseforge does not know is one registration away::

    from sparseforge.compact.layouts import LAYOUTS, AttentionLayout

    LAYOUTS.register("my-attention", AttentionLayout(
        q="wq", k="wk", v="wv", o="wo", head_dim="d_head", num_heads="n_heads",
        attributes={"n_heads": "heads"}, summary="My model's attention."))

Names in a layout are attribute paths relative to the block (``"self.query"``,
``"output.dense"``). A projection is any layer whose compaction handler is a
:class:`~sparseforge.compact.handlers.LinearHandler`: ``nn.Linear``,
transformers' ``Conv1D`` (weight stored ``[in, out]``), or a layer of your
own registered with :func:`~sparseforge.compact.handlers.register_handler`.

A module *resembles* a layout when every projection the layout names exists
on it. It *fits* when, besides, the projections are layers compact can slice
and the head attributes are integers; a module that resembles a layout
without fitting it is reported (:class:`Miss`), never skipped silently. A
block that fits but whose sizes disagree with its head counts (or that a
layout marks ``unsupported``, as GPT-2's cross-attention) is kept whole and
reported with the reason.

Heads in the projections. Head ``h`` owns output rows ``h*d .. (h+1)*d`` of
the query projection (``d``: the head size) and input columns ``h*d ..
(h+1)*d`` of the output projection; KV head ``g`` the rows ``g*d .. (g+1)*d``
of the key and value projections. A fused projection stacks them in one
weight, either as ``"qkv"`` (``[all query heads | all key heads | all value
heads]``: GPT-2's ``c_attn``, Phi-3's ``qkv_proj``) or as ``"per-head"``
(``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``: GPT-NeoX's ``query_key_value``;
without grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.compact.handlers import LinearHandler, handler_for, require_handler
from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

__all__ = [
    "FUSED_ORDERS", "LAYOUTS", "ROLES", "AttentionBlock", "AttentionLayout", "FFNBlock", "FFNLayout", "Miss",
    "is_projection", "projection_weight",
]

#: What an attribute of an attention module counts, for :attr:`AttentionLayout.attributes`: query heads,
#: KV heads, or their widths (heads x head size).
ROLES = ("heads", "kv_heads", "width", "kv_width")
#: How a fused q/k/v projection stacks its heads (see the module docstring).
FUSED_ORDERS = ("qkv", "per-head")

_PROJECTIONS = "nn.Linear, transformers' Conv1D, or a layer registered with a LinearHandler"


# ---------------------------------------------------------------- helpers


def _get(obj: Any, path: str) -> Any:
    """The attribute at dotted ``path`` below ``obj`` (None where any step is missing)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def is_projection(module: Any) -> bool:
    """Whether compact can slice ``module`` as a linear map: its layer handler is a
    :class:`~sparseforge.compact.handlers.LinearHandler` (``nn.Linear``, transformers' ``Conv1D``,
    or a user layer registered with one)."""
    return isinstance(handler_for(module), LinearHandler)


def projection_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight, detached, as ``[out, in]`` (a view: a ``Conv1D``'s ``[in, out]`` transposed)."""
    return require_handler(module).weight(module)


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _copy(mapping: Mapping[str, str]) -> dict[str, str]:
    return dict(mapping)  # a copy, so that the caller's dict changing later does not change the layout


# ---------------------------------------------------------------- what a match gives


@dataclass
class Miss:
    """A module that resembles layout ``layout`` (every projection it names exists) but does not fit it."""

    name: str
    layout: str
    kind: str
    reason: str

    def message(self) -> str:
        """The report's line: which module, which layout, why it was left whole."""
        return f"{self.name}: looks like a {self.layout!r} {self.kind} block, but {self.reason}; left whole"


@dataclass
class AttentionBlock:
    """One attention block of a model: its projections (full module names) and head layout.

    ``q``, ``k`` and ``v`` name the same module when the projection is fused
    (``fused`` is then its order, see :data:`FUSED_ORDERS`); ``attrs`` is the
    module whose integer attributes :attr:`attributes` (attribute -> role)
    follow the head count; ``blocked`` says why the block is kept whole.
    """

    name: str
    layout: str
    q: str
    k: str
    v: str
    o: str
    attrs: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fused: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    covers: list[str] = field(default_factory=list)

    def value_rows(self, group: int) -> slice:
        """The output rows of the value projection that belong to KV head ``group``."""
        d = self.head_dim
        if self.fused == "per-head":
            return slice(group * 3 * d + 2 * d, group * 3 * d + 3 * d)
        start = (self.num_heads + self.num_kv_heads) * d if self.fused == "qkv" else 0
        return slice(start + group * d, start + (group + 1) * d)

    def out_rows(self, kept_q: list[int], kept_kv: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The output rows kept in each q/k/v projection (one entry when fused) for the kept heads."""
        d = self.head_dim
        if self.fused == "per-head":  # kv == heads here: a head keeps its q, k and v rows together
            return {self.q: _rows(kept_q, 3 * d, device)}
        q_rows, kv_rows = _rows(kept_q, d, device), _rows(kept_kv, d, device)
        if self.fused == "qkv":
            k_start = self.num_heads * d
            v_start = k_start + self.num_kv_heads * d
            return {self.q: torch.cat([q_rows, kv_rows + k_start, kv_rows + v_start])}
        return {self.q: q_rows, self.k: kv_rows, self.v: kv_rows}

    def out_columns(self, kept_q: list[int], device: torch.device) -> torch.Tensor:
        """The input columns of the output projection kept for the kept query heads."""
        return _rows(kept_q, self.head_dim, device)

    def attribute_values(self, model: nn.Module, heads: int, kv_heads: int) -> dict[str, int]:
        """The attributes of :attr:`attrs` that change with ``heads`` query / ``kv_heads`` KV heads
        (those the module has as integers)."""
        module = model.get_submodule(self.attrs)
        counts = _role_values(heads, kv_heads, self.head_dim)
        return {attr: counts[role] for attr, role in self.attributes.items()
                if type(getattr(module, attr, None)) is int}


def _rows(keep: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Rows ``k*width .. (k+1)*width`` for each ``k`` in ``keep``, in order."""
    k = torch.tensor(keep, dtype=torch.long, device=device)
    return (k[:, None] * width + torch.arange(width, device=device)).reshape(-1)


def _role_values(heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    return {"heads": heads, "kv_heads": kv_heads, "width": heads * head_dim, "kv_width": kv_heads * head_dim}


@dataclass
class FFNBlock:
    """One feed-forward block: ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))`` without a gate."""

    name: str
    up: str
    down: str
    act: Any
    gate: str | None = None
    size: int = 0
    layout: str = ""
    covers: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention block keeps its projections and head sizes (names relative to the block).

    Args:
        q, k, v: the query, key and value projections (all three, or none
            with ``qkv``).
        o: the output projection.
        qkv: one fused q/k/v projection instead, stacked as ``fused``.
        fused: ``"qkv"`` or ``"per-head"`` (see :data:`FUSED_ORDERS`).
        module: the submodule holding the attributes below (default: the block).
        head_dim: the integer attribute holding the head size.
        num_heads: the attribute holding the query head count (default:
            the query projection's outputs / head size; a fused projection's
            outputs / (3 x head size)).
        num_kv_heads: the attribute holding the KV head count (default: the
            key projection's outputs / head size; as many as the query heads
            for a fused projection).
        kv_groups: an attribute holding query heads per KV head, checked only
            (removing whole KV groups keeps it).
        attributes: integer attributes the forward reads that follow the head
            count, each mapped to its role in :data:`ROLES`; they are checked
            against the sizes, and compaction sets those the module has.
        unsupported: attribute paths (relative to the block) that, when
            present and true, keep the block whole, with the reason given.
        summary: one line for the docs' table of layouts.
    """

    o: str
    head_dim: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    fused: str = "qkv"
    module: str = ""
    num_heads: str | None = None
    num_kv_heads: str | None = None
    kv_groups: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    unsupported: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""

    kind: ClassVar[str] = "attention"

    def __post_init__(self) -> None:
        separate = (self.q, self.k, self.v)
        if self.qkv is None and not all(separate):
            raise SparseforgeError("an AttentionLayout names q, k and v, or one fused qkv projection")
        if self.qkv is not None and any(separate):
            raise SparseforgeError("an AttentionLayout names either q, k and v or a fused qkv, not both")
        if self.fused not in FUSED_ORDERS:
            raise SparseforgeError(f"AttentionLayout fused={self.fused!r}: one of {', '.join(FUSED_ORDERS)}")
        if self.qkv is not None and self.fused == "per-head" and self.num_kv_heads is not None:
            raise SparseforgeError("a 'per-head' fused projection has one KV head per query head: drop num_kv_heads")
        bad = {a: r for a, r in self.attributes.items() if r not in ROLES}
        if bad:
            raise SparseforgeError(f"AttentionLayout attributes {bad}: each role is one of {', '.join(ROLES)}")
        object.__setattr__(self, "attributes", _copy(self.attributes))
        object.__setattr__(self, "unsupported", _copy(self.unsupported))

    @property
    def projections(self) -> tuple[str, ...]:
        """The projection paths, q/k/v (or qkv) then o."""
        inputs = [self.qkv] if self.qkv is not None else [self.q, self.k, self.v]
        return tuple(p for p in inputs if p is not None) + (self.o,)

    def match(self, name: str, block: nn.Module, layout: str) -> AttentionBlock | Miss | None:
        """Describe module ``block`` (named ``name`` in its model) by this layout (registered as ``layout``).

        Returns None when ``block`` does not resemble the layout (a projection
        is missing), a :class:`Miss` when it resembles it but cannot be
        handled, else the :class:`AttentionBlock` (with ``blocked`` reasons
        when its sizes do not fit).
        """
        mods = {p: _get(block, p) for p in self.projections}
        if any(m is None for m in mods.values()):
            return None
        miss = _not_projections(name, layout, self.kind, mods)
        if miss is not None:
            return miss
        holder = _get(block, self.module) if self.module else block
        where = f"{self.module}." if self.module else ""

        def number(attr: str, what: str) -> int | Miss:
            value = getattr(holder, attr, None)
            if _positive_int(value):
                return value
            return Miss(name, layout, self.kind, f"{where}{attr} (the {what}) is {value!r}, not a positive integer")

        d = number(self.head_dim, "head size")
        if isinstance(d, Miss):
            return d
        first_out = projection_weight(mods[self.projections[0]]).shape[0]
        if self.num_heads is not None:
            h = number(self.num_heads, "head count")
        else:
            h = first_out // (d if self.qkv is None else 3 * d)
        if isinstance(h, Miss):
            return h
        if self.num_kv_heads is not None:
            kv = number(self.num_kv_heads, "KV head count")
        elif self.qkv is None:
            kv = projection_weight(mods[self.k]).shape[0] // d
        else:
            kv = h
        if isinstance(kv, Miss):
            return kv
        q, k, v = (_join(name, p) for p in ((self.qkv,) * 3 if self.qkv is not None else (self.q, self.k, self.v)))
        result = AttentionBlock(
            name, layout, q, k, v, _join(name, self.o), _join(name, self.module), h, kv, d,
            self.fused if self.qkv is not None else None, dict(self.attributes),
            covers=sorted({_join(name, p.split(".")[0]) for p in self.projections}),
        )
        reason = self._unsupported(block) or self._misfit(mods, holder, h, kv, d)
        if reason:
            result.blocked.append(f"{name}: {reason}")
        return result

    def _unsupported(self, block: nn.Module) -> str | None:
        return next((why for path, why in self.unsupported.items() if _get(block, path)), None)

    def _misfit(self, mods: dict[str, Any], holder: nn.Module, h: int, kv: int, d: int) -> str | None:
        """Why the sizes do not fit ``h`` query / ``kv`` KV heads of ``d`` (None when they do)."""
        out = {p: projection_weight(m).shape[0] for p, m in mods.items()}
        o_in = projection_weight(mods[self.o]).shape[1]
        names = "/".join(p.split(".")[-1] for p in self.projections)
        if self.qkv is None:
            fits = (out[self.q] == h * d and out[self.k] == kv * d and out[self.v] == kv * d and o_in == h * d
                    and kv > 0 and h % kv == 0)
        else:
            fits = out[self.qkv] == (h + 2 * kv) * d and o_in == h * d and (self.fused != "per-head" or kv == h)
        if not fits:
            return f"{names} sizes do not fit {h} heads ({kv} KV heads) x {d}"
        counts = _role_values(h, kv, d)
        for attr, role in self.attributes.items():
            value = getattr(holder, attr, None)
            if type(value) is int and value != counts[role]:
                return f"{attr} is {value}, not {counts[role]} ({role}) for {h} heads ({kv} KV heads) x {d}"
        groups = getattr(holder, self.kv_groups, None) if self.kv_groups else None
        if groups is not None and groups != h // kv:
            return f"{self.kv_groups} {groups} does not match {h} query / {kv} KV heads"
        return None


@dataclass(frozen=True)
class FFNLayout:
    """Where a feed-forward block keeps its projections and activation (names relative to the block).

    The block computes ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))``
    when it has no ``gate`` (a gate the layout names but the module lacks
    makes an ungated block). ``act`` is the attribute path of the activation
    (any callable).
    """

    up: str
    down: str
    act: str
    gate: str | None = None
    summary: str = ""

    kind: ClassVar[str] = "FFN"

    def match(self, name: str, block: nn.Module, layout: str) -> FFNBlock | Miss | None:
        """Describe module ``block`` by this layout: None, a :class:`Miss`, or the :class:`FFNBlock`
        (see :meth:`AttentionLayout.match`)."""
        mods = {p: _get(block, p) for p in (self.up, self.down)}
        if any(m is None for m in mods.values()):
            return None
        gate = _get(block, self.gate) if self.gate else None
        if gate is not None:
            mods[self.gate] = gate  # type: ignore[index]
        miss = _not_projections(name, layout, self.kind, mods)
        if miss is not None:
            return miss
        act = _get(block, self.act)
        if not callable(act):
            return Miss(name, layout, self.kind, f"{self.act} (the activation) is {act!r}, not callable")
        size = projection_weight(mods[self.up]).shape[0]
        down_in = projection_weight(mods[self.down]).shape[1]
        gate_out = projection_weight(gate).shape[0] if gate is not None else size
        if down_in != size or gate_out != size:
            sizes = f"{self.up} has {size} outputs, {self.down} {down_in} inputs" + (
                f", {self.gate} {gate_out} outputs" if gate is not None else "")
            return Miss(name, layout, self.kind, f"its sizes differ ({sizes})")
        paths = [self.up, self.down, self.act] + ([self.gate] if gate is not None else [])
        return FFNBlock(name, _join(name, self.up), _join(name, self.down), act,
                        _join(name, self.gate) if gate is not None else None, size, layout,
                        covers=sorted({_join(name, p.split(".")[0]) for p in paths}))


def _not_projections(name: str, layout: str, kind: str, mods: dict[str, Any]) -> Miss | None:
    bad = [f"{p} is a {type(m).__name__}" for p, m in mods.items() if not is_projection(m)]
    if bad:
        return Miss(name, layout, kind, f"{', '.join(bad)}, not a layer compact can slice ({_PROJECTIONS})")
    return None


# ---------------------------------------------------------------- the registry and the built-ins


LAYOUTS: Registry[AttentionLayout | FFNLayout] = Registry("transformer layout")
"""Every transformer block layout compaction knows, tried in registration order (first fit wins)."""

LAYOUTS.register("bert-attention", AttentionLayout(
    q="self.query", k="self.key", v="self.value", o="output.dense", module="self",
    head_dim="attention_head_size", num_heads="num_attention_heads",
    attributes={"num_attention_heads": "heads", "all_head_size": "width"},
    summary="BERT attention (BERT, RoBERTa, MiniLM, ...): self.{query,key,value} and output.dense; the "
            "forward reshapes by attention_head_size, so fewer heads need num_attention_heads and all_head_size.",
))
LAYOUTS.register("vit-attention", AttentionLayout(
    q="attention.query", k="attention.key", v="attention.value", o="output.dense", module="attention",
    head_dim="attention_head_size", num_heads="num_attention_heads",
    attributes={"num_attention_heads": "heads", "all_head_size": "width"},
    summary="BERT attention with its projections under attention.* (ViT and its kin in transformers 4).",
))
LAYOUTS.register("llama-attention", AttentionLayout(
    q="q_proj", k="k_proj", v="v_proj", o="o_proj", head_dim="head_dim", kv_groups="num_key_value_groups",
    attributes={"num_heads": "heads", "num_attention_heads": "heads", "num_key_value_heads": "kv_heads"},
    summary="LLaMA attention (LLaMA, Mistral, Qwen2/3, Gemma, ViT in transformers 5, ...): {q,k,v,o}_proj and "
            "head_dim; grouped-query attention has fewer key/value heads, each shared by num_key_value_groups "
            "query heads.",
))
LAYOUTS.register("opt-attention", AttentionLayout(
    q="q_proj", k="k_proj", v="v_proj", o="out_proj", head_dim="head_dim", kv_groups="num_key_value_groups",
    attributes={"num_heads": "heads", "num_attention_heads": "heads", "num_key_value_heads": "kv_heads"},
    summary="LLaMA attention whose output projection is out_proj (OPT, BART, CLIP, ...).",
))
LAYOUTS.register("phi-attention", AttentionLayout(
    q="q_proj", k="k_proj", v="v_proj", o="dense", head_dim="head_dim", kv_groups="num_key_value_groups",
    attributes={"num_heads": "heads", "num_attention_heads": "heads", "num_key_value_heads": "kv_heads"},
    summary="LLaMA attention whose output projection is dense (Phi).",
))
LAYOUTS.register("gpt2-attention", AttentionLayout(
    qkv="c_attn", fused="qkv", o="c_proj", head_dim="head_dim", num_heads="num_heads",
    attributes={"num_heads": "heads", "split_size": "width"},
    unsupported={"is_cross_attention": "GPT-2 cross-attention (q_attn) is not compacted",
                 "q_attn": "GPT-2 cross-attention (q_attn) is not compacted"},
    summary="GPT-2 attention: the fused c_attn (transformers Conv1D, outputs [q | k | v]) and c_proj, with "
            "num_heads and split_size; cross-attention is kept whole.",
))
LAYOUTS.register("gpt-neox-attention", AttentionLayout(
    qkv="query_key_value", fused="per-head", o="dense", head_dim="head_size",
    attributes={"num_attention_heads": "heads"},
    summary="GPT-NeoX attention (Pythia): the fused query_key_value stacks [q k v] head by head, then dense.",
))
LAYOUTS.register("bert-ffn", FFNLayout(
    up="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn",
    summary="BERT feed-forward: intermediate.dense with intermediate_act_fn, then output.dense (in the layer).",
))
LAYOUTS.register("llama-ffn", FFNLayout(
    up="up_proj", gate="gate_proj", down="down_proj", act="act_fn",
    summary="LLaMA feed-forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)); without gate_proj, "
            "down_proj(act_fn(up_proj(x))).",
))
LAYOUTS.register("gpt2-ffn", FFNLayout(
    up="c_fc", down="c_proj", act="act",
    summary="GPT-2 feed-forward: c_fc and c_proj (transformers Conv1D) with act.",
))
LAYOUTS.register("gpt-neox-ffn", FFNLayout(
    up="dense_h_to_4h", down="dense_4h_to_h", act="act",
    summary="GPT-NeoX feed-forward: dense_h_to_4h, act, dense_4h_to_h.",
))
LAYOUTS.register("opt-ffn", FFNLayout(
    up="fc1", down="fc2", act="activation_fn",
    summary="fc1, activation_fn, fc2: OPT (directly in the decoder layer), Phi and ViT in transformers 5 "
            "(in the MLP module).",
))
