"""Compaction of Hugging Face transformers: remove pruned attention heads and FFN hidden units.

Hugging Face models cannot be traced by ``torch.fx`` (data-dependent control
flow, ``**kwargs`` forwards), so :func:`sparseforge.compact` takes this
*structural* path for a ``transformers.PreTrainedModel``: the blocks are
recognised by their module names and classes, and only the dimensions that
are internal to a block are removed (heads inside attention, hidden units
inside the feed-forward network). The residual stream (``hidden_size``: the
embeddings, every LayerNorm and every block's input and output) ties the
whole model into one group and is not compacted. The groups are those of
"DepGraph: Towards Any Structural Pruning" (Fang et al. 2023), written down
per block instead of traced.

The blocks are described by the layouts registered in
:data:`sparseforge.compact.layouts.LAYOUTS` (a table in
``docs/architecture.md``): where a block keeps its query/key/value (or fused
qkv) and output projections, which attributes hold its head size and head
counts (and which of them the forward reads, so that compaction updates
them), and for a feed-forward block its up, gate and down projections and
activation. Every module is tried against every layout, in registration
order; the first attention layout and the first FFN layout that fit a module
describe it. Built in: BERT-style attention (BERT, RoBERTa, MiniLM; ViT of
transformers 4), LLaMA-style attention with ``o_proj`` or ``out_proj``
(grouped-query attention: ``num_key_value_heads`` KV heads, each shared by
``num_key_value_groups`` consecutive query heads), GPT-2's fused ``c_attn``
(GPT-2 cross-attention is left whole), and the BERT, LLaMA (gated), GPT-2 and
OPT (``fc1``/``fc2``) feed-forward blocks. Register a layout for a family
sparseforge does not know (see ``docs/extending.md``). A module that looks
like a layout (every projection it names exists) but cannot be handled, and
any module whose class name says attention or MLP but that no layout
describes, is listed in the report as left whole.

Rule for an FFN hidden unit ``j`` (the same as for a channel in
:mod:`sparseforge.compact.compactor`): its value is constant when its row of the
up projection is entirely zero: ``act(b_up[j])`` (``b = 0`` without a bias;
GELU(0) = SiLU(0) = ReLU(0) = 0, so a zero row without a bias outputs 0); for
a gated FFN the unit is ``act(gate_j) * up_j``, which is 0 when either factor
is a zero constant and ``act(b_gate[j]) * b_up[j]`` when both are constant.
The unit is removed when its value is 0, or its column of the down
projection is entirely zero, or its value is a constant ``k`` and the down
projection has a bias (``k * W_down[:, j]`` is folded into it). Otherwise it
is kept.

Rule for attention heads ("Are Sixteen Heads Really Better than One?",
Michel et al. 2019, shows many heads can go): head ``h`` contributes nothing
when its columns of the output projection are entirely zero, or its value
rows and value bias are zero (softmax weights sum to one, so the head
outputs its value bias, here 0). A head whose value rows are zero but whose
value bias is not outputs exactly that bias whatever the input; it is
removed and ``W_o[:, head] @ b_v`` folded into the output projection's bias
(kept when the output projection has no bias). Zero query or key rows alone
do not make a head removable: they make its attention uniform, not zero.

Grouped-query attention: the unit removed is a whole KV group (one KV head
and all the query heads that share it), removed when every query head of the
group contributes nothing by the rule above (a zero value head silences the
whole group). Query heads of a group that is kept are kept, even if some are
dead: dropping some query heads of a group would give groups of unequal size,
which ``repeat_kv`` (and every attention kernel) cannot express. With
``num_key_value_heads == num_attention_heads`` the groups are single heads.
``num_key_value_groups`` is therefore unchanged.

Every attention block keeps at least one head (KV group) and every FFN at
least one unit. The result is checked on an example input (token ids and an
attention mask, random unless given): the first output (``last_hidden_state``
or ``logits``) must match the model before compaction, otherwise the model is
restored and an error raised.

Per-layer sizes differ after compaction, which a ``PretrainedConfig`` cannot
describe (``config.num_attention_heads`` and ``config.intermediate_size``
still give the original sizes), so ``save_pretrained``/``from_pretrained``
cannot rebuild the model. Save it with
:func:`sparseforge.io.checkpoint.save_checkpoint` (or ``sf.save``): the
new shapes (``model.sparseforge_compact``: Linear/Conv1D sizes and the
attention modules' changed attributes) go with the weights, and
``load_compacted(path, model)`` rebuilds them in a freshly built model of the
original sizes (``AutoModel.from_config(config)`` or ``from_pretrained``).
A static (preallocated) KV cache sized from the config does not fit layers
with fewer KV heads; the default dynamic cache does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sparseforge.compact.layouts import LAYOUTS, AttentionBlock, FFNBlock, Miss, projection_weight
from sparseforge.compact.plan import CompactReport, Plan, apply_plan, count_parameters
from sparseforge.errors import SparseforgeError


# ---------------------------------------------------------------- recognising blocks


def _known() -> str:
    return f"known layouts: {', '.join(LAYOUTS.names())}; register others in sparseforge.compact.layouts.LAYOUTS"


def _first_fit(name: str, module: nn.Module, kind: str) -> tuple[AttentionBlock | FFNBlock | None, Miss | None]:
    """The block that the first fitting layout of ``kind`` makes of ``module``, else the first near miss."""
    miss = None
    for layout_name, layout in LAYOUTS.items():
        if layout.kind != kind:
            continue
        found = layout.match(name, module, layout_name)
        if isinstance(found, Miss):
            miss = miss or found
        elif found is not None:
            return found, None
    return None, miss


_CANDIDATE_WORDS = ("attention", "mlp", "feedforward", "ffn", "intermediate")


def find_attention_and_ffn(
    model: nn.Module,
) -> tuple[list[AttentionBlock], list[FFNBlock], list[tuple[str, str]]]:
    """The attention and FFN blocks of ``model``, and ``(module, report line)`` for the modules left whole.

    Those name the modules that resemble a registered layout but do
    not fit it (:class:`~sparseforge.compact.layouts.Miss`), then the
    modules whose class name says attention or MLP but that no layout
    describes.

    Raises :class:`SparseforgeError` when no block at all is recognised,
    naming the first module that looks like an attention or MLP block.
    """
    attn: list[AttentionBlock] = []
    ffn: list[FFNBlock] = []
    misses: list[Miss] = []
    covered: list[str] = []  # modules inside a recognised block: its parts, not blocks of their own
    for name, m in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        for kind, found_list in (("attention", attn), ("FFN", ffn)):
            block, miss = _first_fit(name, m, kind)
            if block is not None:
                found_list.append(block)
                covered += block.covers
            elif miss is not None:
                misses.append(miss)
    known = [b.name for b in attn] + [f.name for f in ffn] + [miss.name for miss in misses]
    unknown = [
        f"{name} ({type(m).__name__})" for name, m in model.named_modules()
        if name and any(w in type(m).__name__.lower() for w in _CANDIDATE_WORDS)
        and not any(name == k or name.startswith(k + ".") or k.startswith(name + ".") for k in known)
    ]
    left = [(miss.name, miss.message()) for miss in misses] + [
        (u, f"{u}: not a recognised block ({_known()}); left whole") for u in unknown]
    if not attn and not ffn:
        where = f"; first unrecognised module: {misses[0].message() if misses else unknown[0]}" if left else ""
        raise SparseforgeError(
            f"compact: {type(model).__name__} has no attention or feed-forward block that sparseforge can "
            f"compact ({_known()}){where}"
        )
    return attn, ffn, left


# ---------------------------------------------------------------- decisions


def _rows_zero(w: torch.Tensor) -> torch.Tensor:
    return (w == 0).all(dim=1)


def _bias(m: nn.Module) -> torch.Tensor | None:
    b = getattr(m, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


def _constant(m: nn.Module, lo: int = 0, n: int | None = None) -> torch.Tensor:
    """Per output row ``lo..lo+n``: the bias where the row is all zero (0 without bias), NaN elsewhere."""
    w = projection_weight(m)
    n = w.shape[0] - lo if n is None else n
    b = _bias(m)
    v = b[lo:lo + n].double().clone() if b is not None else torch.zeros(n, dtype=torch.float64, device=w.device)
    v[~_rows_zero(w[lo:lo + n])] = float("nan")
    return v


def _act(act: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``act`` applied to the finite entries of ``v`` (in the model's dtype); NaN stays NaN."""
    out = torch.full_like(v, float("nan"))
    ok = ~torch.isnan(v)
    if ok.any():
        out[ok] = act(v[ok].to(dtype)).double()
    return out


