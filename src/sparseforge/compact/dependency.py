"""Dependency groups: which tensor slices are tied to one output channel.

In the spirit of Torch-Pruning's dependency graph ("DepGraph: Towards Any
Structural Pruning", Fang et al. 2023). The model is traced with
``torch.fx.symbolic_trace`` and run once on an example input to learn shapes;
then every activation tensor is assigned a *channel space*: the output
channels of the Conv/Linear that produced it, carried through channel-wise
operations (ReLU and other elementwise activations, BatchNorm, pooling,
dropout, flatten). A :class:`ChannelGroup` collects everything tied to one
such space:

- producers: Conv2d filters / Linear rows (and their bias entries);
- norms: BatchNorm channels (weight, bias, running mean and variance);
- consumers: the input channels of the next Conv2d, or the input columns of
  the next Linear: after ``flatten`` a channel ``c`` of a ``C x H x W``
  tensor owns Linear columns ``c*H*W .. (c+1)*H*W - 1``;
- residual additions merge the spaces of the added tensors into one group
  (a ResNet stage's stream: the stem or projection shortcut and every
  block's last conv and BN).

ResNet shortcuts. The zoo's ResNet-20 uses option B (a 1x1 conv + BN
projection where the width changes): the projection is a producer of the new
stage's group and a consumer of the previous stage's, so each stage's stream
is its own group (and the identity shortcuts inside a stage tie all its
blocks into it). Option A (identity with zero-padded extra channels, via
``F.pad`` or a strided slice) ties channel ``c`` of one stage to channel
``c + pad`` of the next through an op that is not channel-wise: the analysis
blocks both stages' stream groups (they are kept whole) rather than guess;
the inner convs of every block still compact.

What each module type does to channels (produces them, normalises them,
passes them through, flattens them) is its *layer handler*'s answer
(:mod:`sparseforge.compact.handlers`); a module without one blocks the groups
that reach it, and :func:`~sparseforge.compact.handlers.register_handler`
adds your own layer types.

A group is *blocked* (never compacted) when a tensor of it reaches anything
the analysis does not know to be channel-wise: the model's output, a
LayerNorm (it mixes channels), a concatenation, an addition with a tensor of
another space (such as the model input), a hard-coded ``view``, a grouped
convolution, a module called twice. The reason is recorded.

Attention heads: a module with integer attributes ``num_heads`` and
``head_dim`` and ``nn.Linear`` children ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj`` (or ``o_proj``), whose forward reshapes with ``self.num_heads``
and ``self.head_dim`` (the Hugging Face convention), is treated as one unit:
its input is consumed by the q/k/v columns, its output produced by the output
projection's rows, and its heads form a :class:`HeadGroup` (the q/k/v rows of
a head and the output projection's columns). ``nn.MultiheadAttention`` cannot
lose a head (its projections are fixed at ``embed_dim``), so it is an opaque
module here. Hugging Face ``transformers`` models are not traced: their
attention and feed-forward blocks are described by the layouts of
:mod:`sparseforge.compact.layouts` and compacted by
:mod:`sparseforge.compact.transformer`, which :func:`sparseforge.compact` uses
for a ``PreTrainedModel``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from sparseforge.compact.handlers import handler_for, is_registered_leaf
from sparseforge.errors import SparseforgeError

# Modules are described by their handlers (sparseforge.compact.handlers); these tables say the same of
# the functions and tensor methods a traced forward calls.
#: Elementwise functions: channel-wise, and a per-channel constant stays a constant.
ELEMENTWISE_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardtanh, F.hardswish, F.mish,
    F.softplus, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout2d,
)
ELEMENTWISE_METHODS = ("relu", "sigmoid", "tanh", "relu_", "contiguous", "clone", "float")
#: Pooling functions: channel-wise, keep a constant channel constant (unless they pad with zeros).
POOL_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool1d, F.avg_pool1d,
)
#: Calls whose result is not a tensor of the graph (a size): they do not block.
SHAPE_METHODS = ("size", "dim")
FLATTEN_METHODS = ("flatten", "view", "reshape")
FLATTEN_FUNCTIONS: tuple[Callable[..., Any], ...] = (torch.flatten, torch.reshape)
ADD_TARGETS: tuple[Any, ...] = (operator.add, operator.iadd, torch.add)
SCALAR_TARGETS: dict[Any, Callable[[torch.Tensor, float], torch.Tensor]] = {
    operator.add: lambda v, s: v + s, operator.iadd: lambda v, s: v + s, torch.add: lambda v, s: v + s,
    operator.sub: lambda v, s: v - s, operator.mul: lambda v, s: v * s, torch.mul: lambda v, s: v * s,
    operator.truediv: lambda v, s: v / s,
}


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` follows the attention convention described in the module docstring."""
    return (
        isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
        and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
        and isinstance(attention_out(module), nn.Linear)
    )


