"""MaskLLM: learn an N:M mask of frozen weights, one categorical choice per group of M.

"MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models"
(Fang, Yin, Muralidharan, Heinrich, Pool, Kautz, Molchanov & Wang, NeurIPS
2024; reference code NVlabs/MaskLLM, ``learnable_sparsity/``).

The rule. Every group of M consecutive inputs of a Linear weight row keeps
one of the ``C(M, N)`` candidate masks (:func:`candidate_masks`: 6 for 2:4,
70 for 4:8). Each group has learnable logits ``pi`` over its candidates. A
training step draws a soft mask with Gumbel-softmax,
``y = softmax((kappa * pi + g) / tau)`` with ``g ~ Gumbel(0, 1)``,
``mask = y @ candidates``, runs the model with ``W * mask`` (``W`` frozen)
and updates only the logits, end to end on the task loss. The temperature
``tau`` anneals linearly from 4 to 0.05 and the logit scale ``kappa`` grows
linearly from 100 to 500 (the paper's and the reference scripts' values), so
the sampled masks harden during training. The final mask is each group's
most likely candidate (argmax of ``pi``): exactly N of every M kept, written
into the weights as exact zeros.

Prior. The logits start as the reference code starts them: ``pi = s *
(e + alpha * (o - N/2))`` with ``e ~ N(0, 1)``, ``o`` the overlap of the
candidate with the one-shot prior mask of the group (``N`` for the candidate
equal to the prior, 0 for one sharing nothing), ``alpha`` the prior strength
(3, the paper's) and ``s`` the logit scale (0.01, the reference's init
std). With ``alpha = 3`` about 5% of 2:4 groups start with another
candidate on top (the noise), which training then sorts out; a large
``alpha`` makes the start the prior exactly.

Sparse-weight regularisation (paper Sec. 3.3, ``--weight-reg``): optionally
the loss subtracts ``lambda * (1 - t/T) * R`` with ``R`` the squared norm of
the kept weights ``sum ||W * mask||^2``. Here ``R`` is divided by the dense
``sum ||W||^2`` (the kept share of the squared norm, in [0, 1]), so one
``lambda`` fits every model size; the reference's 1e-5 on the raw sum of
LLaMA-2 7B corresponds to ``1e-5 * sum ||W||^2`` here. Off by default.

Masking. While attached, a MaskLLM masks its layers the way a
:class:`~sparseforge.Sparsifier` does: a ``weight_mask`` buffer on each
module, applied to the weight in place (``weight = W * mask``, with ``W`` a
dense copy kept aside), here before each forward pass (a new Gumbel sample
per forward in training, the argmax mask in eval). The gradient the weight
receives (``dL/d(W * mask)``) is handed, as soon as it is accumulated, to the
logits through the soft mask's graph (``dL/dmask = dL/d(W * mask) * W``) and
then cleared: the weights stay frozen. So a model runs once forward per
backward while attached, and :meth:`MaskLLM.detach` writes ``W`` back.

Not included: mask transfer to downstream tasks, and training the weights
together with the masks.

Use :func:`train_maskllm` for the whole run with any loss, :class:`MaskLLM`
to write the loop yourself, :func:`prune_maskllm` for a transformers model
with the default losses (as the CLI does).

Measured (all-MiniLM-L6-v2, 2:4 on the 36 encoder Linears, 300 steps of 8
fortune windows of 64 tokens, distillation to the dense last hidden states,
2 CPU threads, 248 s): mean cosine of held-out sentence embeddings to the
dense model's 0.589 for the magnitude prior, 0.733 for one-shot Wanda,
0.847 after MaskLLM (13.5% of the groups left the prior).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.patterns import NM, Pattern, as_pattern
from sparseforge.progress import Progress, using
from sparseforge.report import PruneReport
from sparseforge.targets import Layer, TargetSpec

__all__ = ["MaskLLM", "candidate_masks", "prune_maskllm", "train_maskllm"]

PriorSpec = str | dict[str, torch.Tensor]


def candidate_masks(n: int, m: int) -> torch.Tensor:
    """The ``C(m, n)`` binary masks of a group of ``m`` with ``n`` ones, ``[C(m, n), m]`` float.

    In lexicographic order of the kept positions:

    >>> candidate_masks(2, 4)
    tensor([[1., 1., 0., 0.],
            [1., 0., 1., 0.],
            [1., 0., 0., 1.],
            [0., 1., 1., 0.],
            [0., 1., 0., 1.],
            [0., 0., 1., 1.]])
    """
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)):
        raise SparseforgeError(f"N and M must be integers, got {n!r}:{m!r}")
    if not 0 < n < m:
        raise SparseforgeError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows = [[1.0 if j in keep else 0.0 for j in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


class _Sampling:
    """State shared by a MaskLLM's layers: temperature, scale, mode, noise, regulariser."""

    def __init__(self, seed: int) -> None:
        self.tau = 4.0
        self.kappa = 100.0
        self.sample = True
        self.track_kept = False
        self.kept: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.device_generators: dict[torch.device, torch.Generator] = {}
        self.seed = seed

    def gumbel(self, like: torch.Tensor) -> torch.Tensor:
        if like.device.type == "cpu":
            gen = self.generator
        else:
            gen = self.device_generators.get(like.device)
            if gen is None:
                gen = self.device_generators[like.device] = torch.Generator(like.device).manual_seed(self.seed)
        return -torch.empty_like(like).exponential_(generator=gen).log()


