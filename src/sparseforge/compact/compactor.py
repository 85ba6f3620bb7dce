"""``compact(model)``: physically remove pruned channels, giving a smaller dense model.

Rule. The channel groups of :mod:`sparseforge.compact.dependency` say which
slices belong to one channel. Channel ``c`` of a group is removed when
removing it leaves the model's output unchanged (in eval mode), decided from
the weights alone:

- its value is computed along the group: a producer whose filter/row is all
  zero outputs its bias (0 without a bias), BatchNorm maps a constant to a
  constant (its running statistics; a zero scale gives its shift whatever the
  input), elementwise activations and pooling keep a constant, additions add
  the members' constants; anything else is "not constant";
- then at every consumer (the next Conv2d's input channel, the Linear columns
  after a flatten) the channel must be exactly zero, or meet zero weights,
  or be a constant that folds exactly into the consumer's bias: for a Linear,
  and for a Conv2d without padding (``bias += k * sum of the weights read``).
  A constant meeting a zero-padded convolution (the borders see zeros, the
  inside sees ``k``) cannot be folded, so such a channel is **kept**: a
  filter pruned without its bias (or without its BatchNorm's shift) is kept
  where folding would not be exact. :func:`sparseforge.prune_channels` zeroes
  the whole group slice (filters, biases, BatchNorm scale and shift) so that
  its channels always go;
- a channel of a residual group goes only when every member (the stem or
  projection shortcut and every block's last conv/BN in the stage) leaves it
  zero or foldable: a channel pruned in some members only is kept.

Attention heads (see the dependency module's convention) are removed when the
head's value rows and bias are zero, or its output-projection columns are
zero; a zero value row with a nonzero value bias outputs that bias (softmax
weights sum to one) and is folded into the output projection's bias.

Hugging Face ``transformers`` models are not traced:
:mod:`sparseforge.compact.transformer` finds their attention and FFN blocks
through the layouts registered in :data:`sparseforge.compact.layouts.LAYOUTS`
(BERT, LLaMA, GPT-2, OPT, ... and your own) and removes heads (whole KV groups under
grouped-query attention) and FFN hidden units by the same rules, updating the
attention modules' head-count attributes (stored as ``"attributes"`` shape
entries, so that checkpoints rebuild them).

Every group and attention block keeps at least one channel/head. The result
is checked: the compacted model is run on the example input and must match
the original to float tolerance, otherwise the model is restored and an error
raised. The new shapes are stored on the model (``model.sparseforge_compact``)
and written by :func:`sparseforge.io.checkpoint.save_checkpoint`, so that
``load_checkpoint`` (and :func:`load_compacted`) rebuilds them.

BatchNorm equivalence holds in eval mode (running statistics); in training
mode BatchNorm normalises with batch statistics, which a removed constant
channel does not have.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparseforge.compact.dependency import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    POOL_FUNCTIONS,
    SCALAR_TARGETS,
    ChannelGroup,
    DependencyGraph,
    analyze,
    attention_out,
    attention_out_name,
    is_attention,
)
from sparseforge.compact.handlers import handler_for, require_handler
from sparseforge.compact.plan import (
    CompactReport, Plan, apply_plan, count_parameters, keep_index,
)
from sparseforge.compact.transformer import compact_transformer
from sparseforge.errors import SparseforgeError
from sparseforge.layers import hf_submodule, is_hf_model

# ---------------------------------------------------------------- channel values


def channel_values(dep: DependencyGraph, model: nn.Module) -> dict[str, torch.Tensor]:
    """For every tensor of a channel group: each channel's constant value, NaN where not constant."""
    gm: fx.GraphModule = dep.graph_module
    vals: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    nan = float("nan")

    def val(arg: Any) -> torch.Tensor | None:
        return vals.get(arg.name) if isinstance(arg, fx.Node) else None

    for node in gm.graph.nodes:
        if node.name not in dep.spaces:
            continue
        size = next(g.size for g in dep.groups if g.id == dep.spaces[node.name].gid)
        unknown = torch.full((size,), nan, dtype=torch.float64)
        x = node.args[0] if node.args else None
        v = val(x)
        out: torch.Tensor = unknown
        if node.op == "call_module":
            m = modules[node.target]
            if is_attention(m):  # its output is its output projection's
                out = require_handler(attention_out(m)).constant(attention_out(m), None, unknown)
            elif (handler := handler_for(m)) is not None:
                out = handler.constant(m, v, unknown)
            elif v is not None:
                out = v
        elif node.op == "call_function":
            if node.target in (torch.nn.functional.dropout, torch.nn.functional.dropout2d):
                out = v if v is not None else unknown
            elif node.target in ELEMENTWISE_FUNCTIONS and v is not None:
                rest = list(node.args[1:]) + list(node.kwargs.values())
                if any(isinstance(r, fx.Node) for r in rest):
                    out = unknown
                else:  # the same call (slope, approximate=...) on the constants
                    kwargs = {k: val for k, val in node.kwargs.items() if k != "inplace"}
                    out = node.target(v.clone(), *node.args[1:], **kwargs)
            elif node.target in POOL_FUNCTIONS and v is not None:
                pad = node.kwargs.get("padding", node.args[3] if len(node.args) > 3 else 0)
                padded = "avg" in getattr(node.target, "__name__", "") and pad not in (0, (0, 0))
                out = torch.where(v == 0, v, torch.full_like(v, nan)) if padded else v
            elif node.target in SCALAR_TARGETS:
                out = _binary(node, val, node.target)
            elif v is not None:
                out = v  # flatten / reshape
        elif node.op == "call_method":
            if node.target in ELEMENTWISE_METHODS and v is not None:
                out = getattr(v.clone(), node.target)() if node.target not in ("float",) else v
            elif node.target in ("add", "add_", "sub", "mul", "div"):
                fn = {"add": operator.add, "add_": operator.add, "sub": operator.sub, "mul": operator.mul,
                      "div": operator.truediv}[node.target]
                out = _binary(node, val, fn)
            elif v is not None:
                out = v  # flatten / view / reshape
        vals[node.name] = out.double() if out is not None else unknown
    return vals


