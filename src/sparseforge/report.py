"""What a model's sparsity amounts to: per-layer and total zeros, parameters and FLOPs."""

from __future__ import annotations

import io
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerReport:
    """One weight layer: its shape, parameter count, nonzeros and per-sample FLOPs.

    FLOPs count a multiply and an add per weight use (2 x MACs) for one input
    sample; the sparse figure counts only nonzero weights (what a sparse kernel
    or a compacted model could skip). ``None`` when no example input was run.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    dense_flops: int | None
    sparse_flops: int | None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0


@dataclass
class SparsityReport:
    """Per-layer and total sparsity, parameter counts, nonzeros and FLOPs of a model.

    ``total_params``/``total_nonzeros`` cover every parameter (biases and norms
    too); ``layer_params``/``layer_nonzeros`` only the weight layers listed.
    ``str(report)`` is a table; :meth:`to_dict` the same numbers for JSON.
    """

    layers: list[LayerReport] = field(default_factory=list)
    total_params: int = 0
    total_nonzeros: int = 0

    @property
    def layer_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def layer_nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the weight layers' weights."""
        return 1.0 - self.layer_nonzeros / self.layer_params if self.layer_params else 0.0

    @property
    def total_sparsity(self) -> float:
        """Fraction of zeros over all parameters."""
        return 1.0 - self.total_nonzeros / self.total_params if self.total_params else 0.0

    @property
    def dense_flops(self) -> int | None:
        values = [layer.dense_flops for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]

    @property
    def sparse_flops(self) -> int | None:
        values = [layer.sparse_flops for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(layer) | {"sparsity": layer.sparsity} for layer in self.layers],
            "total_params": self.total_params,
            "total_nonzeros": self.total_nonzeros,
            "total_sparsity": self.total_sparsity,
            "layer_params": self.layer_params,
            "layer_nonzeros": self.layer_nonzeros,
            "sparsity": self.sparsity,
            "dense_flops": self.dense_flops,
            "sparse_flops": self.sparse_flops,
        }

    def table(self, title: str | None = "sparsity report"):
        """A :class:`rich.table.Table` of the report."""
        from rich.table import Table

        def fmt(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        t = Table(title=title)
        for col in ("layer", "type", "shape", "params", "nonzeros", "sparsity", "FLOPs dense", "FLOPs sparse"):
            # A layer name that does not fit wraps onto the next line ("fold"), never ends in "...":
            # truncated, attention.self.query/key/value would all read the same.
            t.add_column(col, justify="left" if col in ("layer", "type", "shape") else "right",
                         overflow="fold" if col == "layer" else "ellipsis")
        for r in self.layers:
            t.add_row(
                r.name, r.kind, "x".join(map(str, r.shape)), fmt(r.params), fmt(r.nonzeros),
                f"{100 * r.sparsity:.2f}%", fmt(r.dense_flops), fmt(r.sparse_flops),
            )
        t.add_section()
        t.add_row(
            "weight layers", "", "", fmt(self.layer_params), fmt(self.layer_nonzeros),
            f"{100 * self.sparsity:.2f}%", fmt(self.dense_flops), fmt(self.sparse_flops),
        )
        t.add_row(
            "all parameters", "", "", fmt(self.total_params), fmt(self.total_nonzeros),
            f"{100 * self.total_sparsity:.2f}%", "", "",
        )
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=table_width(), force_terminal=False, color_system=None).print(self.table())
        return buf.getvalue()


