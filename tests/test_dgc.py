"""Deep Gradient Compression as a DDP communication hook (sparseforge.distributed.dgc).

The DDP scenarios share one spawn of two gloo processes on CPU (the harness of
tests/ddp_harness.py: FileStore, loopback, one thread each, timeouts).
Single-process tests call the hook directly on stand-in buckets (no process
group: one rank, no collectives).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparseforge as sf
from sparseforge.distributed import (
    DGCConfig,
    DGCState,
    dgc_hook,
    register_allreduce_counter,
    register_dgc,
    register_powersgd,
    warmup_density,
)

from ddp_harness import WORLD, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 8
LR = 0.1


# -- single process: stand-in buckets --------------------------------------------------------------


class FakeBucket:
    """What the hook reads from a ``torch.distributed.GradBucket``: the flat buffer of its parameters' grads."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], index: int = 0, last: bool = True):
        self._params, self._index, self._last = params, index, last
        self._buffer = torch.cat([g.reshape(-1) for g in grads])

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self._params:
            out.append(self._buffer[start:start + p.numel()].view_as(p))
            start += p.numel()
        return out


def _bucket(numel: int, seed: int, index: int = 0) -> tuple[FakeBucket, torch.Tensor]:
    param = torch.zeros(numel)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    return FakeBucket([param], [grad], index=index), grad.clone()


def test_warmup_follows_the_paper_schedule():
    epoch = 50
    # Paper: sparsity 75%, 93.75%, 98.4375%, 99.6% in epochs 1-4, then 99.9%.
    got = [warmup_density(e * epoch + j, 0.001, 4 * epoch) for e in range(6) for j in (0, epoch - 1)]
    assert got == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625, 0.00390625] + [0.001] * 4
    # Density 1%: stages 1/4, 1/16, 1/64 (all above 1%) share the warm-up; never below the target.
    schedule = [warmup_density(s, 0.01, 30) for s in range(40)]
    assert sorted(set(schedule), reverse=True) == [0.25, 0.0625, 0.015625, 0.01]
    assert all(a >= b for a, b in zip(schedule, schedule[1:])) and schedule[29] > 0.01 == schedule[30]
    assert [schedule.count(d) for d in (0.25, 0.0625, 0.015625)] == [10, 10, 10]
    assert warmup_density(0, 0.3, 100) == 0.3 and warmup_density(0, 0.001, 0) == 0.001


@pytest.mark.parametrize("settings, message", [
    ({"density": 0.0}, "density must be in"),
    ({"density": 1.5}, "density must be in"),
    ({"density": float("nan")}, "finite number"),
    ({"momentum": -0.1}, "momentum must be in"),
    ({"momentum": 1.0}, "momentum must be in"),
    ({"momentum": 0.0, "nesterov": True}, "nesterov needs momentum"),
    ({"clip_norm": 0.0}, "clip_norm must be > 0"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"warmup_steps": 2.5}, "must be an integer"),
    ({"sample_fraction": 0.0}, "sample_fraction must be in"),
    ({"exact_topk": "yes"}, "true or false"),
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
])
def test_config_validation(settings, message):
    with pytest.raises(sf.SparseforgeError, match=message):
        DGCConfig(**settings).validate()
    with pytest.raises(sf.SparseforgeError, match=message):
        DGCState(DGCConfig(**settings))


def test_config_from_dict_names_unknown_settings():
    with pytest.raises(sf.SparseforgeError, match=r"unknown DGC setting\(s\) \['densty'\]"):
        DGCConfig.from_dict({"densty": 0.01})
    assert DGCConfig.from_dict({"density": 0.01, "nesterov": True}) == DGCConfig(density=0.01, nesterov=True)


def test_registration_needs_ddp_and_optimizer_check():
    with pytest.raises(sf.SparseforgeError, match="DistributedDataParallel"):
        register_dgc(nn.Linear(2, 2))
    with pytest.raises(sf.SparseforgeError, match="DistributedDataParallel"):
        register_powersgd(nn.Linear(2, 2))
    model = nn.Linear(2, 2)
    state = DGCState(DGCConfig(momentum=0.9, weight_decay=1e-4))
    with pytest.raises(sf.SparseforgeError, match="momentum=0"):
        state.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(sf.SparseforgeError, match="weight_decay"):
        state.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    state.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("exact", [True, False])