def _binary(node: fx.Node, val: Any, fn: Any) -> torch.Tensor:
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    va, vb = val(a), val(b)
    if va is not None and vb is not None:
        return _apply(fn, va, vb)
    v = va if va is not None else vb
    other = b if va is not None else a
    if v is None:
        return torch.tensor([])
    if isinstance(other, int | float):
        return _apply(fn, v, float(other)) if va is not None else _apply(fn, float(other), v)
    return torch.full_like(v, float("nan"))


def _apply(fn: Any, a: Any, b: Any) -> torch.Tensor:
    try:
        return fn(a, b)
    except Exception:  # noqa: BLE001
        return torch.full_like(a, float("nan"))


# ---------------------------------------------------------------- the decision


def _column_fold(layer: nn.Module, c: int, repeat: int, k: float) -> torch.Tensor:
    """What a constant ``k`` on input channel ``c`` (``repeat`` columns) adds to ``layer``'s bias."""
    w = require_handler(layer).weight(layer)
    block = w[:, c * repeat:(c + 1) * repeat]
    return (block.reshape(w.shape[0], -1).sum(dim=1) * k).to(layer.bias.dtype)



def _consumer_slices(model: nn.Module, name: str) -> list[nn.Module]:
    m = model.get_submodule(name)
    if is_attention(m):
        return [m.q_proj, m.k_proj, m.v_proj]
    return [m]


def _decide_group(
    model: nn.Module, g: ChannelGroup, vals: dict[str, torch.Tensor]
) -> tuple[list[int], list[tuple[nn.Module, int, int, float]], list[str]]:
    """Channels to remove, folds ``(layer, channel, repeat, constant)`` to apply, and reasons to keep."""
    if g.blocked:
        return [], [], list(g.blocked)
    removable, folds = [], []
    for c in range(g.size):
        ok, pending = True, []
        for con in g.consumers:
            v = float(vals[con.node][c]) if con.node in vals else float("nan")
            for layer in _consumer_slices(model, con.module):
                handler = require_handler(layer)
                columns = handler.weight(layer)[:, c * con.repeat:(c + 1) * con.repeat]
                if v == 0.0 or bool((columns == 0).all()):
                    continue
                if v == v and handler.foldable(layer):  # a finite constant (not NaN)
                    pending.append((layer, c, con.repeat, v))
                    continue
                ok = False
                break
            if not ok:
                break
        if not ok:
            continue
        # The group's own members need no check: a removed channel disappears from every
        # tensor of the group at once; only what reads the group from outside matters.
        removable.append(c)
        folds += pending
    if len(removable) == g.size:  # keep one channel so that no layer becomes empty
        keep_one = removable.pop(0)
        folds = [f for f in folds if f[1] != keep_one]
    return removable, folds, []


def _decide_heads(model: nn.Module, name: str) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    """Heads to remove and value biases to fold into the output projection (head, bias slice)."""
    m = model.get_submodule(name)
    out = attention_out(m)
    d, h = m.head_dim, m.num_heads
    removable, folds = [], []
    for i in range(h):
        rows = slice(i * d, (i + 1) * d)
        v_zero = bool((m.v_proj.weight.detach()[rows] == 0).all())
        v_bias = m.v_proj.bias.detach()[rows] if m.v_proj.bias is not None else None
        out_zero = bool((out.weight.detach()[:, rows] == 0).all())
        if out_zero or (v_zero and (v_bias is None or bool((v_bias == 0).all()))):
            removable.append(i)
        elif v_zero and out.bias is not None:
            removable.append(i)
            folds.append((i, v_bias))
    if len(removable) == h:
        first = removable.pop(0)
        folds = [f for f in folds if f[0] != first]
    return removable, folds


# ---------------------------------------------------------------- compact


