"""Calibration capture: per-layer input statistics, block by block.

One-shot methods that look at activations need, for every targeted layer,
statistics of the inputs it sees on calibration data: the squared norm of
each input feature (Wanda: ``||X_j||_2``) or the input Gram matrix
``H = X^T X`` (SparseGPT, GPTQ). Here ``X`` is the layer's input as a matrix
``[tokens, fan_in]``: a Linear's input flattened over every leading
dimension, a Conv2d's input unfolded into patches (the weight's
``in x kh x kw`` order), a ``transformers`` ``Conv1D``'s input as for a
Linear.

Sequential, as in "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot" (Frantar & Alistarh, 2023) and "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"
(Frantar et al., 2023): when the model has a list of repeated blocks (a
transformer's ``encoder.layer``, ``h`` or ``layers``; the
``nn.ModuleList`` holding most targeted layers), the inputs of the first
block are captured once and then, block after block: statistics of the
block's targeted layers are collected on a forward of the block, every one
of them is processed (pruned, quantized), and the block is run again to give
the next block its inputs. So each block sees the outputs of the already
processed blocks before it, and peak memory is one block's activations for
the calibration set plus one block's statistics, not the whole model's. The
keyword arguments a block was called with (attention masks, position
embeddings) are reused for every block, as the reference code does.

Within a block, every layer's statistics come from the same forward of the
block, before any of its layers is processed (as in the reference code; the
GPTQ paper's "true sequential" variant would re-run the block after each
sublayer).

Models without such a list (the zoo's CNNs and MLPs) are processed layer by
layer in forward order, one forward of the whole model per layer, each
layer's statistics taken after the layers before it were processed. Targeted
layers outside the block list are processed the same way, before the blocks
when the forward calls them first (an input projection), after them
otherwise (a BERT pooler, a classifier head).

Every hook is removed when capture ends, also on error.

:class:`Calibrator` is how one-shot pruning uses this for any method: it
runs a per-layer step over the model in that order, collecting just the
statistics the method's score and update ask for (feature norms for
``needs_activations``, the Gram matrix too for ``needs_hessian``, no forward
pass at all for neither). GPTQ calls :func:`sequential` directly.

:func:`capture_inputs` collects the same statistics for every layer in one
pass over the data, without processing anything in between (RegMean's Gram
matrices, :mod:`sparseforge.merge.regmean`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.layers import is_conv1d
from sparseforge.progress import Progress, using
from sparseforge.targets import Target, as_target

__all__ = [
    "Calibrator", "LayerStats", "ProcessFn", "capture_inputs", "find_blocks", "input_matrix", "is_linear_like", "run_model", "select_layers", "sequential", "set_weight_matrix",
    "weight_matrix",
]


def is_linear_like(module: nn.Module) -> bool:
    """Whether calibration supports the layer: Linear, transformers Conv1D, or Conv2d (ungrouped, integer padding)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 ``[out, fan_in]`` matrix (a copy), in :func:`input_matrix`'s column order."""
    w = module.weight.detach()
    if is_conv1d(module):
        w = w.t()
    return w.reshape(w.shape[0], -1).to(torch.float32).clone()


@torch.no_grad()
def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an ``[out, fan_in]`` matrix back into the layer's weight (its dtype and layout)."""
    w = module.weight
    new = matrix.t() if is_conv1d(module) else matrix.reshape(w.shape)
    w.copy_(new.to(w.dtype))


def input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as ``[rows, fan_in]`` float32, matching :func:`weight_matrix`'s columns."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise SparseforgeError(f"grouped convolutions (groups={module.groups}) are not supported by calibration")
        if isinstance(module.padding, str):
            raise SparseforgeError("Conv2d with string padding is not supported by calibration; use integer padding")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.float32)
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return x.reshape(-1, x.shape[-1]).to(torch.float32)
    raise SparseforgeError(
        f"calibration statistics support Linear, Conv2d and transformers Conv1D layers, not {type(module).__name__}"
    )