def test_sent_count_and_bytes_follow_the_density(exact):
    numel, density = 20_000, 0.01
    k = math.ceil(density * numel)
    state = DGCState(DGCConfig(density=density, momentum=0.9, exact_topk=exact, sample_fraction=0.02))
    counts = []
    for step in range(20):
        bucket, _ = _bucket(numel, seed=step)
        dgc_hook(state, bucket).wait()
        sent = torch.count_nonzero(bucket.buffer()).item()
        counts.append(sent)
        if exact:
            assert sent == k
        else:  # the sampled threshold sends at most k (refined), and not far fewer
            assert 0 < sent <= k
    assert sum(counts) / len(counts) >= (k if exact else 0.5 * k)
    stats = state.stats()
    assert stats["steps"] == 20 and stats["entries_sent"] == sum(counts)
    # One rank: 4 bytes per float32 value + 4 per int32 index, nothing else; dense is 4 per entry.
    assert stats["bytes_sent"] == 8 * sum(counts) and stats["dense_bytes"] == 4 * numel * 20
    assert stats["compression_ratio"] == pytest.approx(4 * numel * 20 / (8 * sum(counts)))
    if exact:
        assert stats["compression_ratio"] == pytest.approx(1 / (2 * density))


def test_selection_takes_the_largest_entries_and_conserves_the_mass():
    state = DGCState(DGCConfig(density=0.05, momentum=0.9, exact_topk=True))
    state.keep_last = True
    for step in range(5):
        bucket, _ = _bucket(1000, seed=step)
        dgc_hook(state, bucket).wait()
        last = state.last[0]
        # sent + residual == accumulated, entry for entry (nothing lost, nothing doubled)
        rebuilt = last["residual"].clone()
        rebuilt[last["indices"]] += last["values"]
        assert torch.equal(rebuilt, last["accumulated"])
        # the sent entries are the k largest |v|
        smallest_sent = last["accumulated"][last["indices"]].abs().min()
        assert last["residual"].abs().max() <= smallest_sent
        assert torch.equal(bucket.buffer()[last["indices"]], last["values"])


def test_momentum_zero_conserves_the_gradient_over_steps():
    state = DGCState(DGCConfig(density=0.02, momentum=0.0, sample_fraction=0.05))
    param = torch.zeros(5000)
    total_g, total_sent = torch.zeros(5000), torch.zeros(5000)
    for step in range(30):
        bucket, grad = _bucket(5000, seed=step)
        bucket._params = [param]
        dgc_hook(state, bucket).wait()
        total_g += grad
        total_sent += bucket.buffer()
    assert torch.allclose(total_sent + state.residual(param), total_g, atol=1e-5)


def test_local_clipping_bounds_the_gradient_norm():
    state = DGCState(DGCConfig(density=1.0, momentum=0.0, clip_norm=2.0))
    bucket, grad = _bucket(500, seed=3)
    big = grad * (10.0 / grad.norm())
    bucket._buffer = big.clone()
    dgc_hook(state, bucket).wait()
    # one rank: the threshold is clip_norm / sqrt(1); the direction is kept
    assert bucket.buffer().norm().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(bucket.buffer(), big * (2.0 / big.norm()), atol=1e-6)
    small, _ = _bucket(500, seed=4)
    before = small.buffer() * (1.0 / small.buffer().norm())
    small._buffer = before.clone()
    dgc_hook(state, small).wait()
    assert torch.equal(small.buffer(), before)  # below the threshold: untouched


