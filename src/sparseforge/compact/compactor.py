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

Hugging Face ``transformers`` models (BERT-, LLaMA- and GPT-2-style blocks)
are not traced: :mod:`sparseforge.compact.transformer` recognises their
attention and FFN blocks by name and removes heads (whole KV groups under
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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.compact.dependency import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    SCALAR_TARGETS,
    ChannelGroup,
    DependencyGraph,
    analyze,
    attention_out,
    attention_out_name,
    is_attention,
)
from sparseforge.targets import set_submodule

SPEC_ATTR = "sparseforge_compact"
"""Attribute of a compacted model holding ``{module name: new sizes}``."""


@dataclass
class CompactReport:
    """What :func:`compact` did.

    ``groups``: one entry per channel group (producers, channels before and
    after, folded constants, and why it was left whole when it was);
    ``heads``: the same for attention blocks; ``shapes``: the new sizes of
    every changed module (what a checkpoint stores); ``params_before`` /
    ``params_after``: all parameters of the model; ``max_abs_diff``: the
    largest output difference on the example input.
    """

    groups: list[dict[str, Any]] = field(default_factory=list)
    heads: list[dict[str, Any]] = field(default_factory=list)
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float = 0.0

    @property
    def changed(self) -> bool:
        """Whether any channel or head was removed."""
        return self.params_after != self.params_before

    @property
    def removed_channels(self) -> int:
        return sum(g["before"] - g["after"] for g in self.groups) + sum(h["before"] - h["after"] for h in self.heads)

    @property
    def ratio(self) -> float:
        """``params_before / params_after``."""
        return self.params_before / self.params_after if self.params_after else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed, "params_before": self.params_before, "params_after": self.params_after,
            "ratio": self.ratio, "removed_channels": self.removed_channels, "max_abs_diff": self.max_abs_diff,
            "groups": self.groups, "heads": self.heads, "shapes": self.shapes,
        }

    def __str__(self) -> str:
        if not self.changed:
            blocked = [g for g in self.groups if g["blocked"]]
            return (
                f"compact: nothing to remove (no channel or head is pruned in every slice tied to it); "
                f"{self.params_before:,} parameters unchanged"
                + (f"; {len(blocked)} group(s) cannot be compacted" if blocked else "")
            )
        lines = [
            f"compact: {self.params_before:,} -> {self.params_after:,} parameters ({self.ratio:.2f}x fewer), "
            f"{self.removed_channels} channels/heads removed, max output difference {self.max_abs_diff:.2e}"
        ]
        for g in self.groups + self.heads:
            note = f"  kept whole: {g['blocked'][0]}" if g.get("blocked") else ""
            lines.append(f"  {', '.join(g['members'])}: {g['before']} -> {g['after']}{note}")
        return "\n".join(lines)