@dataclass
class LayerStats:
    """Input statistics of one layer on the calibration data.

    Attributes:
        rows: input rows seen (tokens, or conv patches).
        sq_sum: ``sum_t x_tj^2`` per input feature ``j`` (float64).
        gram: ``sum_t x_t x_t^T`` ``[fan_in, fan_in]`` (float32, or the capture's ``gram_dtype``),
            when asked for.
    """

    rows: int = 0
    sq_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    want_gram: bool = False

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``[rows, fan_in]``."""
        self.add_sums(x.shape[0], x.to(torch.float64).square().sum(0), x.t() @ x if self.want_gram else None)

    def add_sums(self, rows: int, sq: torch.Tensor, gram: torch.Tensor | None) -> None:
        """Add precomputed sums (shared by layers reading the same input, such as q/k/v)."""
        self.rows += rows
        self.sq_sum = sq.clone() if self.sq_sum is None else self.sq_sum + sq
        if self.want_gram and gram is not None:
            self.gram = gram.clone() if self.gram is None else self.gram.add_(gram)

    @property
    def feature_norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature (float32): Wanda's activation factor."""
        if self.sq_sum is None:
            raise SparseforgeError("no calibration input reached this layer: is it used in the model's forward?")
        return self.sq_sum.sqrt().to(torch.float32)

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` (float32), the layer-wise reconstruction loss's Hessian as GPTQ/SparseGPT scale it."""
        if self.gram is None:
            raise SparseforgeError("no calibration input reached this layer: is it used in the model's forward?")
        return self.gram * (2.0 / max(self.rows, 1))


ProcessFn = Callable[[str, nn.Module, LayerStats], None]
"""``process(name, module, stats)``: prune/quantize one layer in place, given its statistics."""


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one calibration batch: a dict (keyword arguments, as a tokenizer
    returns), a tuple/list whose first item is the input (``(inputs, targets)``), or a tensor."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def find_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of repeated blocks holding most of ``layers`` (at least two blocks), or None."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(c) for c in m}) != 1:
            continue
        held = sum(1 for n in layers if _in_list(n, name))
        if held and (best is None or held > best[0]):
            best = (held, name, m)
    return None if best is None else (best[1], best[2])


def select_layers(model: nn.Module, target: Target | Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """The layers calibrated one-shot pruning prunes: with no target, every Linear (or transformers Conv1D)
    inside the model's list of repeated blocks, as the papers do (embeddings, a pooler and the
    LM head stay dense); the zoo's models, with no such list, get all Linear/Conv2d layers."""
    supported = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    if target is None:
        found = find_blocks(model, supported)
        if found is None:
            return supported
        prefix = f"{found[0]}." if found[0] else ""
        return {n: m for n, m in supported.items() if n.startswith(prefix)}
    t = as_target(target)
    if not isinstance(target, Target):  # globs: consider every supported type, transformers' Conv1D included
        t = Target(include=t.include, exclude=t.exclude, types=tuple({type(m) for m in supported.values()}))
    layers = {layer.name: layer.module for layer in t.select(model)}
    unsupported = [n for n, m in layers.items() if not is_linear_like(m)]
    if unsupported or t.param_name != "weight":
        raise SparseforgeError(f"one-shot methods prune the weight of Linear/Conv2d layers; not {unsupported or t.param_name}")
    return layers


def _in_list(name: str, prefix: str) -> bool:
    """Whether module ``name`` lies inside an item of the ModuleList named ``prefix``."""
    head = f"{prefix}." if prefix else ""
    return name.startswith(head) and name[len(head):].split(".")[0].isdigit()


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


class _Capture:
    """Forward hooks that add each targeted layer's input to its :class:`LayerStats`."""

    def __init__(self, layers: dict[str, nn.Module], want_gram: bool, gram_dtype: torch.dtype = torch.float32) -> None:
        self.want_gram = want_gram
        self.gram_dtype = gram_dtype
        self.stats = {n: LayerStats(want_gram=want_gram) for n in layers}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        # q, k and v projections read one tensor: its sums are computed once, keyed by the tensor object
        self._last: tuple[Any, ...] | None = None

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            geometry = (module.kernel_size, module.stride, module.padding, module.dilation) \
                if isinstance(module, nn.Conv2d) else None
            if self._last is None or self._last[0] is not x or self._last[1] != geometry:
                m = input_matrix(module, x.detach())
                g = m.to(self.gram_dtype)
                sums = (m.shape[0], m.to(torch.float64).square().sum(0), g.t() @ g if self.want_gram else None)
                self._last = (x, geometry, sums)
            self.stats[name].add_sums(*self._last[2])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._last = None


def capture_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    layers: dict[str, nn.Module],
    *,
    gram: bool = True,
    gram_dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
) -> dict[str, LayerStats]:
    """Every layer's input statistics on ``batches``, all layers in one pass, nothing processed in between.

    Args:
        model: run in eval mode under ``no_grad`` (its mode is restored).
        batches: batches in the forms :func:`run_model` takes.
        layers: ``{name: module}`` (Linear, Conv2d, transformers Conv1D).
        gram: collect ``X^T X`` (default True).
        gram_dtype: dtype the Gram matrices are computed and summed in (default float32,
            as SparseGPT/GPTQ; float64 for RegMean's solve).
        max_batches: use at most this many batches (default all).

    Returns:
        ``{name: LayerStats}``; a layer no input reached has ``rows == 0``.
    """
    capture = _Capture(layers, gram, gram_dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                run_model(model, batch)
    finally:
        capture.remove()
        model.train(was_training)
    return capture.stats


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise SparseforgeError(f"cannot tell a block's hidden states in its output of type {type(out).__name__}")


@torch.no_grad()
def sequential(
    model: nn.Module,
    batches: Iterable[Any],
    layers: dict[str, nn.Module],
    process: ProcessFn,
    *,
    gram: bool = True,
    progress: bool | Progress = False,
    description: str = "calibrating",
) -> None:
    """Collect each layer's input statistics on ``batches`` and call ``process`` on it, sequentially.

    See the module docstring for the order (block by block when the model has
    a list of repeated blocks, layer by layer otherwise).

    Args:
        model: the model; put in eval mode for the duration (restored after).
        batches: calibration batches (see :func:`run_model` for their forms).
        layers: ``{name: module}`` of the targeted layers (Linear, Conv2d,
            transformers Conv1D), named as in ``model.named_modules()``.
        process: called once per layer with its statistics, in forward order
            within a block; it changes the layer in place.
        gram: collect the Gram matrix ``X^T X`` (SparseGPT, GPTQ; default
            True); False collects feature norms only (Wanda), which is cheaper.
        progress: show progress over blocks (or layers): True, or a
            :class:`~sparseforge.progress.Progress` to report to. Default False.
    """
    with using(progress) as reporter:
        _sequential(model, list(batches), layers, process, gram, reporter, description)


def _sequential(model, batches, layers, process, gram, progress, description) -> None:
    if not batches:
        raise SparseforgeError("no calibration batches given: pass at least one batch")
    if not layers:
        raise SparseforgeError("no layers to calibrate: the target matched no Linear/Conv layer")
    was_training = model.training
    model.eval()
    try:
        found = find_blocks(model, layers)
        if found is None:
            _by_layers(model, batches, layers, process, gram, progress, description)
            return
        prefix, blocks = found
        inside = {n: m for n, m in layers.items() if _in_list(n, prefix)}
        outside = {n: m for n, m in layers.items() if n not in inside}
        order = _call_order(model, batches[0], outside, marker=blocks[0]) if outside else ["<blocks>"]
        cut = order.index("<blocks>")
        if cut:  # layers before the blocks (an input projection) first
            _by_layers(model, batches, {n: outside[n] for n in order[:cut]}, process, gram, progress, description)
        _by_blocks(model, batches, inside, process, gram, progress, description, prefix, blocks)
        if order[cut + 1:]:  # then those after (a pooler, a head)
            _by_layers(model, batches, {n: outside[n] for n in order[cut + 1:]}, process, gram, progress,
                       description)
    finally:
        model.train(was_training)


def _call_order(model: nn.Module, batch: Any, layers: dict[str, nn.Module], marker: nn.Module | None = None
                ) -> list[str]:
    """Names of ``layers`` in the order a forward on ``batch`` first calls them (``"<blocks>"`` where
    ``marker`` is first called); an error names layers the forward never calls."""
    order: list[str] = []
    names = {id(m): n for n, m in layers.items()}
    if marker is not None:
        names[id(marker)] = "<blocks>"

    def note(module: nn.Module, args: Any, output: Any) -> None:
        n = names[id(module)]
        if n not in order:
            order.append(n)

    handles = [m.register_forward_hook(note) for m in layers.values()]
    if marker is not None:
        handles.append(marker.register_forward_pre_hook(lambda m, a: note(m, a, None)))
    try:
        run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    unused = [n for n in names.values() if n not in order]
    if unused:
        raise SparseforgeError(f"layers {unused} were not called by the model's forward on a calibration batch")
    return order


def _by_blocks(model, batches, layers, process, gram, show, description, prefix, blocks) -> None:
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                run_model(model, b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(inputs) != len(batches):
        raise SparseforgeError(f"the first block of {prefix or 'the model'} was not called on every calibration batch")
    with show.task(f"{description}: blocks", len(blocks)) as bar:
        for i, block in enumerate(blocks):
            block_prefix = f"{prefix}.{i}." if prefix else f"{i}."
            mine = {n: m for n, m in layers.items() if n.startswith(block_prefix)}
            if mine:
                cap = _Capture(mine, gram)
                try:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                finally:
                    cap.remove()
                for name, module in mine.items():
                    process(name, module, cap.stats[name])
                    cap.stats[name] = LayerStats()  # free the Gram as soon as the layer is done
            inputs = [((_first_tensor(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
            bar.advance()


def _by_layers(model, batches, layers, process, gram, show, description) -> None:
    order = _call_order(model, batches[0], layers)
    with show.task(f"{description}: layers", len(order)) as bar:
        for name in order:
            module = layers[name]
            cap = _Capture({name: module}, gram)
            try:
                last = order.index(name) == len(order) - 1
                for b in batches:
                    try:
                        _run_until(model, module, b, stop=not last)
                    except _Stop:
                        pass
            finally:
                cap.remove()
            process(name, module, cap.stats[name])
            bar.advance()


def _run_until(model: nn.Module, module: nn.Module, batch: Any, stop: bool) -> None:
    """Run the model on ``batch``, ending the pass right after ``module`` when ``stop``."""
    if not stop:
        run_model(model, batch)
        return

    def halt(m: nn.Module, args: Any, output: Any) -> None:
        raise _Stop

    # registered after the capture hook, so it runs after it
    handle = module.register_forward_hook(halt)
    try:
        run_model(model, batch)
    finally:
        handle.remove()



class Calibrator:
    """Runs a per-layer step block by block over a model on calibration batches, collecting only
    the statistics the step reads.

    The order is :func:`sequential`'s: each block (or, in a model without a
    list of repeated blocks, each layer) gets its inputs from the already
    processed blocks before it. ``activations`` collects each layer's input
    feature norms (``LayerStats.feature_norms``), ``hessian`` its Gram matrix
    as well (``LayerStats.hessian``); with neither, the layers are processed
    in module order without running the model (a data-free score needs no
    forward pass), each given an empty :class:`LayerStats`.

    Args:
        model: the model (put in eval mode while it runs, restored after).
        batches: calibration batches (see :func:`run_model` for their forms);
            read once into a list.
        progress: progress over blocks or layers (see :mod:`sparseforge.progress`).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> seen = {}
        >>> Calibrator(model, [torch.randn(8, 4)]).run(
        ...     {"0": model[0], "2": model[2]}, lambda n, m, s: seen.__setitem__(n, s.rows), activations=True)
        >>> seen
        {'0': 8, '2': 8}
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any], *, progress: bool | Progress = False) -> None:
        self.model = model
        self.batches = list(batches)
        self.progress = progress

    def run(self, layers: dict[str, nn.Module], process: ProcessFn, *, activations: bool = False,
            hessian: bool = False, description: str = "calibrating") -> None:
        """Call ``process(name, module, stats)`` on every layer, in calibration order, with the
        statistics asked for; ``process`` changes the layer in place before the next blocks run."""
        if not (activations or hessian):
            for name, module in layers.items():
                process(name, module, LayerStats())
            return
        sequential(self.model, self.batches, layers, process, gram=hessian, progress=self.progress,
                   description=description)

    def statistics(self, layers: dict[str, nn.Module], *, hessian: bool = False,
                   description: str = "calibrating") -> dict[str, LayerStats]:
        """Every layer's input statistics on the model as it is (nothing processed), in the same
        block-by-block order: what an allocation compares layers by before any of them is pruned."""
        found: dict[str, LayerStats] = {}
        self.run(layers, lambda name, module, stats: found.__setitem__(name, stats), activations=True,
                 hessian=hessian, description=description)
        return found
