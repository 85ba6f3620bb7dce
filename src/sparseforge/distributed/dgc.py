"""Deep Gradient Compression as a DDP communication hook, with byte-counting baselines.

Rule, from "Deep Gradient Compression: Reducing the Communication Bandwidth
for Distributed Training" (Lin, Han, Mao, Wang and Dally, ICLR 2018): each
rank sends only the largest-magnitude entries of its gradient and keeps the
rest locally until they have grown large enough to be sent. Per DDP bucket
(a flat slice of the model's gradients), on every rank, each step:

1. ``g``: the rank's local gradient (``bucket.buffer()``), plus
   ``weight_decay * w`` when the hook applies weight decay (see
   :class:`DGCConfig`), clipped locally (paper Section 3.3: the L2 norm of
   the local gradient is clipped at ``clip_norm / sqrt(N)``, N ranks, so that
   the sum of N such gradients respects the global threshold ``clip_norm``).
2. Momentum correction (Section 3.2): ``u = m * u + g`` and ``v = v + u``
   (Nesterov: ``u = m * (u + g)`` and ``v = v + u + g``): the *velocity*
   is accumulated, not the gradient, so that a delayed entry arrives with the
   momentum it would have had.
3. Sparsification, per parameter tensor of the bucket (as the authors'
   implementation compresses each tensor, and so that training does not
   depend on how DDP groups parameters into buckets: that grouping changes
   after DDP's first step and on every restart): select
   ``k = ceil(density * numel)`` entries of largest ``|v|``; by default the threshold is estimated from a random sample of
   ``|v|`` (``sample_fraction`` of the entries: the k-th largest of the sample
   scaled to the sample's size), and when more than ``k`` entries pass it,
   the exact top-k among those is taken (the paper's hierarchical selection:
   a cheap estimate, refined on the already-selected few). When fewer pass,
   fewer are sent; the rest stays in ``v``. ``exact_topk`` selects exactly
   ``k`` entries by ``torch.topk``.
4. Momentum factor masking (Section 3.2): ``v[selected] = 0`` (the residual
   keeps every unsent entry) and ``u[selected] = 0`` (stops the stale
   momentum of entries that were just sent; ``momentum_masking``).
5. Exchange: the selected values and their int32 indices are all-gathered;
   every rank scatter-adds all ranks' entries into a dense buffer and divides
   by N: DDP receives the averaged sparse update.

With ``density=1`` every entry is selected each step, so with momentum 0 the
hook returns the plain all-reduce mean (bit for bit with two ranks: ``0 + a + b``
and ``a + b`` are the same float, and halving is exact); with momentum ``m``
and ``momentum_masking=False`` it returns ``m * u + g`` averaged, which is
what SGD with momentum ``m`` applies: DGC then follows the same weights as
all-reduce + SGD(momentum=m) with the optimizer's momentum set to 0. With
masking on (the paper's default), ``u`` is cleared at every sent entry, so at
density 1 there is no momentum left at all: masking only keeps momentum within
an entry's accumulation period, which is long at the paper's 0.1% density.

Exchange format (chosen, so the bytes below are exact): with the sampled
threshold, counts differ by rank, and gloo's all-gather needs equal sizes, so
each rank first all-gathers its count (one int64, 8 bytes), then all ranks
pad to the largest count and all-gather one byte buffer per rank holding the
values (the bucket's dtype) and int32 indices. With ``exact_topk`` every rank
sends exactly ``k`` entries and the count exchange is skipped. The values and
indices travel in one collective to pay the latency once.

Bytes (``stats()``): ``bytes_sent`` is the payload this rank contributes to
the collectives (padding and counts included): ``(element size + 4) *
padded count (+ 8)`` per bucket per step for DGC, ``element size * numel`` for
all-reduce (``dense_bytes``). That is the message each rank puts on the
wire when N = 2 (ring all-reduce sends 2(N-1)/N of the buffer, ring
all-gather (N-1) times the rank's piece); for larger N, DGC's all-gather cost
grows with N - 1 while all-reduce's stays below twice the buffer, which the
paper's numbers (measured on up to 64 nodes) include and ours do not.

Baselines with the same counters: :func:`register_powersgd` (PyTorch's own
PowerSGD hook, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", Vogels et al., NeurIPS 2019, counted by a thin
wrapper) and :func:`register_allreduce_counter` (DDP's default averaging).

The collectives run synchronously inside the hook and the hook returns a
completed Future: simple and correct (gloo on CPU included); it forgoes
overlapping communication with the rest of the backward pass.
"""