def test_state_follows_parameters_when_ddp_rebuilds_its_buckets():
    a, b = torch.zeros(6), torch.zeros(4)
    state = DGCState(DGCConfig(density=0.2, momentum=0.5, exact_topk=True))
    ga = torch.linspace(-1, 1, 6)
    gb = torch.tensor([0.5, -0.25, 2.0, 0.1])
    dgc_hook(state, FakeBucket([a, b], [ga, gb])).wait()  # one bucket [a, b]
    before = {"ra": state.residual(a).clone(), "rb": state.residual(b).clone(),
              "ua": state.momentum(a).clone(), "ub": state.momentum(b).clone()}
    # per parameter: ceil(0.2 * 6) + ceil(0.2 * 4) = 3 entries sent, the other 7 wait
    assert torch.count_nonzero(before["ra"]) + torch.count_nonzero(before["rb"]) == 10 - 3
    # DDP's rebuild: now b alone in bucket 0 and a in bucket 1 (reverse order, as DDP does).
    zeros_b, zeros_a = torch.zeros(4), torch.zeros(6)
    state.keep_last = True
    dgc_hook(state, FakeBucket([b], [zeros_b], index=0, last=False)).wait()
    dgc_hook(state, FakeBucket([a], [zeros_a], index=1, last=True)).wait()
    # With zero gradients: u = m * u, v = v + u; what was accumulated is the old state carried over.
    assert torch.equal(state.last[0]["accumulated"], before["rb"] + 0.5 * before["ub"])
    assert torch.equal(state.last[1]["accumulated"], before["ra"] + 0.5 * before["ua"])


# -- two gloo ranks: the scenarios -------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _ddp(model: nn.Module) -> DistributedDataParallel:
    # Small buckets: several per step, and DDP regroups them after the first step.
    return DistributedDataParallel(model, bucket_cap_mb=0.01)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)  # every rank has its own data
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :4].argmax(1)


def _step(ddp: nn.Module, opt: torch.optim.Optimizer | None, rank: int, step: int) -> list[torch.Tensor]:
    x, y = _batch(rank, step)
    ddp.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(ddp(x), y).backward()
    grads = [p.grad.clone() for p in ddp.module.parameters()]
    if opt is not None:
        opt.step()
    return grads


def _pair(hook, opt_ref: dict[str, Any], opt_hook: dict[str, Any], rank: int,
          steps: int = STEPS) -> dict[str, Any]:
    """Train a default-DDP model and a hooked one from the same weights on the same batches."""
    ref_model, hook_model = _mlp(), _mlp()
    ref, hooked = _ddp(ref_model), _ddp(hook_model)
    state = hook(hooked)
    o_ref = torch.optim.SGD(ref_model.parameters(), lr=LR, **opt_ref)
    o_hook = torch.optim.SGD(hook_model.parameters(), lr=LR, **opt_hook)
    grads_equal, max_diff = True, 0.0
    for step in range(steps):
        g_ref, g_hook = _step(ref, o_ref, rank, step), _step(hooked, o_hook, rank, step)
        grads_equal &= all(torch.equal(a, b) for a, b in zip(g_ref, g_hook))
    for a, b in zip(ref_model.parameters(), hook_model.parameters()):
        max_diff = max(max_diff, (a - b).abs().max().item())
    moved = max((a - b).abs().max().item() for a, b in zip(ref_model.parameters(), _mlp().parameters()))
    return {"grads_equal": grads_equal, "max_weight_diff": max_diff, "moved": moved,
            "stats": state.stats() if state is not None else None}