def _prior_masks(model: nn.Module, layers: dict[str, nn.Linear], prior: PriorSpec, pattern: NM,
                 batches: Sequence[Any] | None) -> dict[str, torch.Tensor]:
    if isinstance(prior, dict):
        missing = [n for n in layers if n not in prior]
        if missing:
            raise SparseforgeError(f"the prior masks lack layers {missing[:3]}; give one bool mask per layer")
        out = {}
        for n, m in layers.items():
            mask = torch.as_tensor(prior[n]).to(torch.bool)
            if mask.shape != m.weight.shape:
                raise SparseforgeError(f"prior mask of {n} has shape {tuple(mask.shape)}, the weight "
                                       f"{tuple(m.weight.shape)}")
            out[n] = mask.to(m.weight.device)
        return out
    if prior == "magnitude":
        return {n: pattern.mask(m.weight.detach().abs()) for n, m in layers.items()}
    if prior in ("wanda", "sparsegpt"):
        if not batches:
            raise SparseforgeError(f"a {prior} prior needs calibration batches")
        # one-shot pruning sits above the methods; only this prior needs it
        from sparseforge.oneshot.prune import prune

        clone = copy.deepcopy(model)
        prune(clone, prior, pattern=pattern, target=list(layers), calibration=batches)
        found = dict(clone.named_modules())
        return {n: found[n].weight.detach() != 0 for n in layers}
    raise SparseforgeError(f"unknown MaskLLM prior {prior!r}: use 'magnitude', 'wanda', 'sparsegpt' or a dict of masks")