def attention_out(module: nn.Module) -> nn.Module | None:
    """The output projection of an attention block (``out_proj`` or ``o_proj``)."""
    return getattr(module, "out_proj", None) or getattr(module, "o_proj", None)


def attention_out_name(module: nn.Module) -> str:
    return "out_proj" if isinstance(getattr(module, "out_proj", None), nn.Linear) else "o_proj"


@dataclass
class Consumer:
    """A layer whose input slices are tied to the group: ``module`` reads channel ``c`` at
    input indices ``c*repeat .. (c+1)*repeat - 1`` of dimension 1 of its weight."""

    module: str
    repeat: int
    node: str  # the graph node whose value the consumer reads


@dataclass
class ChannelGroup:
    """All tensor slices tied to one channel space; see the module docstring."""

    id: int
    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    def describe(self) -> str:
        return f"[{', '.join(self.producers)}] ({self.size} channels)"


@dataclass
class HeadGroup:
    """The heads of one attention block: q/k/v rows of a head and the output projection's columns."""

    module: str
    num_heads: int
    head_dim: int


@dataclass
class Space:
    """The channel space of a tensor: its group, the dimension holding the channels, and
    how many consecutive entries of that dimension each channel owns (after flatten)."""

    gid: int
    dim: int
    repeat: int = 1


@dataclass
class DependencyGraph:
    """The result of :func:`analyze`: groups, heads, and the traced graph they refer to."""

    groups: list[ChannelGroup]
    heads: list[HeadGroup]
    graph_module: fx.GraphModule
    spaces: dict[str, Space]
    example_input: torch.Tensor

    def group_of(self, producer: str) -> ChannelGroup | None:
        """The group whose producers include the module named ``producer``."""
        return next((g for g in self.groups if producer in g.producers), None)