def _digest(model: nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def dgc_spawn(rank: int, out: Path) -> dict[str, Any]:
    torch.manual_seed(rank)
    r: dict[str, Any] = {}
    dense = {"density": 1.0, "momentum": 0.0}
    # 1. density 1, momentum 0: exactly plain all-reduce (both selection paths).
    r["plain_sampled"] = _pair(lambda m: register_dgc(m, DGCConfig(**dense)), {}, {}, rank)
    r["plain_exact"] = _pair(lambda m: register_dgc(m, DGCConfig(**dense, exact_topk=True)), {}, {}, rank)
    r["allreduce_counter"] = _pair(register_allreduce_counter, {}, {}, rank)
    # 2. density 1, momentum correction without masking: the trajectory of SGD with momentum (and weight decay).
    for nesterov in (False, True):
        cfg = DGCConfig(density=1.0, momentum=0.9, nesterov=nesterov, momentum_masking=False, weight_decay=5e-4)
        r[f"momentum_nesterov={nesterov}"] = _pair(
            lambda m, cfg=cfg: register_dgc(m, cfg),
            {"momentum": 0.9, "nesterov": nesterov, "weight_decay": 5e-4}, {}, rank, steps=12)
    # 3. with the paper's momentum factor masking, density 1 clears u every step: SGD without momentum.
    r["masked"] = _pair(lambda m: register_dgc(m, DGCConfig(density=1.0, momentum=0.9)), {}, {}, rank)

    # 4. sparse: every rank ends with the same weights; sent + residual == accumulated; counts per bucket.
    for name, cfg in (("sparse_sampled", DGCConfig(density=0.05, sample_fraction=0.05)),
                      ("sparse_exact", DGCConfig(density=0.05, exact_topk=True))):
        model = _mlp()
        ddp = _ddp(model)
        state = register_dgc(ddp, cfg)
        state.keep_last = True
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        state.check_optimizer(opt)
        counts, numels, conserved = [], [], True
        for step in range(STEPS):
            _step(ddp, opt, rank, step)
            counts.append([state.last[i]["indices"].numel() for i in sorted(state.last)])
            numels.append([state.last[i]["param_numels"] for i in sorted(state.last)])
            for last in state.last.values():
                rebuilt = last["residual"].clone()
                rebuilt[last["indices"]] += last["values"]
                conserved &= torch.equal(rebuilt, last["accumulated"])
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, _digest(model))
        r[name] = {"counts": counts, "numels": numels, "conserved": conserved, "stats": state.stats(),
                   "same_weights": gathered[0] == gathered[1]}

    # 5. conservation through the collective: momentum 0, weights frozen (no optimizer): N * sum of the
    # averaged sparse updates + every rank's residual == N * sum of the all-reduce means.
    ref, hooked = _ddp(_mlp()), _ddp(_mlp())
    state = register_dgc(hooked, DGCConfig(density=0.02, momentum=0.0))
    sums_ref = [torch.zeros_like(p) for p in ref.parameters()]
    sums_dgc = [torch.zeros_like(p) for p in ref.parameters()]
    for step in range(STEPS):
        for s, g in zip(sums_ref, _step(ref, None, rank, step)):
            s += g
        for s, g in zip(sums_dgc, _step(hooked, None, rank, step)):
            s += g
    residuals = [state.residual(p).clone() for p in hooked.module.parameters()]
    for t in residuals:
        dist.all_reduce(t)
    r["conservation_max_err"] = max((WORLD * d + res - WORLD * s).abs().max().item()
                                    for d, res, s in zip(sums_dgc, residuals, sums_ref))
    r["conservation_scale"] = max(s.abs().max().item() for s in sums_ref)

    # 6. PowerSGD through PyTorch's hook, counted.
    model = _mlp()
    ddp = _ddp(model)
    ps = register_powersgd(ddp, rank=2, start_powerSGD_iter=3)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        _step(ddp, opt, rank, step)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, _digest(model))
    numel = sum(p.numel() for p in model.parameters())
    r["powersgd"] = {"stats": ps.stats(), "numel": numel, "same_weights": gathered[0] == gathered[1],
                     "torch_after": ps.powersgd.total_numel_after_compression,
                     "torch_before": ps.powersgd.total_numel_before_compression,
                     "shapes": [list(p.shape) for p in model.parameters()]}
    return r


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(dgc_spawn, tmp_path_factory.mktemp("dgc"))


def test_density_one_equals_plain_allreduce_exactly(ranks):
    # Each entry is 0 + a + b then halved; all-reduce gives a + b halved: the same floats with two ranks.
    for r in ranks:
        for name in ("plain_sampled", "plain_exact", "allreduce_counter"):
            assert r[name]["grads_equal"], name
            assert r[name]["max_weight_diff"] == 0.0 and r[name]["moved"] > 1e-3, name