class MaskLLM:
    """Learnable N:M masks for the Linear layers of ``model`` (MaskLLM, Fang et al., NeurIPS 2024).

    Holds one logit vector over the ``C(M, N)`` candidates per group of M
    inputs of each selected layer (see the module docstring for the rule).
    :meth:`attach` (or ``with``) masks the layers as a Sparsifier does (a
    ``weight_mask`` buffer applied in place, see the module docstring), so
    their forward uses ``W * mask``: a Gumbel-softmax sample after
    :meth:`train` (the default), the argmax mask after :meth:`eval`; the
    weights get no gradient meanwhile (it goes to the logits). Optimise
    :meth:`parameters`; :meth:`finalize` writes the argmax masks into the
    weights as exact zeros and leaves plain ``nn.Linear`` modules.

    Args:
        model: the model; its selected layers must be ``nn.Linear`` with inputs divisible by M.
        pattern: ``"N:M"`` (or an :class:`~sparseforge.patterns.NM`). Default ``"2:4"``.
        prior: the one-shot mask the logits start from: ``"magnitude"`` (default: the N largest
            ``|W|`` of each group), ``"wanda"`` or ``"sparsegpt"`` (their masks, from ``batches``;
            the weights stay the dense ones), or ``{layer name: bool mask}``.
        prior_strength: ``alpha``. Default 3.0 (the paper's).
        init_std: ``s``, the scale of the initial logits (the reference's 0.01). Default 0.01.
            The learning rate acts in these units.
        target: layers; default :func:`sparseforge.oneshot.calibrated.select_layers`' (every Linear
            inside the model's repeated blocks, or every Linear of a model without such blocks).
        seed: seed of the initial logits' noise and of the Gumbel noise. Default 0.
        batches: calibration batches, for a ``"wanda"``/``"sparsegpt"`` prior only.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> masks = MaskLLM(model, "2:4")
        >>> opt = torch.optim.Adam(masks.parameters(), lr=1e-2)
        >>> with masks:
        ...     model(torch.randn(3, 8)).square().mean().backward()
        ...     opt.step()
        >>> _ = masks.finalize()
        >>> int((model[0].weight != 0).sum())
        16
    """

    def __init__(
        self,
        model: nn.Module,
        pattern: str | Pattern = "2:4",
        *,
        prior: PriorSpec = "magnitude",
        prior_strength: float = 3.0,
        init_std: float = 0.01,
        target: TargetSpec = None,
        seed: int = 0,
        batches: Sequence[Any] | None = None,
    ) -> None:
        from sparseforge.oneshot.calibration import select_layers

        pat = as_pattern(pattern)
        if not isinstance(pat, NM):
            raise SparseforgeError(f"MaskLLM learns N:M masks; got pattern {pat}")
        if not (init_std > 0 and math.isfinite(init_std)) or not math.isfinite(prior_strength):
            raise SparseforgeError(f"init_std must be > 0 and prior_strength finite, got {init_std}, {prior_strength}")
        layers = select_layers(model, target)
        if not layers:
            raise SparseforgeError("MaskLLM found no layers to mask: check the target")
        bad = [n for n, m in layers.items() if type(m) is not nn.Linear]
        if bad:
            raise SparseforgeError(f"MaskLLM masks nn.Linear layers; not {bad[:3]}")
        for name, m in layers.items():
            if m.in_features % pat.m:
                raise SparseforgeError(f"{name} has {m.in_features} inputs, not divisible by M={pat.m} of {pat}")
        self.pattern = pat
        self.layers: dict[str, nn.Linear] = layers
        self.prior_name = prior if isinstance(prior, str) else "given"
        self.candidates = candidate_masks(pat.n, pat.m)
        self._state = _Sampling(seed)
        self._logits: dict[str, nn.Parameter] = {}
        self.prior_index: dict[str, torch.Tensor] = {}
        priors = _prior_masks(model, layers, prior, pat, batches)
        gen = torch.Generator().manual_seed(seed)
        for name, m in layers.items():
            device = m.weight.device
            cands = self.candidates.to(device)
            overlap = priors[name].reshape(-1, pat.m).to(cands.dtype) @ cands.t()  # [groups, C]
            noise = torch.randn(overlap.shape, generator=gen).to(device)
            logits = init_std * (noise + prior_strength * (overlap - pat.n / 2))
            self._logits[name] = nn.Parameter(logits.float())
            self.prior_index[name] = overlap.argmax(-1)
        self._handles: dict[str, list[Any]] = {}
        self._dense: dict[str, tuple[torch.Tensor, bool]] = {}  # attached: the dense weight, its requires_grad
        self._soft: dict[str, torch.Tensor] = {}  # the last sampled soft mask (with its graph), per layer
        self._sq_norm = sum(float(m.weight.detach().double().square().sum()) for m in layers.values())

    # -- the learnable part ------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The logits, one ``[groups, C(M, N)]`` float32 tensor per layer: what the optimizer updates."""
        return list(self._logits.values())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self._logits.items()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue bit for bit: the logits by layer name (detached
        copies), the temperature and scale, and the state of the Gumbel noise generator."""
        return {"logits": {n: p.detach().clone() for n, p in self._logits.items()},
                "tau": self._state.tau, "kappa": self._state.kappa,
                "generator": self._state.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (or a bare ``{layer name: logits}`` dict, which
        restores the logits only); the layer names and shapes must match."""
        logits = state["logits"] if "logits" in state else state
        missing = sorted(set(self._logits) - set(logits))
        if missing:
            raise SparseforgeError(f"MaskLLM state has no logits for {missing[:3]}: it belongs to another model")
        for n, p in self._logits.items():
            if tuple(logits[n].shape) != tuple(p.shape):
                raise SparseforgeError(f"MaskLLM logits of {n} have shape {tuple(logits[n].shape)}, "
                                       f"this model's {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in self._logits.items():
                p.copy_(logits[n])
        if "logits" in state:
            self.set_temperature(float(state["tau"]), float(state["kappa"]))
            self._state.generator.set_state(state["generator"])

    def set_temperature(self, tau: float, kappa: float | None = None) -> None:
        """Set the Gumbel-softmax temperature ``tau`` and (when given) the logit scale ``kappa``."""
        if not tau > 0 or (kappa is not None and not kappa > 0):
            raise SparseforgeError(f"tau and kappa must be > 0, got {tau} and {kappa}")
        self._state.tau = float(tau)
        if kappa is not None:
            self._state.kappa = float(kappa)

    @property
    def tau(self) -> float:
        return self._state.tau

    @property
    def kappa(self) -> float:
        return self._state.kappa

    def train(self, mode: bool = True) -> MaskLLM:
        """Sample soft masks (Gumbel-softmax) in the forward pass; ``train(False)`` = :meth:`eval`."""
        self._state.sample = bool(mode)
        return self

    def eval(self) -> MaskLLM:
        """Use each group's argmax candidate in the forward pass (the mask :meth:`finalize` applies)."""
        return self.train(False)

    # -- masks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Each layer's bool keep-mask from the argmax candidate of every group: exactly N of every M."""
        out = {}
        for name, p in self._logits.items():
            w = self.layers[name].weight
            cands = self.candidates.to(p.device)
            out[name] = cands[p.argmax(-1)].reshape(w.shape).to(torch.bool)
        return out

    @torch.no_grad()
    def changed_fraction(self) -> float:
        """Share of groups whose argmax candidate differs from the prior mask's."""
        changed = sum(int((p.argmax(-1) != self.prior_index[n]).sum()) for n, p in self._logits.items())
        total = sum(p.shape[0] for p in self._logits.values())
        return changed / total

    def kept_norm(self) -> torch.Tensor:
        """``sum ||W * mask||^2 / sum ||W||^2`` over the layers, for the soft masks of the last
        sampled forward pass (differentiable in the logits; tracked only while :attr:`track_kept`)."""
        if not self._state.kept:
            raise SparseforgeError("no sampled forward pass since track_kept was set: run the model first")
        return torch.stack([v.float() for v in self._state.kept.values()]).sum() / self._sq_norm

    @property
    def track_kept(self) -> bool:
        """Whether sampled forward passes record the kept squared norm for :meth:`kept_norm`."""
        return self._state.track_kept

    @track_kept.setter
    def track_kept(self, value: bool) -> None:
        self._state.track_kept = bool(value)
        self._state.kept.clear()

    # -- masking, as the Sparsifier masks --------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> MaskLLM:
        """Give every layer a ``weight_mask`` buffer, applied to its weight in place before each forward pass."""
        if self._handles:
            return self
        try:
            for name, m in self.layers.items():
                mask_name = Layer(name, m).mask_name
                if hasattr(m, mask_name):
                    raise SparseforgeError(f"{name} already has a {mask_name}: is a Sparsifier attached? "
                                           "finalize() it first")
                w = m.weight
                self._dense[name] = (w.detach().clone(), w.requires_grad)
                m.register_buffer(mask_name, torch.ones_like(w), persistent=False)
                # the weight's gradient is what the logits learn from (then cleared: see the module docstring)
                w.requires_grad_(True)
                if self._state.sample:
                    # The parametrization this masking replaced drew one sample per layer when it was
                    # registered (torch checks a parametrization's output then); drawing it still keeps
                    # seeded runs identical to earlier versions' (and to the measured numbers).
                    self._state.gumbel(self._logits[name])
                self._handles[name] = [m.register_forward_pre_hook(self._mask_before_forward(name)),
                                       w.register_post_accumulate_grad_hook(self._grad_to_logits(name))]
        except BaseException:
            self.detach()
            raise
        return self

    def _mask_before_forward(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            dense = self._dense[name][0]
            st = self._state
            logits = self._logits[name]
            cands = self.candidates.to(logits.device)
            if st.sample:
                z = logits * st.kappa
                y = torch.softmax((z + st.gumbel(z)) / st.tau, dim=-1)
                soft = (y @ cands).reshape(dense.shape).to(dense.dtype)
                self._soft[name] = soft
                if st.track_kept:
                    st.kept[name] = (dense * soft).square().sum()
                mask = soft.detach()
            else:
                self._soft.pop(name, None)
                mask = cands[logits.argmax(-1)].reshape(dense.shape).to(dense.dtype)
            with torch.no_grad():
                getattr(module, Layer(name, module).mask_name).copy_(mask)
                module.weight.copy_(dense * mask)
        return hook

    def _grad_to_logits(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            grad, weight.grad = weight.grad, None  # the weights stay frozen
            soft = self._soft.pop(name, None)
            if grad is not None and soft is not None and soft.requires_grad:
                # d(W * mask)/dmask = W: the chain rule of W * mask, run into the soft mask's graph; the
                # regulariser's own path through that graph is still to come when it is tracked
                soft.backward(grad * self._dense[name][0], retain_graph=self._state.track_kept)
        return hook

    def detach(self) -> MaskLLM:
        """Remove the masks and hooks, writing back the dense weights (unfrozen as they were); the logits stay."""
        for name, handles in list(self._handles.items()):
            for h in handles:
                h.remove()
            del self._handles[name]
        for name, (dense, requires_grad) in list(self._dense.items()):
            m = self.layers[name]
            with torch.no_grad():
                m.weight.copy_(dense)
            m.weight.requires_grad_(requires_grad)
            m._buffers.pop(Layer(name, m).mask_name, None)
            del self._dense[name]
        self._soft.clear()
        self._state.kept.clear()
        return self

    def __enter__(self) -> MaskLLM:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """Remove the masks and zero every weight outside its layer's argmax mask (exact +0.0).

        Kept weights are untouched (bit-identical); the modules are plain ``nn.Linear`` again with
        their parameters in the original order. Returns the bool masks applied.
        """
        masks = self.hard_masks()
        self.detach()
        for name, mask in masks.items():
            self.layers[name].weight.masked_fill_(~mask, 0.0)
        return masks


def _anneal(bounds: tuple[float, float], frac: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * frac


def train_maskllm(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    pattern: str | Pattern = "2:4",
    *,
    steps: int = 300,
    lr: float = 3e-4,
    prior: PriorSpec = "magnitude",
    prior_strength: float = 3.0,
    tau: tuple[float, float] = (4.0, 0.05),
    kappa: tuple[float, float] = (100.0, 500.0),
    weight_reg: float = 0.0,
    init_std: float = 0.01,
    target: TargetSpec = None,
    seed: int = 0,
    progress: bool | Progress = False,
    log_every: int | None = None,
) -> PruneReport:
    """Learn an N:M mask of ``model``'s layers with MaskLLM and prune ``model`` in place with it.

    Returns the :class:`~sparseforge.report.PruneReport` of the run: ``pruned`` layers (with
    ``kept_by_mask``), ``history`` rows (``step``, ``loss``: the mean over the steps since the
    previous row, ``tau``, ``kappa``, ``changed``: share of groups whose argmax differs from the
    prior's), ``changed_groups``, ``prior``, ``steps``, ``seconds``.

    The weights stay frozen (every parameter of ``model`` has ``requires_grad`` False during the
    run, restored after); Adam updates only the mask logits. Step ``t`` of ``T`` uses
    ``tau`` and ``kappa`` interpolated linearly from their start to their end value
    (``t / (T - 1)``), the batch ``t mod len(batches)``, and minimises
    ``loss_fn(model, batch) - weight_reg * (1 - t/T) * kept_norm``. The model runs in eval mode
    (no dropout) and is left in the mode it came in, with plain Linear layers and exact zeros. On
    an error the model is left as it came (dense weights, no patches).

    Args:
        model: any model with ``nn.Linear`` layers (a transformers model included).
        batches: training batches, cycled for ``steps`` steps.
        loss_fn: ``loss_fn(model, batch) -> scalar``: e.g. the causal LM loss
            (``model(**batch, labels=batch["input_ids"]).loss``) or a distillation loss to
            outputs of the dense model the caller computed beforehand.
        pattern: ``"N:M"``. Default ``"2:4"``.
        steps: optimizer steps. Default 300.
        lr: Adam learning rate of the logits (in units of ``init_std``). Default 3e-4: the best of
            1e-4, 3e-4 and 1e-3 for 300 steps on all-MiniLM-L6-v2 (validation texts). The reference
            used 5e-5 (cosine-decayed) for 2,000 steps of 256 x 4,096 tokens.
        prior, prior_strength, init_std, target, seed: as :class:`MaskLLM`. Defaults
            ``"magnitude"``, 3.0, 0.01, the blocks' Linears, 0.
        tau: Gumbel-softmax temperature (start, end). Default (4.0, 0.05) (the paper's).
        kappa: logit scale (start, end). Default (100.0, 500.0) (the paper's).
        weight_reg: ``lambda`` of the sparse-weight regularisation on the kept share of the squared
            weight norm, decayed linearly to 0. Default 0.0 (off).
        progress: show the steps, with the latest logged row (see :mod:`sparseforge.progress`): True,
            or a :class:`~sparseforge.progress.Progress` to report to. Default False.
        log_every: steps between history rows. Default ``max(1, steps // 10)``; the first and last
            steps are always logged.
    """
    if steps < 0 or not lr > 0:
        raise SparseforgeError(f"steps must be >= 0 and lr > 0, got {steps} and {lr}")
    for name, (a, b) in (("tau", tau), ("kappa", kappa)):
        if not (a > 0 and b > 0):
            raise SparseforgeError(f"{name} must be positive, got {(a, b)}")
    if weight_reg < 0:
        raise SparseforgeError(f"weight_reg must be >= 0, got {weight_reg}")
    batches = list(batches)
    if steps and not batches:
        raise SparseforgeError("MaskLLM needs training batches")
    every = max(1, log_every if log_every is not None else steps // 10)
    start = time.perf_counter()
    masks = MaskLLM(model, pattern, prior=prior, prior_strength=prior_strength, init_std=init_std,
                    target=target, seed=seed, batches=batches)
    rep = PruneReport(method="maskllm", pattern=str(masks.pattern), allocation="uniform",
                      requested=masks.pattern.sparsity, prior=masks.prior_name, steps=steps)
    grad_state = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    finished = False
    with using(progress) as reporter, reporter.task("MaskLLM steps", steps) as bar:
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            masks.attach().train()
            masks.track_kept = weight_reg > 0
            opt = torch.optim.Adam(masks.parameters(), lr=lr)
            model.eval()  # no dropout: the masks are what is learned
            window: list[float] = []
            for step in range(steps):
                frac = step / max(1, steps - 1)
                masks.set_temperature(_anneal(tau, frac), _anneal(kappa, frac))
                loss = loss_fn(model, batches[step % len(batches)])
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise SparseforgeError(f"MaskLLM loss is {value} at step {step}: lower lr")
                if weight_reg > 0:
                    loss = loss - weight_reg * (1.0 - step / steps) * masks.kept_norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                window.append(value)
                if step % every == 0 or step == steps - 1:
                    row = {"step": step, "loss": sum(window) / len(window), "tau": masks.tau, "kappa": masks.kappa,
                           "changed": masks.changed_fraction()}
                    rep.history.append(row)
                    window = []
                    bar.update(info=f"loss {row['loss']:.4f}, tau {row['tau']:.3f}, "
                                    f"changed from prior {row['changed']:.1%}")
                bar.advance()
            finished = True
        finally:
            if finished:
                rep.changed_groups = masks.changed_fraction()
                applied = masks.finalize()
                for name, mask in applied.items():
                    rep.record(name, masks.layers[name].weight, masks.pattern.sparsity, kept_by_mask=float(mask.sum()))
            else:
                masks.detach()
            for p, flag in grad_state.items():
                p.requires_grad_(flag)
            model.train(was_training)
    rep.seconds = time.perf_counter() - start
    return rep.with_model(model)


def _default_loss(model: nn.Module, batch: Any, teacher: Any) -> torch.Tensor:
    """Causal LM: next-token cross-entropy (the paper's loss). Other models: mean squared error of the
    last hidden states to the dense model's, over their variance (distillation)."""
    from sparseforge.quality import is_causal_lm

    if is_causal_lm(model):
        return model(**batch, labels=batch["input_ids"], use_cache=False).loss
    out = model(**batch).last_hidden_state
    return (out - teacher).square().mean() / teacher.var().clamp_min(1e-12)


def prune_maskllm(
    model: nn.Module,
    batches: Iterable[Any],
    pattern: str = "2:4",
    *,
    loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor] | None = None,
    **options: Any,
) -> PruneReport:
    """MaskLLM on a transformers model with its default loss (:func:`train_maskllm` does the work).

    The loss, unless ``loss_fn(model, batch, teacher_output)`` is given: for a causal LM the
    next-token cross-entropy on ``batch["input_ids"]`` (the paper's); for other models (e.g. a
    sentence encoder) the mean squared error of the last hidden states to the dense model's
    (computed once, before training, as ``teacher_output``), divided by their variance. Batches are
    keyword dicts, as a tokenizer or :func:`sparseforge.tokens.calibration_batches` gives them.
    ``options`` are the keyword arguments of :func:`train_maskllm` (``steps``, ``lr``, ``prior``, ...),
    with its defaults; ``prior`` may also be ``"wanda"`` or ``"sparsegpt"`` (their masks on these batches).
    """
    takes = [name for name, p in inspect.signature(train_maskllm).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = [name for name in options if name not in takes]
    if unknown:  # before the teacher pass, not after it
        raise SparseforgeError(f"prune_maskllm takes no option {unknown[0]!r}; its options are train_maskllm's: "
                               f"{', '.join(takes)}")
    batches = list(batches)
    teachers: list[Any] = [None] * len(batches)
    if loss_fn is None:
        from sparseforge.quality import is_causal_lm

        if not is_causal_lm(model):  # distillation targets: the dense model's outputs, once
            was_training = model.training
            model.eval()
            with torch.no_grad():
                teachers = [model(**b).last_hidden_state for b in batches]
            model.train(was_training)
        loss_fn = _default_loss
    index = {id(b): i for i, b in enumerate(batches)}
    three = loss_fn

    def two(model: nn.Module, batch: Any) -> torch.Tensor:
        return three(model, batch, teachers[index[id(batch)]])

    return train_maskllm(model, batches, two, pattern, **options)