def ffn_unit_values(model: nn.Module, f: FFNBlock) -> torch.Tensor:
    """Each hidden unit's constant output (NaN where it depends on the input)."""
    up = model.get_submodule(f.up)
    dtype = up.weight.dtype
    u = _constant(up)
    if f.gate is None:
        return _act(f.act, u, dtype)
    g = _act(f.act, _constant(model.get_submodule(f.gate)), dtype)
    value = g * u  # NaN unless both are constant
    return torch.where((u == 0) | (g == 0), torch.zeros_like(value), value)


def decide_ffn(model: nn.Module, f: FFNBlock) -> tuple[list[int], dict[int, float]]:
    """Units to remove and the constants ``{unit: k}`` to fold into the down projection's bias."""
    values = ffn_unit_values(model, f)
    down = model.get_submodule(f.down)
    col_zero = _rows_zero(projection_weight(down).t())
    has_bias = _bias(down) is not None
    removable, folds = [], {}
    for j in range(f.size):
        v = float(values[j])
        if v == 0.0 or bool(col_zero[j]):
            removable.append(j)
        elif v == v and has_bias:
            removable.append(j)
            folds[j] = v
    if len(removable) == f.size:  # keep one unit so that no layer becomes empty
        folds.pop(removable.pop(0), None)
    return removable, folds


