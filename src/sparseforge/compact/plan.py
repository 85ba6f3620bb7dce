"""What the compactors share: the report, the plan of changes, applying it with a check, and resizing.

Both compactors (:mod:`sparseforge.compact.compactor` for fx-traced models,
:mod:`sparseforge.compact.transformer` for Hugging Face blocks) decide which
rows and columns stay and which constants fold into a bias, as a
:class:`Plan`; :func:`apply_plan` carries it out through the layer handlers
(:mod:`sparseforge.compact.handlers`), checks the model's output against the
one before, and undoes everything when it differs. :func:`resize_modules`
rebuilds the recorded shapes in a fresh model (what loading a checkpoint of a
compacted model does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.compact.handlers import require_handler
from sparseforge.errors import SparseforgeError
from sparseforge.targets import set_submodule

__all__ = ["SPEC_ATTR", "CompactReport", "Plan", "apply_plan", "count_parameters", "keep_index", "resize_modules"]

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
            set_submodule(model, name, require_handler(module).resized(module, entry))
    setattr(model, SPEC_ATTR, dict(getattr(model, SPEC_ATTR, {})) | dict(shapes))
    return model


# ---------------------------------------------------------------- applying the decisions


@dataclass
class Plan:
    """What compaction changes in a model, decided before anything is changed.

    ``out_keep`` / ``in_keep``: per module name, the output rows and input
    columns kept (slicing goes through the module's layer handler);
    ``bias_folds``: ``(layer, delta)`` in order, ``delta()`` giving what is
    added to the layer's bias; ``attributes``: integer attributes to set per
    module (head counts), recorded in checkpoints as ``entries``.
    """

    out_keep: dict[str, torch.Tensor] = field(default_factory=dict)
    in_keep: dict[str, torch.Tensor] = field(default_factory=dict)
    bias_folds: list[tuple[nn.Module, Callable[[], torch.Tensor]]] = field(default_factory=list)
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fold(self, layer: nn.Module, delta: Callable[[], torch.Tensor]) -> None:
        """Add ``delta()`` to ``layer``'s bias when the plan is applied (computed then, in order)."""
        self.bias_folds.append((layer, delta))

    @property
    def empty(self) -> bool:
        return not self.out_keep and not self.in_keep


@torch.no_grad()
def apply_plan(
    model: nn.Module, plan: Plan, report: CompactReport, run: Callable[[], torch.Tensor], reference: torch.Tensor,
    atol: float, hint: str,
) -> None:
    """Apply ``plan`` to ``model`` in place, check the output, and fill ``report``; undo everything on failure.

    The bias folds are added, every module named in the plan is replaced by
    its slices (:meth:`~sparseforge.compact.handlers.LayerHandler.sliced`),
    the attributes set; then ``run()`` must match ``reference`` within
    ``atol`` relative to the reference's largest magnitude (plus ``atol``
    absolute), else the model is restored and a :class:`SparseforgeError`
    raised, ending with ``hint``. The new shapes go to ``report.shapes`` and
    to ``model.sparseforge_compact`` (what checkpoints store).
    """
    if plan.empty:
        report.params_after = report.params_before
        return
    saved_bias = {id(layer): (layer, layer.bias.detach().clone()) for layer, _ in plan.bias_folds}
    originals: dict[str, nn.Module] = {}
    old_attrs = {name: {k: getattr(model.get_submodule(name), k) for k in values}
                 for name, values in plan.attributes.items()}
    try:
        for layer, delta in plan.bias_folds:
            layer.bias.add_(delta())
        shapes: dict[str, dict[str, Any]] = {}
        built: dict[str, nn.Module] = {}
        for name in sorted(set(plan.out_keep) | set(plan.in_keep)):
            old = _module(model, name)
            shapes[name], built[name] = require_handler(old).sliced(old, plan.out_keep.get(name), plan.in_keep.get(name))
        for name, new in built.items():
            originals[name] = _module(model, name)
            set_submodule(model, name, new)
        for name, values in plan.attributes.items():
            module = model.get_submodule(name)
            for k, v in values.items():
                setattr(module, k, v)
        shapes |= plan.entries
        result = run()
        diff = float((result - reference).abs().max()) if result.numel() else 0.0
        tol = atol * (1.0 + float(reference.abs().max()))
        if not diff <= tol:
            raise SparseforgeError(
                f"compacting {type(model).__name__} changed its output by {diff:.3g} (tolerance {tol:.3g}); "
                f"the model was left unchanged. {hint}; please report it"
            )
    except Exception:
        for name, old in originals.items():
            set_submodule(model, name, old)
        for name, values in old_attrs.items():
            module = model.get_submodule(name)
            for k, v in values.items():
                setattr(module, k, v)
        for layer, bias in saved_bias.values():
            layer.bias.copy_(bias)
        raise
    report.max_abs_diff = diff
    report.shapes = shapes
    report.params_after = count_parameters(model)
    setattr(model, SPEC_ATTR, dict(getattr(model, SPEC_ATTR, {})) | shapes)


def keep_index(n: int, removed: list[int], device: torch.device) -> torch.Tensor:
    """The indices ``0..n-1`` without ``removed``, as a long tensor on ``device``."""
    gone = set(removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long, device=device)


def count_parameters(model: nn.Module) -> int:
    """How many parameter entries ``model`` has."""
    return sum(p.numel() for p in model.parameters())
