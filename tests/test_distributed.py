"""The Sparsifier under torch.distributed DDP: two processes, gloo backend, CPU.

Workers come from tests/ddp_harness.py (spawned processes, FileStore,
loopback, one thread each, timeouts); they return results as JSON.

Each spawn costs a few seconds (two fresh interpreters importing torch), so
the scenarios share two spawns through module-scoped fixtures.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparseforge as sf
from sparseforge.distributed import broadcast_masks, check_masks_identical, mask_digest
from sparseforge.files import atomic_path

from ddp_harness import WORLD, spawn

STEPS = 40
HALF = 20
FREQUENCY = 5
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_rigl.py"
EXAMPLE_ARGS = ["--synthetic", "--steps", "30", "--frequency", "5", "--limit-train", "1024"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# -- what the workers train -------------------------------------------------------------


def _methods(name: str, rank: int) -> sf.Method:
    if name == "rigl":
        return sf.methods.RigL(0.8, frequency=FREQUENCY)
    if name == "set":
        # A different seed on each rank on purpose: the sync, not luck, must make the masks agree.
        return sf.methods.SET(0.8, frequency=FREQUENCY, seed=10 * rank)
    if name == "granet":
        return sf.methods.GraNet(0.8, frequency=FREQUENCY)
    raise ValueError(name)


def _build(name: str, rank: int, *, optimizer: bool = True, sync: bool | None = None, momentum: float = 0.9):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    sp = sf.Sparsifier(model, _methods(name, rank), total_steps=STEPS, optimizer=opt if optimizer else None,
                       sync_masks=sync)
    ddp = DistributedDataParallel(model)
    torch.manual_seed(100 + rank)  # dropout differs across ranks, as in any DDP run
    data = torch.Generator().manual_seed(1000 + rank)  # and so does the data
    return model, opt, sp, ddp, data


def _train_step(ddp: nn.Module, opt: torch.optim.Optimizer, sp: sf.Sparsifier, data: torch.Generator) -> None:
    x = torch.randn(32, 16, generator=data)
    loss = nn.functional.cross_entropy(ddp(x), x[:, :4].argmax(1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sp.step()


def _weights_digest(model: nn.Module, values: bool = False) -> str:
    """SHA-256 of the state dict's bits; with ``values``, of its values (-0.0 counted as 0.0)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        t = t.detach() + 0.0 if values else t.detach()  # -0.0 + 0.0 is +0.0
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def _train(name: str, rank: int, **build: Any) -> dict[str, Any]:
    """STEPS steps; every rank's mask digest after the initial mask and after every update."""
    model, opt, sp, ddp, data = _build(name, rank, **build)
    updates = [_gather(mask_digest(sp))]
    for _ in range(STEPS):
        _train_step(ddp, opt, sp, data)
        if sp.schedule.should_update(sp.current_step):
            updates.append(_gather(mask_digest(sp)))  # right after the update, before DDP's next forward
    return {"updates": updates, "weights": _gather(_weights_digest(model)),
            "values": _weights_digest(model, values=True), "sparsity": sp.sparsity()}


def scenarios(rank: int, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in ("rigl", "set", "granet"):
        results[name] = _train(name, rank)
    # Without momentum, so that the two paths differ only in how the gradient is captured
    # (without an optimizer, pruned weights' momentum cannot be reset at updates).
    results["rigl_sgd"] = _train("rigl", rank, momentum=0.0)
    results["rigl_no_optimizer"] = _train("rigl", rank, optimizer=False, momentum=0.0)
    # Controls without the sync: what DDP alone gives.
    results["rigl_unsynced"] = _train("rigl", rank, sync=False)
    results["rigl_no_optimizer_unsynced"] = _train("rigl", rank, optimizer=False, sync=False, momentum=0.0)
    results["set_unsynced"] = _train("set", rank, sync=False)

    # One rank's mask changed by hand is detected, by every rank, even after a DDP forward.
    model, opt, sp, ddp, data = _build("rigl", rank)
    for _ in range(7):
        _train_step(ddp, opt, sp, data)
    check_masks_identical(sp)
    if rank == 1:
        mask = model[0].weight_mask
        mask.view(-1)[0] = 1.0 - mask.view(-1)[0]
    ddp(torch.randn(4, 16))
    try:
        check_masks_identical(sp)
        results["tamper"] = {"raised": False, "message": ""}
    except sf.SparseforgeError as exc:
        results["tamper"] = {"raised": True, "message": str(exc)}
    broadcast_masks(sp)
    results["tamper"]["repaired"] = check_masks_identical(sp) == mask_digest(sp)
    # Built after init_process_group, the Sparsifier kept its masks out of DDP's
    # per-forward buffer broadcast (else the forward above would have overwritten
    # rank 1's change); finalize() hands them back.
    results["ddp_ignore"] = {"during": list(model._ddp_params_and_buffers_to_ignore)}
    sp.finalize()
    results["ddp_ignore"]["after_finalize"] = hasattr(model, "_ddp_params_and_buffers_to_ignore")

    # Ranks that do not hold the same layers, or are at different steps, all get a clear error.
    try:
        sf.Sparsifier(nn.Linear(4, 4 + rank), sf.methods.RigL(0.5, frequency=FREQUENCY), total_steps=STEPS)
        results["layout"] = ""
    except sf.SparseforgeError as exc:
        results["layout"] = str(exc)
    model, opt, sp, ddp, data = _build("rigl", rank)
    sp._step += rank
    try:
        broadcast_masks(sp)
        results["steps"] = ""
    except sf.SparseforgeError as exc:
        results["steps"] = str(exc)

    # A Sparsifier on the DDP wrapper is refused with a message saying what to do.
    wrapped = DistributedDataParallel(nn.Linear(4, 4))
    try:
        sf.Sparsifier(wrapped, sf.methods.RigL(0.5, frequency=FREQUENCY), total_steps=STEPS)
        results["wrapper"] = ""
    except sf.SparseforgeError as exc:
        results["wrapper"] = str(exc)
    return results


def _checkpoint(path: Path, model, opt, sp, data, step: int) -> None:
    """Rank 0 writes model, optimizer, Sparsifier and every rank's RNG states in one atomic file."""
    rngs = _gather({"torch": torch.get_rng_state(), "data": data.get_state()})
    if dist.get_rank() == 0:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": sp.state_dict(),
                 "rng": rngs, "step": step}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    dist.barrier()