class _Tracer(fx.Tracer):
    """Tracer that keeps attention blocks (see :func:`is_attention`) and layers registered with a handler as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_attention(m) or is_registered_leaf(m) or super().is_leaf_module(m, qualname)


def _find_untraceable(model: nn.Module) -> str:
    """Name the innermost submodule that fx cannot trace (for the error message)."""
    culprit = ""
    for name, module in model.named_modules():
        if not name or _Tracer().is_leaf_module(module, name):
            continue
        try:
            _Tracer().trace(module)
        except Exception:  # noqa: BLE001 - any failure marks a candidate
            culprit = f"{name} ({type(module).__name__})"
    return culprit


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with attention blocks kept whole.

    Raises :class:`SparseforgeError` naming the module (and fx's reason) when
    the forward cannot be traced symbolically (data-dependent control flow,
    calls fx does not support).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types
        where = _find_untraceable(model)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparseforgeError(
            f"cannot analyse {type(model).__name__}: torch.fx cannot trace "
            f"{'submodule ' + where if where else 'its forward'}: {reason}. compact() needs a "
            "symbolically traceable forward (no control flow on tensor values)"
        ) from None
    return fx.GraphModule(model, graph)


def default_example_input(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """``example_input``, or ``zeros(2, *model.input_shape)`` for zoo models."""
    if example_input is not None:
        return example_input
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise SparseforgeError(
            f"{type(model).__name__} does not declare input_shape; pass example_input (one input batch)"
        )
    param = next(model.parameters(), None)
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(
        param.device if param is not None else "cpu"
    )


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.groups: dict[int, ChannelGroup] = {}
        self.parent: dict[int, int] = {}
        self.spaces: dict[str, Space] = {}
        self.heads: list[HeadGroup] = []
        self.calls: dict[str, int] = {}

    # union-find over group ids
    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def new_group(self, size: int, producer: str | None) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = ChannelGroup(gid, size, producers=[producer] if producer else [])
        return gid

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[self.find(gid)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups.pop(ra), self.groups.pop(rb)
        self.parent[rb] = ra
        if ga.size != gb.size:  # cannot happen for shapes that add; be safe
            ga.blocked.append(f"added tensors of different widths ({ga.size} and {gb.size})")
        ga.producers += gb.producers
        ga.norms += gb.norms
        ga.consumers += gb.consumers
        ga.nodes += gb.nodes
        ga.blocked += gb.blocked
        self.groups[ra] = ga
        return ra

    def space(self, arg: Any) -> Space | None:
        return self.spaces.get(arg.name) if isinstance(arg, fx.Node) else None

    def block(self, arg: Any, reason: str) -> None:
        s = self.space(arg)
        if s is not None:
            g = self.group(s.gid)
            if reason not in g.blocked:
                g.blocked.append(reason)

    def block_all(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            self.block(arg, reason)

    def set(self, node: fx.Node, space: Space) -> None:
        self.spaces[node.name] = Space(self.find(space.gid), space.dim, space.repeat)
        self.group(space.gid).nodes.append(node.name)

    def consume(self, node: fx.Node, module_name: str, arg: Any) -> None:
        s = self.space(arg)
        if s is None:
            return
        shape = _shape(arg)
        module = self.modules[module_name]
        ndim = len(shape) if shape is not None else None
        if is_attention(module):  # q/k/v read the features along the last dimension, as a Linear does
            ok = ndim is not None and s.dim == ndim - 1
        else:
            ok = handler_for(module).reads(module, s.dim, s.repeat, ndim)
        if ok:
            self.group(s.gid).consumers.append(Consumer(module_name, s.repeat, arg.name))
        else:
            self.block(arg, f"{module_name} reads the channels along another dimension")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        for node in self.gm.graph.nodes:
            self.visit(node)
        for name, count in self.calls.items():
            if count > 1:
                for g in self.groups.values():
                    if name in g.producers or name in g.norms or any(c.module == name for c in g.consumers):
                        g.blocked.append(f"{name} is called {count} times")

    def visit(self, node: fx.Node) -> None:
        op, target = node.op, node.target
        args = [a for a in node.args]
        out_shape = _shape(node)
        if op in ("placeholder", "get_attr"):
            return
        if op == "output":
            self.block_all(node, "it reaches the model's output")
            return
        if op == "call_module":
            module = self.modules[target]
            x = args[0] if args else None
            handler = handler_for(module)
            if is_attention(module):
                if len(node.all_input_nodes) > 1:
                    self.block_all(node, f"{target} takes more than one input")
                self.consume(node, target, x)
                self.heads.append(HeadGroup(target, module.num_heads, module.head_dim))
                if out_shape is not None:
                    out = f"{target}.{attention_out_name(module)}"
                    self.set(node, Space(self.new_group(attention_out(module).out_features, out), len(out_shape) - 1))
            elif handler is None or handler.unsupported(module):
                self.block_all(node, f"it reaches {target} ({type(module).__name__}), which is not channel-wise")
            elif handler.role == "producer":
                self.consume(node, target, x)
                dim = handler.channel_dim(module, len(out_shape) if out_shape is not None else None)
                if dim is not None:
                    self.set(node, Space(self.new_group(handler.out_channels(module), target), dim))
            elif handler.role == "norm":
                s = self.space(x)
                if s is not None and s.dim == 1 and s.repeat == 1:
                    self.group(s.gid).norms.append(target)
                    self.set(node, s)
                else:
                    self.block(x, f"{target} normalises along another dimension")
            elif handler.role == "channelwise":
                self.pass_through(node, x)
            else:  # "flatten"
                self.flatten(node, x)
            return
        if op == "call_function":
            if target in ELEMENTWISE_FUNCTIONS or target in POOL_FUNCTIONS:
                self.pass_through(node, args[0] if args else node.kwargs.get("input"))
                for a in args[1:]:
                    self.block(a, f"{node.name} uses it as a parameter")
            elif target in FLATTEN_FUNCTIONS:
                self.flatten(node, args[0])
            elif target in ADD_TARGETS or target in SCALAR_TARGETS:
                self.binary(node)
            elif target is getattr:
                return
            else:
                self.block_all(node, f"it reaches {getattr(target, '__name__', target)}(), which is not channel-wise")
            return
        if op == "call_method":
            if target in ELEMENTWISE_METHODS:
                self.pass_through(node, args[0])
            elif target in SHAPE_METHODS:
                return
            elif target in FLATTEN_METHODS:
                self.flatten(node, args[0])
            elif target in ("add", "add_", "sub", "mul", "div"):
                self.binary(node)
            else:
                self.block_all(node, f"it reaches .{target}(), which is not channel-wise")

    def pass_through(self, node: fx.Node, x: Any) -> None:
        s = self.space(x)
        if s is not None and _shape(node) is not None and len(_shape(node)) > s.dim:
            self.set(node, s)
        elif s is not None:
            self.block(x, f"{node.name} changes its shape")

    def flatten(self, node: fx.Node, x: Any) -> None:
        s = self.space(x)
        if s is None:
            return
        shape_in, shape_out = _shape(x), _shape(node)
        # Merging the channel dim with the dims after it (a "C x H x W" -> "C*H*W" flatten),
        # written without hard-coded channel counts (flatten, or view/reshape with -1).
        fixed = False
        if node.target in ("view", "reshape", torch.reshape):
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
                sizes = list(sizes[0])
            # the merged dimension must be -1, not a number that bakes in the channel count
            fixed = len(sizes) <= s.dim or sizes[s.dim] != -1
        if (
            shape_in is not None and shape_out is not None and not fixed
            and len(shape_out) == s.dim + 1 and shape_out[: s.dim] == shape_in[: s.dim]
            and shape_out[s.dim] == math.prod(shape_in[s.dim:])
        ):
            self.set(node, Space(s.gid, s.dim, s.repeat * math.prod(shape_in[s.dim + 1:])))
        elif shape_in is not None and shape_in == shape_out:
            self.set(node, s)
        else:
            self.block(x, f"{node.name} reshapes it")

    def binary(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        sa, sb = self.space(a), self.space(b)
        tensors = [t for t in (a, b) if isinstance(t, fx.Node)]
        is_add = node.target in ADD_TARGETS or node.target in ("add", "add_")
        if len(tensors) == 1:
            s = sa or sb
            if s is not None:
                self.set(node, s)
            return
        if sa is None and sb is None:
            return
        if is_add and sa is not None and sb is not None and _shape(a) == _shape(b) and (sa.dim, sa.repeat) == (
            sb.dim, sb.repeat
        ):
            gid = self.union(sa.gid, sb.gid)
            for name, s in self.spaces.items():
                if self.find(s.gid) == gid:
                    self.spaces[name] = Space(gid, s.dim, s.repeat)
            self.set(node, Space(gid, sa.dim, sa.repeat))
            return
        self.block_all(node, f"{node.name} combines it with a tensor of another channel space")


@torch.no_grad()
def analyze(model: nn.Module, example_input: torch.Tensor | None = None) -> DependencyGraph:
    """Trace ``model`` and return its channel groups and attention head groups.

    Args:
        model: any module whose forward ``torch.fx`` can trace.
        example_input: one input batch, run once to learn tensor shapes.
            Default: a random batch of 2 of ``model.input_shape`` (zoo models).

    Raises:
        SparseforgeError: the model cannot be traced (naming the submodule),
            or has no ``input_shape`` and no example input was given.
    """
    x = default_example_input(model, example_input)
    gm = trace(model)
    was_training = model.training
    model.eval()
    try:
        ShapeProp(gm).propagate(x)
    except Exception as e:  # noqa: BLE001
        raise SparseforgeError(f"running {type(model).__name__} on the example input failed: {e}") from None
    finally:
        model.train(was_training)
    a = _Analysis(gm)
    a.run()
    groups = sorted(a.groups.values(), key=lambda g: g.id)
    spaces = {k: Space(a.find(s.gid), s.dim, s.repeat) for k, s in a.spaces.items()}
    return DependencyGraph(groups, a.heads, gm, spaces, x)