@torch.no_grad()
def compact(model: nn.Module, example_input: Any = None, atol: float = 1e-4) -> CompactReport:
    """Remove pruned channels and heads from ``model`` in place; return a :class:`CompactReport`.

    Rule (see the module docstring for the details): a channel is removed
    when every layer that reads it from outside its dependency group would
    see zero (or meets zero weights, or gets a constant folded exactly into
    its bias); residual groups lose a channel only when every member agrees;
    each group keeps at least one channel. Conv2d, Linear and BatchNorm
    modules are replaced by smaller ones; the forward code is unchanged.

    A Hugging Face ``transformers.PreTrainedModel`` (blocks described by
    :data:`~sparseforge.compact.layouts.LAYOUTS`) is not traced: its attention heads and FFN hidden
    units are removed by :func:`sparseforge.compact.transformer.compact_transformer`
    (same rules, same report).

    Args:
        model: a plain model with exact zeros (finalize a Sparsifier first).
        example_input: one input batch, used to trace shapes and to check the
            result. Default: a random batch of 2 of ``model.input_shape``.
            For a Hugging Face model: token ids or a dict of inputs (a
            tokenizer's output); default: random token ids with padding.
        atol: the largest output difference accepted, relative to the output's
            largest magnitude (plus ``atol`` absolute). Default 1e-4.

    Raises:
        SparseforgeError: the model cannot be traced (naming the submodule),
            still carries Sparsifier masks, or the check fails (the model is
            then restored).

    Example:
        >>> import torch, sparseforge as sf
        >>> from sparseforge.zoo import build_model
        >>> model = build_model("conv4")
        >>> _ = sf.prune_channels(model, "l1", sparsity=0.5)
        >>> r = sf.compact(model)
        >>> model.conv2.out_channels, r.ratio > 3
        (32, True)
    """
    for name, buf in model.named_buffers():
        if name.endswith("_mask"):
            raise SparseforgeError(
                f"{name}: the model still carries Sparsifier masks; call sparsifier.finalize() before compact()"
            )
    if is_hf_model(model):
        return compact_transformer(model, example_input, atol)
    inner = hf_submodule(model)
    if inner is not None:
        kind = type(model.get_submodule(inner)).__name__
        raise SparseforgeError(
            f"{type(model).__name__} wraps a Hugging Face model at {inner!r} ({kind}), which torch.fx cannot "
            f"trace; compact that submodule instead: compact(model.{inner}) (its heads and FFN units are removed; "
            "the layers around it keep their sizes)"
        )
    dep = analyze(model, example_input)
    x = dep.example_input
    was_training = model.training
    model.eval()
    try:
        reference = model(x)
        report = CompactReport(params_before=count_parameters(model))
        vals = channel_values(dep, model)
        plan = Plan()
        for g in dep.groups:
            removed, folds, reasons = _decide_group(model, g, vals)
            report.groups.append({
                "members": g.producers + g.norms, "consumers": [c.module for c in g.consumers],
                "before": g.size, "after": g.size - len(removed), "folded": len(folds), "blocked": reasons,
            })
            if not removed:
                continue
            # constants of removed channels fold into the consumers' biases: bias += k * sum of the columns read
            for layer, c, repeat, k in folds:
                plan.fold(layer, lambda layer=layer, c=c, repeat=repeat, k=k: _column_fold(layer, c, repeat, k))
            for p in g.producers:
                plan.out_keep[p] = keep_index(g.size, removed, x.device)
            for n in g.norms:
                plan.out_keep[n] = keep_index(g.size, removed, x.device)
            for con in g.consumers:
                names = [con.module] if not is_attention(model.get_submodule(con.module)) else [
                    f"{con.module}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
                keep = keep_index(g.size, removed, x.device)
                cols = (keep[:, None] * con.repeat + torch.arange(con.repeat, device=x.device)).reshape(-1)
                for n in names:
                    plan.in_keep[n] = cols
        head_folds = []
        for hg in dep.heads:
            removed, folds = _decide_heads(model, hg.module)
            m = model.get_submodule(hg.module)
            report.heads.append({"members": [hg.module], "before": hg.num_heads,
                                 "after": hg.num_heads - len(removed), "folded": len(folds), "blocked": []})
            if not removed:
                continue
            d = hg.head_dim
            keep_heads = keep_index(hg.num_heads, removed, x.device)
            rows = (keep_heads[:, None] * d + torch.arange(d, device=x.device)).reshape(-1)
            for p in ("q_proj", "k_proj", "v_proj"):
                plan.out_keep[f"{hg.module}.{p}"] = rows
            plan.in_keep[f"{hg.module}.{attention_out_name(m)}"] = rows
            plan.attributes[hg.module] = {"num_heads": len(keep_heads)}
            plan.entries[hg.module] = {"kind": "attention", "num_heads": len(keep_heads)}
            out = attention_out(m)
            # a head with zero value rows outputs its value bias: W_o[:, head] @ b_v folds into the output bias
            head_folds += [(out, lambda out=out, i=i, b=b, d=d: out.weight[:, i * d:(i + 1) * d] @ b) for i, b in folds]
        for layer, delta in head_folds:  # after the channel folds, as they read biases the channel folds change
            plan.fold(layer, delta)
        apply_plan(model, plan, report, lambda: model(x), reference, atol,
                   "It probably uses an operation the dependency analysis misjudges as channel-wise")
        return report
    finally:
        model.train(was_training)