def decide_heads(model: nn.Module, a: AttentionBlock) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    """KV groups to remove and ``(query head, value bias)`` pairs to fold into the output projection."""
    d, r = a.head_dim, a.num_heads // a.num_kv_heads
    v_mod, o_mod = model.get_submodule(a.v), model.get_submodule(a.o)
    wv, wo = projection_weight(v_mod), projection_weight(o_mod)
    bv = _bias(v_mod)
    o_bias = _bias(o_mod) is not None
    removable, folds = [], []
    for g in range(a.num_kv_heads):
        rows = a.value_rows(g)
        v_zero = bool((wv[rows] == 0).all())
        b = bv[rows] if bv is not None else None
        b_zero = b is None or bool((b == 0).all())
        ok, pending = True, []
        for h in range(g * r, (g + 1) * r):
            if bool((wo[:, h * d:(h + 1) * d] == 0).all()) or (v_zero and b_zero):
                continue
            if v_zero and o_bias:
                pending.append((h, b))
                continue
            ok = False
            break
        if ok:
            removable.append(g)
            folds += pending
    if len(removable) == a.num_kv_heads:  # keep one head (KV group)
        first = removable.pop(0)
        folds = [f for f in folds if not first * r <= f[0] < (first + 1) * r]
    return removable, folds


# ---------------------------------------------------------------- slicing