def test_density_one_momentum_correction_follows_momentum_sgd(ranks):
    for r in ranks:
        for nesterov in (False, True):
            run = r[f"momentum_nesterov={nesterov}"]
            assert run["max_weight_diff"] < 1e-5 < run["moved"], run
        # With masking, no momentum is left at density 1: DGC + SGD equals plain SGD without momentum.
        assert r["masked"]["max_weight_diff"] < 1e-6 and r["masked"]["grads_equal"]


def test_sparse_updates_keep_ranks_identical_and_conserve_the_residual(ranks):
    for name in ("sparse_sampled", "sparse_exact"):
        for r in ranks:
            assert r[name]["same_weights"] and r[name]["conserved"], name
    for r in ranks:
        assert r["conservation_max_err"] < 1e-5 * max(1.0, r["conservation_scale"])


def test_sent_counts_per_bucket(ranks):
    for r in ranks:
        exact, sampled = r["sparse_exact"], r["sparse_sampled"]
        assert len(exact["numels"][-1]) >= 2, "the test model should span several buckets"
        # k = ceil(density * numel) per parameter tensor, summed over the bucket's parameters
        for counts, numels in zip(exact["counts"], exact["numels"]):
            assert counts == [sum(math.ceil(0.05 * n) for n in bucket) for bucket in numels]
        ks = [sum(math.ceil(0.05 * n) for n in bucket) for step in sampled["numels"] for bucket in step]
        sent = [c for step in sampled["counts"] for c in step]
        assert all(0 <= c <= k for c, k in zip(sent, ks))
        assert sum(sent) >= 0.4 * sum(ks)


def test_bytes_accounting(ranks):
    r0, r1 = ranks
    total = sum(sum(bucket) for bucket in r0["sparse_exact"]["numels"][0])
    for r in ranks:
        s = r["sparse_exact"]["stats"]
        assert s["dense_bytes"] == 4 * total * STEPS and s["steps"] == STEPS
        # exact top-k: 4-byte value + 4-byte index per sent entry, no counts
        assert s["bytes_sent"] == 8 * sum(sum(c) for c in r["sparse_exact"]["counts"])
        assert s["compression_ratio"] == pytest.approx(1 / (2 * 0.05), rel=0.02)
        # density 1: the sparse format costs twice all-reduce's 4 bytes per entry
        assert r["plain_exact"]["stats"]["compression_ratio"] == 0.5
        assert r["allreduce_counter"]["stats"]["compression_ratio"] == 1.0
    # sampled: every rank sends the largest count of the two (padding) + an 8-byte count per bucket
    padded = sum(max(a, b) for s0, s1 in zip(r0["sparse_sampled"]["counts"], r1["sparse_sampled"]["counts"])
                 for a, b in zip(s0, s1))
    buckets = sum(len(step) for step in r0["sparse_sampled"]["counts"])
    for r in ranks:
        assert r["sparse_sampled"]["stats"]["bytes_sent"] == 8 * padded + 8 * buckets


def test_powersgd_counts_what_pytorch_sends(ranks):
    for r in ranks:
        ps = r["powersgd"]
        assert ps["same_weights"]
        s = ps["stats"]
        # 3 all-reduce steps, then PyTorch's own count of the entries it compressed into
        assert s["entries_sent"] == 3 * ps["numel"] + ps["torch_after"]
        assert ps["torch_before"] == (STEPS - 3) * ps["numel"]
        # rank 2 of [64, 16], [64, 64], [4, 64]: (64+16)*2, (64+64)*2, biases and the 4x64 layer whole
        compressed = (64 + 16) * 2 + 64 + (64 + 64) * 2 + 64 + 4 * 64 + 4
        assert ps["torch_after"] == (STEPS - 3) * compressed
        assert s["bytes_sent"] == 4 * s["entries_sent"] and s["dense_bytes"] == 4 * STEPS * ps["numel"]