@dataclass
class PruneReport(SparsityReport):
    """What pruning did, and the model's sparsity afterwards: the one report of every pruning method.

    :func:`sparseforge.prune` returns it for every score, pattern, allocation
    and method (magnitude, gradient scores, Wanda, SparseGPT, OWL, dependency
    groups of channels), and MaskLLM's training does too.

    The model afterwards (the :class:`SparsityReport` it extends): ``layers``
    (every weight layer of the model), ``sparsity`` (zeros over all of them),
    totals, FLOPs, ``str(report)`` (the table).

    What the pruning did:

    - ``method``, ``pattern``, ``allocation``: its parts, as names;
    - ``requested``: the model-level sparsity asked for (N:M: its own);
    - ``pruned``: per pruned layer ``{"sparsity": its allotted share, "zeros", "numel"}``
      (MaskLLM adds ``kept_by_mask``); ``achieved``: zeros over those layers' weights;
    - ``seconds``; ``calibration_rows``: input rows (tokens, patches) each layer saw
      on calibration data, 0 without;
    - channel groups: ``groups`` (members, channels, pruned indices or why skipped per
      group), ``pruned_channels``, and :meth:`apply` (zero the same slices again, e.g.
      after each optimizer step while fine-tuning);
    - learned masks: ``prior``, ``steps``, ``history`` (loss, temperature, ...),
      ``changed_groups`` (share of groups whose choice left the prior's);
    - ``quality``: metrics before and after, when measured (``PruneRecipe`` on a
      transformers model: ``{"dense": ..., "pruned": ...}``); ``source``: run details
      (input, calibration text) that recipes record.

    :meth:`to_dict` gives all of it for JSON (the model's numbers under their
    :class:`SparsityReport` keys); :meth:`summary` the per-layer pruning view,
    keyed as the ``prune --method`` command has always printed it.
    """

    method: str = ""
    pattern: str = ""
    allocation: str = ""
    requested: float = 0.0
    pruned: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_rows: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    prior: str | None = None
    steps: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    changed_groups: float | None = None
    quality: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    _zero: list[tuple[str, int, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def achieved(self) -> float:
        """Zeros over weights, across the pruned layers."""
        total = sum(v["numel"] for v in self.pruned.values())
        return sum(v["zeros"] for v in self.pruned.values()) / total if total else 0.0

    @property
    def pruned_channels(self) -> int:
        """Channels (and heads) pruned over all dependency groups; 0 for other patterns."""
        return sum(len(g["pruned"]) for g in self.groups)

    @property
    def report(self) -> PruneReport:
        """The report itself: the model's sparsity afterwards (what ``prune_channels(...).report`` gave)."""
        return self

    def record(self, name: str, weight: torch.Tensor, sparsity: float, **extra: float) -> None:
        """Note a pruned layer: its allotted ``sparsity`` and the zeros of its new ``weight``."""
        self.pruned[name] = {"sparsity": sparsity, "zeros": float((weight == 0).sum()),
                             "numel": float(weight.numel()), **extra}

    def with_model(self, model: nn.Module, example_input: torch.Tensor | None = None) -> PruneReport:
        """Fill in the model's sparsity report (:func:`report`) as it is now; returns self."""
        rep = report(model, example_input)
        self.layers, self.total_params, self.total_nonzeros = rep.layers, rep.total_params, rep.total_nonzeros
        return self

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned channel slices of ``model`` again (the same parameters, by name)."""
        params = dict(model.named_parameters())
        for name, axis, index in self._zero:
            params[name].index_fill_(axis, index.to(params[name].device), 0)

    def summary(self) -> dict[str, Any]:
        """The pruning itself: method, pattern, requested and achieved sparsity, time, per pruned layer
        (``layers``), and what the method adds (groups, learned-mask history, quality, run details)."""
        out: dict[str, Any] = {"method": self.method, "pattern": self.pattern, "sparsity": self.requested,
                               "allocation": self.allocation, "achieved": self.achieved, "seconds": self.seconds,
                               "calibration_rows": self.calibration_rows}
        if self.prior is not None:
            out |= {"prior": self.prior, "steps": self.steps, "changed_groups": self.changed_groups,
                    "history": self.history}
        if self.groups:
            out |= {"pruned_channels": self.pruned_channels, "groups": self.groups}
        out["layers"] = self.pruned
        if self.quality is not None:
            out["quality"] = self.quality
        return out | self.source

    def to_dict(self) -> dict[str, Any]:
        """The model's sparsity (:meth:`SparsityReport.to_dict`) and the pruning (:meth:`summary`, as ``pruning``)."""
        return super().to_dict() | {"pruning": self.summary()}


def table_width() -> int:
    """Width for printed tables: the terminal's (``$COLUMNS`` when set), at least 120 characters."""
    return max(120, shutil.get_terminal_size((120, 24)).columns)


def _example_input(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor | None:
    if example_input is not None:
        return example_input
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    param = next(model.parameters(), None)
    return torch.zeros(1, *shape, device=param.device if param is not None else "cpu")


@torch.no_grad()
def report(model: nn.Module, example_input: torch.Tensor | None = None) -> SparsityReport:
    """Count parameters, nonzeros and FLOPs of every Linear/Conv layer and of the whole model.

    Args:
        model: any module.
        example_input: one input batch used to count FLOPs (positions a
            convolution's weight is applied at, tokens of a Linear). Default:
            ``zeros(1, *model.input_shape)`` when the model declares an
            ``input_shape`` (zoo models do); otherwise FLOPs are left out for
            convolutions and counted per token for Linear layers.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight[0].zero_()
        >>> r = report(model)
        >>> r.sparsity, r.layers[0].dense_flops, r.layers[0].sparse_flops
        (0.5, 16, 8)
    """
    positions: dict[str, int] = {}
    x = _example_input(model, example_input)
    if x is not None:
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, LAYER_TYPES):

                def hook(mod: nn.Module, inputs: Any, output: torch.Tensor, name: str = name) -> None:
                    batch = output.shape[0] if output.dim() > 1 else 1
                    if isinstance(mod, nn.Linear):
                        positions[name] = output.numel() // mod.out_features // batch
                    else:
                        positions[name] = output[0].numel() // output.shape[1] if output.dim() > 1 else 1

                handles.append(module.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            model(x)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        w = module.weight
        pos = positions.get(name)
        if pos is None and x is None and isinstance(module, nn.Linear):
            pos = 1
        nnz = int(w.count_nonzero())
        layers.append(
            LayerReport(
                name=name,
                kind=type(module).__name__,
                shape=tuple(w.shape),
                params=w.numel(),
                nonzeros=nnz,
                dense_flops=None if pos is None else 2 * w.numel() * pos,
                sparse_flops=None if pos is None else 2 * nnz * pos,
            )
        )
    total = sum(p.numel() for p in model.parameters())
    nonzeros = sum(int(p.count_nonzero()) for p in model.parameters())
    return SparsityReport(layers=layers, total_params=total, total_nonzeros=nonzeros)