# ---------------------------------------------------------------- module resizing


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _resized(module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """A new module like ``module`` with the sizes of ``entry`` (weights uninitialised)."""
    p = next(module.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    kind = entry.get("kind")
    if kind == "Conv2d" and isinstance(module, nn.Conv2d):
        return nn.Conv2d(
            entry["in_channels"], entry["out_channels"], module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode, **kw,
        )
    if kind == "Linear" and isinstance(module, nn.Linear):
        return nn.Linear(entry["in_features"], entry["out_features"], module.bias is not None, **kw)
    if kind in ("BatchNorm2d", "BatchNorm1d") and isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return type(module)(entry["num_features"], module.eps, module.momentum, module.affine,
                            module.track_running_stats, **kw)
    if kind == "Conv1D" and type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        new = type(module)(entry["nf"], entry["nx"])  # transformers' Conv1D: weight [nx, nf]
        return new.to(**kw) if kw else new
    raise SparseforgeError(f"cannot resize {type(module).__name__} to {entry}: the stored shapes do not fit the model")


def resize_modules(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> nn.Module:
    """Rebuild the modules of ``model`` named in ``shapes`` at their compacted sizes, in place.

    ``shapes`` is :attr:`CompactReport.shapes` (as stored in a checkpoint's
    metadata): ``{"conv1": {"kind": "Conv2d", "in_channels": 1, "out_channels": 32}, ...}``;
    attention blocks have ``{"kind": "attention", "num_heads": n}``; Hugging
    Face attention modules ``{"kind": "attributes", "values": {"num_attention_heads": 10, ...}}``
    (the integer attributes their forward reads) and transformers ``Conv1D``
    layers ``{"kind": "Conv1D", "nx": in, "nf": out}`` (see
    :mod:`sparseforge.compact.transformer`). The new modules' weights are
    uninitialised: load a state dict into them. Returns ``model`` with the
    shapes recorded on it.
    """
    for name, entry in shapes.items():
        try:
            module = _module(model, name)
        except AttributeError:
            raise SparseforgeError(f"the compacted shapes name module {name!r}, which the model does not have") from None
        if entry.get("kind") == "attention":
            module.num_heads = int(entry["num_heads"])
        elif entry.get("kind") == "attributes":
            for attr, value in entry["values"].items():
                if not isinstance(getattr(module, attr, None), int):
                    raise SparseforgeError(
                        f"the compacted shapes set {name}.{attr}, which {type(module).__name__} does not have"
                    )
                setattr(module, attr, int(value))
        else:
            set_submodule(model, name, _resized(module, entry))
    setattr(model, SPEC_ATTR, dict(getattr(model, SPEC_ATTR, {})) | dict(shapes))
    return model


def _entry(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Conv2d):
        return {"kind": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels}
    if isinstance(module, nn.Linear):
        return {"kind": "Linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return {"kind": type(module).__name__, "num_features": module.num_features}
    raise SparseforgeError(f"cannot compact a {type(module).__name__}")


# ---------------------------------------------------------------- channel values


def _zero_rows(w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Per index along ``dim``: whether its whole slice is zero."""
    return (w.movedim(dim, 0).reshape(w.shape[dim], -1) == 0).all(dim=1)


def _producer_value(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    v = b.to(torch.float64).clone()
    v[~_zero_rows(w)] = float("nan")
    return v


def _bn_value(bn: nn.Module, v: torch.Tensor) -> torch.Tensor:
    n = bn.num_features
    weight = bn.weight.detach().double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    bias = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    if bn.running_mean is not None and bn.track_running_stats:
        out = (v - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) * weight + bias
    else:  # batch statistics: a constant channel normalises to 0
        out = torch.where(torch.isnan(v), v, bias)
    return torch.where(weight == 0, bias, out)


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
            if isinstance(m, nn.Conv2d | nn.Linear):
                out = _producer_value(m)
            elif is_attention(m):
                out = _producer_value(attention_out(m))
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                out = _bn_value(m, v if v is not None else unknown)
            elif isinstance(m, nn.Dropout | nn.Dropout2d | nn.Identity):
                out = v if v is not None else unknown
            elif isinstance(m, ELEMENTWISE_MODULES) and v is not None:
                out = m(v)
            elif isinstance(m, POOL_MODULES) and v is not None:
                padded = isinstance(m, nn.AvgPool2d | nn.AvgPool1d) and m.padding not in (0, (0, 0))
                out = torch.where(v == 0, v, torch.full_like(v, nan)) if padded else v
            elif v is not None:
                out = v  # flatten
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


def _consumer_slices(model: nn.Module, name: str) -> list[nn.Linear | nn.Conv2d]:
    m = _module(model, name)
    if is_attention(m):
        return [m.q_proj, m.k_proj, m.v_proj]
    return [m]


def _column_block(w: torch.Tensor, c: int, repeat: int) -> torch.Tensor:
    return w[:, c * repeat:(c + 1) * repeat]


def _foldable(layer: nn.Module) -> bool:
    if layer.bias is None:
        return False
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and all(
        p == 0 for p in (layer.padding if isinstance(layer.padding, tuple) else (layer.padding,))
    ) and layer.padding != "same"


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
                if v == 0.0 or bool((_column_block(layer.weight.detach(), c, con.repeat) == 0).all()):
                    continue
                if v == v and _foldable(layer):  # a finite constant (not NaN)
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
    m = _module(model, name)
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


def _keep_index(n: int, removed: list[int], device: torch.device) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long, device=device)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def compact(model: nn.Module, example_input: Any = None, atol: float = 1e-4) -> CompactReport:
    """Remove pruned channels and heads from ``model`` in place; return a :class:`CompactReport`.

    Rule (see the module docstring for the details): a channel is removed
    when every layer that reads it from outside its dependency group would
    see zero (or meets zero weights, or gets a constant folded exactly into
    its bias); residual groups lose a channel only when every member agrees;
    each group keeps at least one channel. Conv2d, Linear and BatchNorm
    modules are replaced by smaller ones; the forward code is unchanged.

    A Hugging Face ``transformers.PreTrainedModel`` (BERT-, LLaMA- and
    GPT-2-style blocks) is not traced: its attention heads and FFN hidden
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
    from sparseforge.compact.transformer import compact_transformer, hf_submodule, is_hf_model

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
        report = CompactReport(params_before=_count(model))
        vals = channel_values(dep, model)
        out_keep: dict[str, torch.Tensor] = {}
        in_keep: dict[str, torch.Tensor] = {}
        heads_after: dict[str, int] = {}
        folds_all: list[tuple[nn.Module, int, int, float]] = []
        head_folds: list[tuple[nn.Module, nn.Module, int, torch.Tensor, int]] = []
        for g in dep.groups:
            removed, folds, reasons = _decide_group(model, g, vals)
            report.groups.append({
                "members": g.producers + g.norms, "consumers": [c.module for c in g.consumers],
                "before": g.size, "after": g.size - len(removed), "folded": len(folds), "blocked": reasons,
            })
            if not removed:
                continue
            folds_all += folds
            for p in g.producers:
                out_keep[p] = _keep_index(g.size, removed, x.device)
            for n in g.norms:
                out_keep[n] = _keep_index(g.size, removed, x.device)
            for con in g.consumers:
                names = [con.module] if not is_attention(_module(model, con.module)) else [
                    f"{con.module}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
                keep = _keep_index(g.size, removed, x.device)
                cols = (keep[:, None] * con.repeat + torch.arange(con.repeat, device=x.device)).reshape(-1)
                for n in names:
                    in_keep[n] = cols
        for hg in dep.heads:
            removed, folds = _decide_heads(model, hg.module)
            m = _module(model, hg.module)
            report.heads.append({"members": [hg.module], "before": hg.num_heads,
                                 "after": hg.num_heads - len(removed), "folded": len(folds), "blocked": []})
            if not removed:
                continue
            d = hg.head_dim
            keep_heads = _keep_index(hg.num_heads, removed, x.device)
            rows = (keep_heads[:, None] * d + torch.arange(d, device=x.device)).reshape(-1)
            for p in ("q_proj", "k_proj", "v_proj"):
                out_keep[f"{hg.module}.{p}"] = rows
            in_keep[f"{hg.module}.{attention_out_name(m)}"] = rows
            heads_after[hg.module] = len(keep_heads)
            for i, bias in folds:
                head_folds.append((attention_out(m), m, i, bias, d))

        if not out_keep and not in_keep:
            report.params_after = report.params_before
            return report

        # Fold constants of removed channels into the consumers' biases (before slicing);
        # the old biases are kept to undo it if the check fails.
        saved_bias = {id(f[0]): (f[0], f[0].bias.detach().clone()) for f in folds_all}
        saved_bias |= {id(f[0]): (f[0], f[0].bias.detach().clone()) for f in head_folds}
        for layer, c, repeat, k in folds_all:
            w = layer.weight.detach()
            block = w[:, c * repeat:(c + 1) * repeat]
            layer.bias.add_((block.reshape(w.shape[0], -1).sum(dim=1) * k).to(layer.bias.dtype))
        for out, _, i, bias, d in head_folds:
            out.bias.add_(out.weight[:, i * d:(i + 1) * d] @ bias)

        originals: dict[str, nn.Module] = {}
        built: dict[str, nn.Module] = {}
        shapes: dict[str, dict[str, Any]] = {}
        for name in sorted(set(out_keep) | set(in_keep)):
            old = _module(model, name)
            shapes[name], built[name] = _sliced(old, out_keep.get(name), in_keep.get(name))
            originals[name] = old
        old_heads = {name: _module(model, name).num_heads for name in heads_after}
        for name, new in built.items():
            set_submodule(model, name, new)
        for name, n in heads_after.items():
            _module(model, name).num_heads = n
            shapes[name] = {"kind": "attention", "num_heads": n}
        try:
            result = model(x)
            diff = float((result - reference).abs().max()) if result.numel() else 0.0
            tol = atol * (1.0 + float(reference.abs().max()))
            if not diff <= tol:
                raise SparseforgeError(
                    f"compacting {type(model).__name__} changed its output by {diff:.3g} (tolerance {tol:.3g}); "
                    "the model was left unchanged. It probably uses an operation the dependency analysis "
                    "misjudges as channel-wise; please report it"
                )
        except Exception:
            for name, old in originals.items():
                set_submodule(model, name, old)
            for name, n in old_heads.items():
                _module(model, name).num_heads = n
            for layer, bias in saved_bias.values():
                layer.bias.copy_(bias)
            raise
        report.max_abs_diff = diff
        report.shapes = shapes
        report.params_after = _count(model)
        setattr(model, SPEC_ATTR, dict(getattr(model, SPEC_ATTR, {})) | shapes)
        return report
    finally:
        model.train(was_training)


def _sliced(
    old: nn.Module, o: torch.Tensor | None, i: torch.Tensor | None
) -> tuple[dict[str, Any], nn.Module]:
    """The size entry and a new module holding ``old``'s output slices ``o`` and input slices ``i``."""
    entry = _entry(old)
    if entry["kind"] == "Conv2d":
        entry["out_channels"] = len(o) if o is not None else old.out_channels
        entry["in_channels"] = len(i) if i is not None else old.in_channels
    elif entry["kind"] == "Linear":
        entry["out_features"] = len(o) if o is not None else old.out_features
        entry["in_features"] = len(i) if i is not None else old.in_features
    else:
        entry["num_features"] = len(o) if o is not None else old.num_features
    new = _resized(old, entry)
    if isinstance(old, nn.Conv2d | nn.Linear):
        w = old.weight.detach()
        w = w[o] if o is not None else w
        w = w[:, i] if i is not None else w
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias[o] if o is not None else old.bias)
    else:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(old, attr)
            if t is not None:
                getattr(new, attr).copy_(t[o] if o is not None else t)
        if old.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    new.weight.requires_grad_(old.weight.requires_grad)
    return entry, new