def _index(keep: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(keep, dtype=torch.long, device=device)


# ---------------------------------------------------------------- example input and check


def example_inputs(model: nn.Module, example_input: Any = None) -> dict[str, torch.Tensor]:
    """Keyword inputs for an HF model: ``example_input`` (a mapping such as a tokenizer's output, or a
    tensor of token ids), or random token ids ``[2, 12]`` with the second sequence's last 3 tokens padded."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if example_input is None:
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise SparseforgeError(
                f"{type(model).__name__}'s config has no vocab_size; pass example_input (a dict of model inputs)"
            )
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(vocab - 1, 5), vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    elif isinstance(example_input, torch.Tensor):
        if example_input.is_floating_point():
            raise SparseforgeError(
                "example_input for a Hugging Face model is token ids (an integer tensor) or a dict of model "
                "inputs, such as a tokenizer's output"
            )
        inputs = {"input_ids": example_input, "attention_mask": torch.ones_like(example_input)}
    elif isinstance(example_input, Mapping):
        inputs = dict(example_input)
    else:
        raise SparseforgeError(
            f"example_input for a Hugging Face model must be token ids or a dict of inputs, not "
            f"{type(example_input).__name__}"
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    first = out[0] if isinstance(out, tuple | list) else out.to_tuple()[0]
    if not isinstance(first, torch.Tensor):
        raise SparseforgeError(f"cannot check the compacted model: its first output is a {type(first).__name__}")
    return first


# ---------------------------------------------------------------- compact


@torch.no_grad()
def compact_transformer(model: nn.Module, example_input: Any = None, atol: float = 1e-4) -> CompactReport:
    """Remove pruned attention heads and FFN hidden units from an HF ``PreTrainedModel``, in place.

    The rules are in the module docstring: an FFN unit goes when its output is
    zero, meets a zero column of the down projection, or is a constant folded
    into the down projection's bias; a head (KV group under grouped-query
    attention) goes when every query head of it contributes nothing (zero
    output-projection columns, or zero value rows and bias; a value bias
    alone is folded into the output bias). At least one head and one unit
    stay per block. Called by :func:`sparseforge.compact`, which returns the
    same :class:`~sparseforge.compact.compactor.CompactReport`.

    Args:
        model: a ``transformers.PreTrainedModel`` with exact zeros.
        example_input: token ids, or a dict of inputs (``input_ids``,
            ``attention_mask``, ...); default: random ids with padding.
        atol: output tolerance relative to the output's largest magnitude
            (plus ``atol`` absolute).

    Raises:
        SparseforgeError: no block is recognised (naming a module that looks
            like one), or the outputs changed (the model is then restored).
    """
    attn, ffn, left_whole = find_attention_and_ffn(model)
    inputs = example_inputs(model, example_input)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        reference = _first_output(model(**inputs))
        report = CompactReport(params_before=count_parameters(model))
        plan = Plan()
        head_folds = []
        for a in attn:
            entry = {"members": [a.name], "layout": a.layout, "before": a.num_heads, "after": a.num_heads, "folded": 0,
                     "blocked": list(a.blocked), "kv_before": a.num_kv_heads, "kv_after": a.num_kv_heads}
            report.heads.append(entry)
            if a.blocked:
                continue
            removed, folds = decide_heads(model, a)
            if not removed:
                continue
            r, d = a.num_heads // a.num_kv_heads, a.head_dim
            gone = set(removed)
            kept_kv = [g for g in range(a.num_kv_heads) if g not in gone]
            kept_q = [h for g in kept_kv for h in range(g * r, (g + 1) * r)]
            entry.update(after=len(kept_q), kv_after=len(kept_kv), folded=len(folds))
            plan.out_keep.update(a.out_rows(kept_q, kept_kv, device))
            plan.in_keep[a.o] = a.out_columns(kept_q, device)
            values = a.attribute_values(model, len(kept_q), len(kept_kv))
            plan.attributes[a.attrs] = values
            plan.entries[a.attrs] = {"kind": "attributes", "values": dict(values)}
            o_mod = model.get_submodule(a.o)
            # a head with zero value rows outputs its value bias: W_o[:, head] @ b_v folds into the output bias
            head_folds += [(o_mod, lambda o=o_mod, h=h, b=b, d=d: (
                projection_weight(o)[:, h * d:(h + 1) * d].double() @ b.double()).to(o.bias.dtype)) for h, b in folds]

        for f in ffn:
            members = [f.up] + ([f.gate] if f.gate else [])
            removed, folds = decide_ffn(model, f)
            report.groups.append({"members": members, "layout": f.layout, "consumers": [f.down], "before": f.size,
                                  "after": f.size - len(removed), "folded": len(folds), "blocked": []})
            if not removed:
                continue
            gone = set(removed)
            keep = _index([j for j in range(f.size) if j not in gone], device)
            for n in members:
                plan.out_keep[n] = keep
            plan.in_keep[f.down] = keep
            if folds:  # constant units fold into the down projection's bias: k * W_down[:, unit]
                down = model.get_submodule(f.down)
                idx = torch.tensor(list(folds), dtype=torch.long, device=device)
                ks = torch.tensor(list(folds.values()), dtype=torch.float64, device=device)
                plan.fold(down, lambda down=down, idx=idx, ks=ks: (
                    projection_weight(down)[:, idx].double() @ ks).to(down.bias.dtype))
        for layer, delta in head_folds:
            plan.fold(layer, delta)

        for name, line in left_whole:
            report.groups.append({"members": [name], "consumers": [], "before": 0, "after": 0, "folded": 0,
                                  "blocked": [line]})
        apply_plan(model, plan, report, lambda: _first_output(model(**inputs)), reference, atol,
                   "Its attention or FFN forward probably reads a size that compact does not update")
        return report
    finally:
        model.train(was_training)