# No ``from __future__ import annotations``: DDP checks the hooks' annotations at registration
# (``bucket: dist.GradBucket`` and the Future return type) as objects, not strings.
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparseforge.errors import SparseforgeError

__all__ = [
    "AllReduceState",
    "CommState",
    "DGCConfig",
    "DGCState",
    "PowerSGDCounterState",
    "dgc_hook",
    "register_allreduce_counter",
    "register_dgc",
    "register_powersgd",
    "warmup_density",
]

#: Density of the first warm-up stage and the factor between stages (paper: 75%, 93.75%, 98.4375%, 99.6%
#: sparsity in the first four epochs, i.e. densities 1/4, 1/16, 1/64, 1/256, then the target 0.1%).
WARMUP_FACTOR = 0.25
INDEX_BYTES = 4  # indices travel as int32 (a bucket has fewer than 2**31 entries; checked)
COUNT_BYTES = 8  # one int64 per rank per bucket with the sampled threshold


def warmup_density(step: int, density: float, warmup_steps: int) -> float:
    """The density DGC uses at ``step`` under the paper's exponential warm-up.

    Rule (Lin et al. 2018, Section 3.4, "warm-up training"): sparsity rises
    exponentially, 75%, 93.75%, 98.4375%, 99.6%, over the first four epochs,
    then stays at 99.9%. In densities: ``1/4, 1/16, 1/64, ...`` (each stage a
    quarter of the previous one), every stage above the target, stages of
    equal length filling ``warmup_steps``, then ``density``. With the
    paper's target 0.001 and ``warmup_steps`` = four epochs this is exactly its
    schedule (four one-epoch stages). No warm-up when ``warmup_steps`` is 0 or
    ``density >= 1/4``.

    >>> [warmup_density(s, 0.001, 8) for s in (0, 1, 2, 3, 4, 5, 6, 7, 8)]
    [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625, 0.00390625, 0.001]
    >>> warmup_density(5, 0.5, 10), warmup_density(0, 0.01, 0)
    (0.5, 0.01)
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return density
    stages = 0
    while WARMUP_FACTOR ** (stages + 1) > density:
        stages += 1
    if stages == 0:
        return density
    stage = (int(step) * stages) // int(warmup_steps)
    return WARMUP_FACTOR ** (stage + 1)


@dataclass
class DGCConfig:
    """Settings of Deep Gradient Compression (Lin et al., ICLR 2018); see the module docstring for the rule.

    Attributes:
        density: fraction of each parameter tensor's entries sent per step, in (0, 1]
            (default 0.001, the paper's 99.9% sparsity).
        momentum: momentum ``m`` of the momentum correction (default 0.9). The
            optimizer must then use momentum 0 (see :meth:`DGCState.check_optimizer`).
        nesterov: Nesterov momentum correction (default False).
        clip_norm: global gradient-norm threshold for local clipping: each
            rank clips its gradient's L2 norm (per bucket: the hook sees one
            bucket at a time; one bucket holds models up to DDP's bucket size)
            at ``clip_norm / sqrt(N)`` (Section 3.3). None (default) = off.
        warmup_steps: steps of exponential density warm-up
            (:func:`warmup_density`; paper: 4 epochs). Default 0 = none.
        exact_topk: select exactly ``k`` entries by ``torch.topk`` instead of the
            sampled threshold (default False).
        sample_fraction: fraction of entries sampled to estimate the top-k
            threshold (paper: 0.1% to 1%; default 0.01).
        momentum_masking: clear ``u`` at sent entries (the paper's momentum
            factor masking; default True). False makes density 1 equal to SGD
            with momentum ``m``.
        weight_decay: added to the local gradient in the hook (``g + wd * w``)
            so that it goes through the momentum correction as it would
            through SGD's momentum (what the authors' code does); the optimizer
            must then use weight decay 0. Default 0.
        seed: seed of the threshold sampling, drawn per (seed, rank, parameter, step) so that a
            resumed run samples what the uninterrupted one would have (default 0).
    """

    density: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False
    clip_norm: float | None = None
    warmup_steps: int = 0
    exact_topk: bool = False
    sample_fraction: float = 0.01
    momentum_masking: bool = True
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` naming the first bad setting and its valid range."""

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SparseforgeError(f"DGCConfig.{name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SparseforgeError(f"DGCConfig.{name} must be an integer, got {value!r}")
            return value

        if not 0.0 < number("density") <= 1.0:
            raise SparseforgeError(f"DGCConfig.density must be in (0, 1] (fraction of entries sent), "
                                   f"got {self.density}; the paper uses 0.001")
        if not 0.0 <= number("momentum") < 1.0:
            raise SparseforgeError(f"DGCConfig.momentum must be in [0, 1), got {self.momentum}")
        for name in ("nesterov", "exact_topk", "momentum_masking"):
            if not isinstance(getattr(self, name), bool):
                raise SparseforgeError(f"DGCConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0:
            raise SparseforgeError("DGCConfig.nesterov needs momentum > 0 (Nesterov momentum of 0 is no momentum)")
        if self.clip_norm is not None and not number("clip_norm") > 0:
            raise SparseforgeError(f"DGCConfig.clip_norm must be > 0 or None (off), got {self.clip_norm}")
        if integer("warmup_steps") < 0:
            raise SparseforgeError(f"DGCConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < number("sample_fraction") <= 1.0:
            raise SparseforgeError(f"DGCConfig.sample_fraction must be in (0, 1], got {self.sample_fraction}; "
                                   "the paper samples 0.001 to 0.01")
        if number("weight_decay") < 0:
            raise SparseforgeError(f"DGCConfig.weight_decay must be >= 0, got {self.weight_decay}")
        integer("seed")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DGCConfig":
        """Build and validate a config from a mapping (e.g. a recipe's ``dgc:`` section).

        >>> DGCConfig.from_dict({"density": 0.01, "warmup_steps": 100}).density
        0.01
        """
        if not isinstance(values, dict):
            raise SparseforgeError(f"DGC settings must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SparseforgeError(f"unknown DGC setting(s) {unknown}; valid: {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config


# -- counters shared by the three hooks ------------------------------------------------------


class CommState:
    """Byte counters of one rank's gradient communication under a DDP comm hook.

    A step is counted when DDP hands the hook the last bucket of a backward
    pass (``bucket.is_last()``). All counts are this rank's.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
        else:  # a single process (tests, or a hook called by hand): no collectives
            self.rank, self.world_size = 0, 1
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.entries_sent = 0
        self.entries_dense = 0
        self.steps = 0
        self._step_entries = [0, 0]  # sent, dense within the current step
        self.last_step_density = 1.0

    def _record(self, bucket: Any, *, sent_bytes: int, sent_entries: int) -> None:
        buffer = bucket.buffer()
        self.bytes_sent += int(sent_bytes)
        self.dense_bytes += buffer.numel() * buffer.element_size()
        self.entries_sent += int(sent_entries)
        self.entries_dense += buffer.numel()
        self._step_entries[0] += int(sent_entries)
        self._step_entries[1] += buffer.numel()
        if bucket.is_last():
            sent, dense = self._step_entries
            self.last_step_density = sent / dense if dense else 1.0
            self._step_entries = [0, 0]
            self.steps += 1

    def current_density(self) -> float:
        """Fraction of gradient entries sent in the last completed step."""
        return self.last_step_density

    def stats(self) -> dict[str, float]:
        """This rank's totals since registration.

        Keys: ``bytes_sent`` (payload this rank put into the collectives),
        ``dense_bytes`` (what plain all-reduce sends: element size, 4 bytes for
        float32, per gradient entry), ``steps``, ``compression_ratio``
        (``dense_bytes / bytes_sent``; 0 before anything was sent),
        ``density`` (see :meth:`current_density`), ``entries_sent``,
        ``bytes_per_step`` and ``dense_bytes_per_step``.
        """
        steps = max(self.steps, 1)
        return {
            "bytes_sent": float(self.bytes_sent),
            "dense_bytes": float(self.dense_bytes),
            "steps": float(self.steps),
            "compression_ratio": self.dense_bytes / self.bytes_sent if self.bytes_sent else 0.0,
            "density": float(self.current_density()),
            "entries_sent": float(self.entries_sent),
            "bytes_per_step": self.bytes_sent / steps,
            "dense_bytes_per_step": self.dense_bytes / steps,
        }


def _check_ddp(ddp_model: Any, what: str) -> None:
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise SparseforgeError(
            f"{what} needs a torch.nn.parallel.DistributedDataParallel model, got {type(ddp_model).__name__}: "
            "wrap the model with DistributedDataParallel(model) first"
        )


def _world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


# -- plain all-reduce, counted ------------------------------------------------------------------


class AllReduceState(CommState):
    """State of :func:`register_allreduce_counter`: DDP's default averaging, counted."""


def _allreduce_counting_hook(state: AllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    state._record(bucket, sent_bytes=buffer.numel() * buffer.element_size(), sent_entries=buffer.numel())
    return default_hooks.allreduce_hook(state.process_group, bucket)


def register_allreduce_counter(ddp_model: nn.parallel.DistributedDataParallel,
                               process_group: dist.ProcessGroup | None = None) -> AllReduceState:
    """Register plain all-reduce averaging (DDP's default semantics, PyTorch's ``allreduce_hook``) with counters.

    The gradients are those DDP computes without a hook; ``stats()`` counts
    ``element size * numel`` bytes per bucket per step, the baseline that the
    compressed hooks are compared against.
    """
    _check_ddp(ddp_model, "register_allreduce_counter")
    state = AllReduceState(process_group)
    ddp_model.register_comm_hook(state, _allreduce_counting_hook)
    return state


# -- PowerSGD (PyTorch's hook), counted ---------------------------------------------------------


class PowerSGDCounterState(CommState):
    """State of :func:`register_powersgd`: PyTorch's ``PowerSGDState`` (``.powersgd``) plus counters.

    Bytes per bucket per step, from the bucket's tensor shapes and the rule
    PyTorch's hook applies: before ``start_powerSGD_iter`` the whole bucket is
    all-reduced; afterwards each gradient viewed as an ``n x m`` matrix
    (``m`` = product of the other dimensions) with ``r = min(n, m, rank)`` is
    compressed when ``(n + m) * r * min_compression_rate < n * m`` and then
    sends ``P`` (``n x r``) and ``Q`` (``m x r``); the others (biases, every
    rank-1 tensor, small matrices) are all-reduced whole.
    """

    def __init__(self, powersgd: Any, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group)
        self.powersgd = powersgd

    def payload_entries(self, bucket: Any) -> int:
        """Entries this rank all-reduces for ``bucket`` at PowerSGD's current iteration."""
        ps = self.powersgd
        if ps.iter < ps.start_powerSGD_iter:
            return bucket.buffer().numel()
        entries = 0
        for grad in bucket.gradients():
            n = grad.shape[0] if grad.dim() > 0 else 1
            m = grad.numel() // max(n, 1)
            r = min(n, m, ps.matrix_approximation_rank)
            if (n + m) * r * ps.min_compression_rate < n * m:
                entries += (n + m) * r
            else:
                entries += grad.numel()
        return entries


def _powersgd_counting_hook(state: PowerSGDCounterState,
                            bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    entries = state.payload_entries(bucket)  # before the hook advances PowerSGD's iteration
    state._record(bucket, sent_bytes=entries * bucket.buffer().element_size(), sent_entries=entries)
    fut = powerSGD_hook.powerSGD_hook(state.powersgd, bucket)
    # Wait for this bucket's chain (all-reduce uncompressed -> P -> Q) before DDP hands over the next
    # bucket: PowerSGD issues its P and Q all-reduces from callbacks, so with several buckets on gloo
    # the ranks could issue the collectives of different buckets in different orders (seen: gloo aborts
    # with "Received data size doesn't match expected size" at the first compressed step).
    fut.wait()
    return fut


def register_powersgd(ddp_model: nn.parallel.DistributedDataParallel, rank: int = 2,
                      start_powerSGD_iter: int = 1_000, process_group: dist.ProcessGroup | None = None,
                      **powersgd_options: Any) -> PowerSGDCounterState:
    """Register PyTorch's PowerSGD hook (Vogels et al., NeurIPS 2019) behind a byte-counting wrapper.

    Args:
        ddp_model: the DistributedDataParallel model.
        rank: ``matrix_approximation_rank`` (default 2).
        start_powerSGD_iter: plain all-reduce for the first steps (PyTorch's
            default 1000; its docs suggest about 10% of training). At least 2
            (error feedback and warm start need DDP's buckets rebuilt first).
        process_group: default the world.
        powersgd_options: passed to ``PowerSGDState`` (``min_compression_rate``
            default 2, ``use_error_feedback`` and ``warm_start`` default True,
            ``random_seed`` default 0, ...).

    Returns the state; its ``stats()`` follows :meth:`CommState.stats`. The
    wrapper waits for each bucket's PowerSGD future before returning, which
    keeps the ranks' collectives in the same order on gloo (see the code).
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    _check_ddp(ddp_model, "register_powersgd")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SparseforgeError(f"PowerSGD rank must be an integer >= 1, got {rank!r}")
    if isinstance(start_powerSGD_iter, bool) or not isinstance(start_powerSGD_iter, int) or start_powerSGD_iter < 2:
        raise SparseforgeError(f"start_powerSGD_iter must be an integer >= 2 (DDP rebuilds its buckets after the "
                               f"first step), got {start_powerSGD_iter!r}")
    try:
        ps = powerSGD_hook.PowerSGDState(process_group=process_group, matrix_approximation_rank=rank,
                                         start_powerSGD_iter=start_powerSGD_iter, **powersgd_options)
    except TypeError as exc:
        raise SparseforgeError(f"bad PowerSGD option: {exc}") from exc
    state = PowerSGDCounterState(ps, process_group)
    ddp_model.register_comm_hook(state, _powersgd_counting_hook)
    return state


# -- DGC ---------------------------------------------------------------------------------------------


class _Slot:
    """Momentum ``u`` and residual ``v`` of one bucket layout (parameters in DDP's bucket order)."""

    def __init__(self, params: list[torch.Tensor], buffer: torch.Tensor) -> None:
        self.ids = tuple(id(p) for p in params)
        self.u = torch.zeros_like(buffer)
        self.v = torch.zeros_like(buffer)
        self.spans: dict[int, tuple[int, int]] = {}
        start = 0
        for p in params:
            self.spans[id(p)] = (start, p.numel())
            start += p.numel()
        if start != buffer.numel():
            raise SparseforgeError(f"DDP bucket of {buffer.numel()} entries holds parameters of {start} entries: "
                                   "a bucket layout this hook does not know (padding?); please report it")

    def view(self, flat: torch.Tensor, pid: int) -> torch.Tensor:
        start, numel = self.spans[pid]
        return flat[start:start + numel]


class DGCState(CommState):
    """One rank's Deep Gradient Compression state (see the module docstring for the rule).

    Holds, per bucket, the momentum ``u`` and the accumulated residual ``v``
    (kept per parameter across DDP's bucket rebuild after the first step:
    DDP regroups parameters by the order their gradients became ready, so a
    bucket index may hold other parameters afterwards), the step counter
    (which drives the warm-up), the sampling generator and the byte counters
    of :class:`CommState`.

    Set ``keep_last = True`` to record, per bucket index, the last step's
    ``accumulated`` ``v`` before selection, the ``indices`` and ``values``
    sent, the ``residual`` after (clones) and the bucket's ``param_numels``
    (for tests and debugging).
    """

    def __init__(self, config: DGCConfig | None = None, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group)
        self.config = config if config is not None else DGCConfig()
        self.config.validate()
        self.generator = torch.Generator()
        self._param_index: dict[int, int] = {}  # id(param) -> its position in the model
        self._slots: dict[int, _Slot] = {}
        self._owner: dict[int, _Slot] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # restored u, v by id(param)
        self.step_offset = 0  # steps taken before a resume: the warm-up continues, the byte counters restart
        self.keep_last = False
        self.last: dict[int, dict[str, torch.Tensor]] = {}

    def current_density(self) -> float:
        """The density of the current step under the warm-up (:func:`warmup_density`)."""
        return warmup_density(self.step_offset + self.steps, self.config.density, self.config.warmup_steps)

    def state_dict(self, params: Sequence[torch.Tensor]) -> dict[str, Any]:
        """This rank's momentum ``u`` and residual ``v`` per parameter (in the order of ``params``), the
        step (warm-up position): what a resumed run needs to continue exactly.

        ``params`` are the model's parameters (``list(model.parameters())``), the
        same list on save and load, so the state does not depend on DDP's bucket layout.
        """
        return {
            "step": self.step_offset + self.steps,
            "rank": self.rank,
            "world_size": self.world_size,
            "u": [self.momentum(p).detach().clone().cpu() for p in params],
            "v": [self.residual(p).detach().clone().cpu() for p in params],
        }

    def load_state_dict(self, state: Mapping[str, Any], params: Sequence[torch.Tensor], *,
                        residuals: bool = True) -> None:
        """Continue from :meth:`state_dict`: the warm-up position always; with ``residuals``, also ``u``
        and ``v`` (only meaningful on the same rank of the same world size: each rank
        accumulates its own unsent gradient). Call before the first backward pass.
        """
        self.step_offset = int(state["step"])
        if not residuals:
            return
        if len(state["u"]) != len(params) or len(state["v"]) != len(params):
            raise SparseforgeError(f"the saved DGC state holds {len(state['u'])} parameters, the model {len(params)}: "
                                   "it comes from another model")
        for p, u, v in zip(params, state["u"], state["v"]):
            if u.shape != p.shape or v.shape != p.shape:
                raise SparseforgeError(f"the saved DGC state has a {tuple(u.shape)} entry for a {tuple(p.shape)} "
                                       "parameter: it comes from another model")
            self._pending[id(p)] = (u.to(p.device, p.dtype), v.to(p.device, p.dtype))

    def index_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Number the model's parameters (their order in ``model.parameters()``): the threshold sampling
        of each is seeded by its number, not by where DDP's buckets put it. :func:`register_dgc` calls it."""
        self._param_index = {id(p): i for i, p in enumerate(params)}

    def sampling_generator(self, param: torch.Tensor) -> torch.Generator:
        """The generator of ``param``'s threshold sample at the current step, seeded by (seed, rank, parameter, step)."""
        index = self._param_index.setdefault(id(param), len(self._param_index))
        step = self.step_offset + self.steps
        mixed = ((self.config.seed * 1_000_003 + self.rank) * 1_000_003 + index) * 1_000_003 + step
        return self.generator.manual_seed(mixed % (2**63 - 1))

    def slot(self, bucket: Any) -> _Slot:
        """The bucket's ``u``/``v`` storage, moved from the previous layout when DDP rebuilt its buckets."""
        params = list(bucket.parameters())
        index = bucket.index()
        slot = self._slots.get(index)
        if slot is not None and slot.ids == tuple(id(p) for p in params):
            return slot
        new = _Slot(params, bucket.buffer())
        for p in params:
            old = self._owner.get(id(p))
            if old is not None:  # this parameter's momentum and residual from its former bucket
                new.view(new.u, id(p)).copy_(old.view(old.u, id(p)))
                new.view(new.v, id(p)).copy_(old.view(old.v, id(p)))
            elif id(p) in self._pending:  # restored from a checkpoint (load_state_dict)
                u, v = self._pending.pop(id(p))
                new.view(new.u, id(p)).copy_(u.reshape(-1))
                new.view(new.v, id(p)).copy_(v.reshape(-1))
            self._owner[id(p)] = new
        self._slots[index] = new
        return new

    def residual(self, param: torch.Tensor) -> torch.Tensor:
        """The accumulated, not yet sent ``v`` of ``param`` (a view shaped like it; zeros before its first step)."""
        slot = self._owner.get(id(param))
        if slot is None:
            return self._pending[id(param)][1] if id(param) in self._pending else torch.zeros_like(param)
        return slot.view(slot.v, id(param)).view_as(param)

    def momentum(self, param: torch.Tensor) -> torch.Tensor:
        """The momentum-correction velocity ``u`` of ``param`` (a view shaped like it)."""
        slot = self._owner.get(id(param))
        if slot is None:
            return self._pending[id(param)][0] if id(param) in self._pending else torch.zeros_like(param)
        return slot.view(slot.u, id(param)).view_as(param)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise if ``optimizer`` would apply momentum or weight decay that this hook already applies."""
        for i, group in enumerate(optimizer.param_groups):
            if self.config.momentum > 0 and group.get("momentum", 0) not in (0, 0.0):
                raise SparseforgeError(
                    f"DGC applies momentum {self.config.momentum} itself (momentum correction), but the "
                    f"optimizer's param group {i} has momentum {group['momentum']}: create the optimizer with "
                    "momentum=0, or set DGCConfig.momentum=0")
            if self.config.weight_decay > 0 and group.get("weight_decay", 0) not in (0, 0.0):
                raise SparseforgeError(
                    f"DGC adds weight decay {self.config.weight_decay} to the gradient itself, but the optimizer's "
                    f"param group {i} has weight_decay {group['weight_decay']}: set one of them to 0")

    def select(self, v: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices (int64) of at most ``k`` entries of largest ``|v|`` (exactly ``k`` when exact or ``k >= numel``).

        ``generator`` draws the threshold sample (default: the state's generator as it is).
        """
        numel = v.numel()
        if k >= numel:
            return torch.arange(numel)
        magnitude = v.abs()
        samples = math.ceil(self.config.sample_fraction * numel)
        if self.config.exact_topk or samples >= numel:
            return torch.topk(magnitude, k, sorted=False).indices
        picks = torch.randint(numel, (samples,), generator=generator if generator is not None else self.generator)
        sample_k = min(samples, max(1, math.ceil(k * samples / numel)))
        threshold = torch.topk(magnitude[picks], sample_k, sorted=False).values.min()
        chosen = torch.nonzero(magnitude >= threshold).view(-1)
        if chosen.numel() > k:  # the estimate let too many through: exact top-k among the few selected
            chosen = chosen[torch.topk(magnitude[chosen], k, sorted=False).indices]
        return chosen


def _exchange(state: DGCState, values: torch.Tensor, indices: torch.Tensor,
              fixed_count: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """All-gather every rank's (values, int32 indices); return them and the bytes this rank sent."""
    count = indices.numel()
    if state.world_size == 1:
        return [(values, indices)], count * (values.element_size() + INDEX_BYTES)
    group = _world(state.process_group)
    # all_gather_single where torch has it (all_gather_into_tensor is deprecated there), same semantics.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    sent = 0
    if fixed_count:
        counts = [count] * state.world_size
    else:
        mine = torch.tensor([count], dtype=torch.int64)
        everyone = torch.empty(state.world_size, dtype=torch.int64)
        gather(everyone, mine, group=group)
        counts = everyone.tolist()
        sent += COUNT_BYTES
    width = max(counts)
    value_bytes = width * values.element_size()
    piece = torch.zeros(value_bytes + width * INDEX_BYTES, dtype=torch.uint8)
    piece[:count * values.element_size()] = values.contiguous().view(torch.uint8)
    piece[value_bytes:value_bytes + count * INDEX_BYTES] = indices.to(torch.int32).view(torch.uint8)
    gathered = torch.empty(state.world_size * piece.numel(), dtype=torch.uint8)
    gather(gathered, piece, group=group)
    sent += piece.numel()
    out = []
    for r, chunk in enumerate(gathered.view(state.world_size, -1)):
        vals = chunk[:value_bytes].view(values.dtype)[:counts[r]]
        idx = chunk[value_bytes:].view(torch.int32)[:counts[r]]
        out.append((vals, idx))
    return out, sent


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: Deep Gradient Compression of one bucket (Lin et al., ICLR 2018).

    Applies the module docstring's rule to ``bucket.buffer()`` (this rank's
    local gradient) and returns a completed Future holding the averaged
    sparse update, written into the bucket's buffer. Register it with
    :func:`register_dgc`, or ``ddp_model.register_comm_hook(DGCState(config), dgc_hook)``.
    """
    cfg = state.config
    buffer = bucket.buffer()
    if buffer.numel() >= 2**31:
        raise SparseforgeError(f"DDP bucket of {buffer.numel()} entries is too large for int32 indices: "
                               "pass a smaller bucket_cap_mb to DistributedDataParallel")
    slot = state.slot(bucket)
    g = buffer
    if cfg.weight_decay > 0:
        g = g + cfg.weight_decay * torch.cat([p.detach().reshape(-1) for p in bucket.parameters()])
    if cfg.clip_norm is not None:
        # Section 3.3: local clipping at the global threshold scaled by N^(-1/2).
        limit = cfg.clip_norm / math.sqrt(state.world_size)
        norm = torch.linalg.vector_norm(g)
        if norm > limit:
            g = g * (limit / (norm + 1e-6))
    u, v = slot.u, slot.v
    if cfg.nesterov:
        u.add_(g).mul_(cfg.momentum)
        v.add_(u).add_(g)
    else:
        u.mul_(cfg.momentum).add_(g)
        v.add_(u)
    density = state.current_density()
    accumulated = v.clone() if state.keep_last else None
    parts, k = [], 0
    for p in bucket.parameters():  # per parameter tensor: see step 3 of the module docstring
        start, numel = slot.spans[id(p)]
        k_p = min(numel, math.ceil(density * numel))
        parts.append(state.select(v[start:start + numel], k_p, state.sampling_generator(p)) + start)
        k += k_p
    indices = torch.cat(parts)
    values = v[indices]
    v[indices] = 0  # the residual keeps every entry that was not sent
    if cfg.momentum_masking:
        u[indices] = 0
    fixed = cfg.exact_topk or k >= buffer.numel()
    gathered, sent_bytes = _exchange(state, values, indices, fixed_count=fixed)
    out = torch.zeros_like(buffer)
    for vals, idx in gathered:
        out.index_add_(0, idx.long(), vals)
    if state.world_size > 1:
        out.div_(state.world_size)
    buffer.copy_(out)
    if state.keep_last:
        state.last[bucket.index()] = {"accumulated": accumulated, "indices": indices.clone(),
                                      "values": values.clone(), "residual": v.clone(),
                                      "param_numels": [p.numel() for p in bucket.parameters()]}
    state._record(bucket, sent_bytes=sent_bytes, sent_entries=indices.numel())
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def register_dgc(ddp_model: nn.parallel.DistributedDataParallel, config: DGCConfig | None = None,
                 process_group: dist.ProcessGroup | None = None) -> DGCState:
    """Register :func:`dgc_hook` on ``ddp_model`` with a fresh :class:`DGCState`; return the state.

    The optimizer must not apply the momentum (or weight decay) that the hook
    applies: use SGD with ``momentum=0`` when ``config.momentum > 0``
    (:meth:`DGCState.check_optimizer` checks it). Defaults: :class:`DGCConfig`'s
    (density 0.001, momentum 0.9, masking on, sampled threshold at 1%).
    """
    _check_ddp(ddp_model, "register_dgc")
    if not (dist.is_available() and dist.is_initialized()):
        raise SparseforgeError("register_dgc needs torch.distributed: call init_process_group() first")
    state = DGCState(config, process_group)
    state.index_parameters(ddp_model.module.parameters())
    ddp_model.register_comm_hook(state, dgc_hook)
    return state