def _load_example():
    spec = importlib.util.spec_from_file_location("ddp_rigl_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resume_first(rank: int, out: Path) -> dict[str, Any]:
    """Uninterrupted runs, then fresh runs stopped and checkpointed halfway."""
    results: dict[str, Any] = {}
    for name in ("rigl", "set", "granet"):
        model, opt, sp, ddp, data = _build(name, rank)
        for _ in range(STEPS):
            _train_step(ddp, opt, sp, data)
        full = {"weights": _weights_digest(model), "masks": mask_digest(sp)}
        model, opt, sp, ddp, data = _build(name, rank)
        for _ in range(HALF):
            _train_step(ddp, opt, sp, data)
        _checkpoint(out / f"{name}.pt", model, opt, sp, data, HALF)
        results[name] = full
    example = _load_example()
    results["example"] = example.main(EXAMPLE_ARGS)
    results["example_first_half"] = example.main(
        EXAMPLE_ARGS + ["--stop-after", "15", "--checkpoint", str(out / "example.pt")]
    )
    return results


def resume_second(rank: int, out: Path, first: str) -> dict[str, Any]:
    """Fresh processes and objects: load the halfway checkpoints and finish the runs."""
    results: dict[str, Any] = {}
    for name in ("rigl", "set", "granet"):
        model, opt, sp, ddp, data = _build(name, rank)
        state = torch.load(Path(first) / f"{name}.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sp.load_state_dict(state["sparsifier"])
        torch.set_rng_state(state["rng"][rank]["torch"])
        data.set_state(state["rng"][rank]["data"])
        check_masks_identical(sp)
        for _ in range(state["step"], STEPS):
            _train_step(ddp, opt, sp, data)
        results[name] = {"weights": _weights_digest(model), "masks": mask_digest(sp)}
    results["example"] = _load_example().main(EXAMPLE_ARGS + ["--resume", str(Path(first) / "example.pt")])
    return results


# -- fixtures: one spawn each -------------------------------------------------------------


def first_spawn(rank: int, out: Path) -> dict[str, Any]:
    """Everything that can share the first pair of processes (each spawn costs seconds:
    two interpreters importing torch, and DDP's first construction imports torch._dynamo)."""
    return {"scenarios": scenarios(rank, out), "resume": resume_first(rank, out)}


@pytest.fixture(scope="module")
def ddp_first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp_first")
    return out, spawn(first_spawn, out)


@pytest.fixture(scope="module")
def ddp_scenarios(ddp_first) -> dict[str, Any]:
    _, ranks = ddp_first
    return ranks[0]["scenarios"] | {"rank1": ranks[1]["scenarios"]}


@pytest.fixture(scope="module")
def ddp_resume(ddp_first, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    first_dir, ranks = ddp_first
    second = spawn(resume_second, tmp_path_factory.mktemp("ddp_resume"), first=str(first_dir))
    return [r["resume"] for r in ranks], second


# -- tests ----------------------------------------------------------------------------------


def _all_equal(pairs: list[list[str]]) -> bool:
    return all(len(set(p)) == 1 for p in pairs)


@pytest.mark.parametrize("name", ["rigl", "set", "granet", "rigl_no_optimizer"])
def test_masks_identical_on_every_rank_after_every_update(ddp_scenarios, name):
    run = ddp_scenarios[name]
    # initial mask + updates at 5, 10, ..., 30 (RigL, GraNet: end = 0.75) or 40 (SET: end = 1.0)
    assert len(run["updates"]) >= 7
    assert _all_equal(run["updates"]), run["updates"]
    assert len({p[0] for p in run["updates"]}) >= 4, "the masks should change over the run"
    assert len(set(run["weights"])) == 1, "weights differ across ranks"
    assert run["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_without_optimizer_regrowth_reads_the_averaged_gradient(ddp_scenarios):
    # The per-weight hooks see each rank's own gradient; the Sparsifier averages them,
    # so the decisions equal those made from DDP's averaged gradient in the optimizer path.
    assert ddp_scenarios["rigl_no_optimizer"]["updates"] == ddp_scenarios["rigl_sgd"]["updates"]
    # Equal values; the signs of zeros may differ (masks multiply at other points).
    assert ddp_scenarios["rigl_no_optimizer"]["values"] == ddp_scenarios["rigl_sgd"]["values"]


def test_controls_without_sync(ddp_scenarios):
    # Same seeds and an optimizer: DDP's averaged gradients make every rank decide alike.
    assert _all_equal(ddp_scenarios["rigl_unsynced"]["updates"])
    assert ddp_scenarios["rigl_unsynced"]["updates"] == ddp_scenarios["rigl"]["updates"]
    # Without an optimizer each rank regrows by its own gradient; with different seeds,
    # each rank draws its own random mask: the masks diverge unless synced.
    assert not _all_equal(ddp_scenarios["rigl_no_optimizer_unsynced"]["updates"])
    assert not _all_equal(ddp_scenarios["set_unsynced"]["updates"])


def test_check_masks_identical_names_the_rank_that_differs(ddp_scenarios):
    for result in (ddp_scenarios["tamper"], ddp_scenarios["rank1"]["tamper"]):
        assert result["raised"], "every rank must raise, so that none waits in a later collective"
        assert "rank(s) [1]" in result["message"] and "rank 0" in result["message"]
        assert result["repaired"]


def test_ranks_with_other_layers_or_steps_get_a_clear_error(ddp_scenarios):
    for result in (ddp_scenarios, ddp_scenarios["rank1"]):
        assert "rank(s) [1] sparsify other layers" in result["layout"]
        assert "different steps ({0: 0, 1: 1})" in result["steps"]


def test_sparsifier_on_the_ddp_wrapper_is_refused(ddp_scenarios):
    assert "inner module" in ddp_scenarios["wrapper"]
    assert "before wrapping" in ddp_scenarios["wrapper"]


@pytest.mark.parametrize("name", ["rigl", "set", "granet"])
def test_resumed_ddp_run_equals_uninterrupted(ddp_resume, name):
    first, second = ddp_resume
    for rank in range(WORLD):
        assert second[rank][name] == first[rank][name], f"rank {rank}: resumed run differs"
    assert first[0][name] == first[1][name]


def test_example_runs_under_ddp_and_resumes(ddp_resume):
    first, second = ddp_resume
    full = [first[r]["example"] for r in range(WORLD)]
    assert full[0]["mask_digest"] == full[1]["mask_digest"]
    assert full[0]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert full[0]["step"] == 30
    for rank in range(WORLD):
        resumed = second[rank]["example"]
        # Each rank's loss is on its own batch; they must match the uninterrupted run's exactly.
        assert resumed == full[rank]


# -- single-process behaviour (no process group) ------------------------------------------


def test_masks_are_excluded_from_ddp_buffer_sync_until_finalize(ddp_scenarios):
    # MLP layers "0", "3", "5" (a Dropout at 2)
    assert ddp_scenarios["ddp_ignore"]["during"] == ["0.weight_mask", "3.weight_mask", "5.weight_mask"]
    assert not ddp_scenarios["ddp_ignore"]["after_finalize"]


def test_sync_masks_argument():
    model = nn.Linear(4, 4)
    with pytest.raises(sf.SparseforgeError, match="sync_masks must be"):
        sf.Sparsifier(model, sf.methods.GMP(0.5, frequency=1, end=2), total_steps=4, sync_masks="yes")
    with pytest.raises(sf.SparseforgeError, match="init_process_group"):
        sf.Sparsifier(model, sf.methods.GMP(0.5, frequency=1, end=2), total_steps=4, sync_masks=True)
    assert not hasattr(model, "weight_mask"), "a failed construction leaves the model clean"
    sp = sf.Sparsifier(model, sf.methods.RigL(0.5, frequency=1), total_steps=4)
    # Without a process group nothing is synced, and DDP would keep its default buffer broadcast.
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    assert check_masks_identical(sp) == mask_digest(sp)  # no process group: just the digest


def test_dataparallel_wrapper_is_refused():
    with pytest.raises(sf.SparseforgeError, match="inner module"):
        sf.Sparsifier(nn.DataParallel(nn.Linear(4, 4)), sf.methods.GMP(0.5), total_steps=4)


def test_mask_digest_tracks_every_mask():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    sp = sf.Sparsifier(model, sf.methods.GMP(0.5, frequency=1, end=2), total_steps=4)
    before = mask_digest(sp)
    assert mask_digest(sp) == before and len(before) == 64
    model[1].weight_mask[0, 0] = 0.0
    assert mask_digest(sp) != before
