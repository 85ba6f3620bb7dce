"""``sparseforge.fit``: the one training loop, and the callbacks that attach to it.

The properties checked: fit's step is the hand-written step (same weights bit for
bit), hooks run in their documented order, a run started at step k or resumed
from a checkpoint ends exactly where the uninterrupted run does, L-BFGS gets its
closure, an error reaches every callback, and DDP with a comm hook in a
one-process group trains the same weights as plain fit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sparseforge as sf
from sparseforge.distributed.dgc import register_allreduce_counter
from sparseforge.errors import SparseforgeError
from sparseforge.training import (
    Callback,
    CheckpointCallback,
    CommHookCallback,
    History,
    LambdaCallback,
    SGDConfig,
    ShardedPermutation,
    SparsifierCallback,
    fit,
)
from sparseforge.training.checkpoint import list_checkpoints, load_training_checkpoint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def _data(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_takes_the_hand_written_steps_bit_for_bit() -> None:
    """SGD + cosine + a RigL Sparsifier: fit's weights equal those of the loop users used to write."""
    x, y = _data()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
    steps = 3 * len(batches)

    by_hand = _model()
    opt, sched = SGDConfig(lr=0.1).build(by_hand.parameters(), steps)
    sp = sf.Sparsifier(by_hand, sf.methods.RigL(0.8, frequency=4, seed=3), total_steps=steps, optimizer=opt)
    for _ in range(3):
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(by_hand(xb), yb).backward()
            opt.step()
            sched.step()
            sp.step()

    fitted = _model()
    opt, sched = SGDConfig(lr=0.1).build(fitted.parameters(), steps)
    sp2 = sf.Sparsifier(fitted, sf.methods.RigL(0.8, frequency=4, seed=3), total_steps=steps, optimizer=opt)
    state = fit(fitted, batches, opt, F.cross_entropy, epochs=3, scheduler=sched, callbacks=[SparsifierCallback(sp2)])
    assert state.step == steps and state.epoch == 2
    assert _same(fitted, by_hand)
    assert all(torch.equal(a, b) for a, b in zip(sp.masks.values(), sp2.masks.values()))


def test_hooks_run_in_order_and_callbacks_by_their_order() -> None:
    calls: list[str] = []

    class Recorder(Callback):
        def __init__(self, name: str, order: int) -> None:
            self.name, self.order = name, order

        def __getattribute__(self, attr: str):
            if attr.startswith(("on_", "after_")):
                name = object.__getattribute__(self, "name")
                return lambda state, *rest: calls.append(f"{name}.{attr}")
            return object.__getattribute__(self, attr)

    model = nn.Linear(2, 1)
    data = [(torch.ones(1, 2), torch.zeros(1, 1))] * 2
    fit(model, data, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, epochs=1,
        callbacks=[Recorder("late", 70), Recorder("early", 5)])
    step = ["on_step_start", "after_backward", "on_step_end"]
    expected = ["on_fit_start", "on_epoch_start", *step, *step, "on_epoch_end", "on_fit_end"]
    assert calls == [f"{who}.{hook}" for hook in expected for who in ("early", "late")]


def test_start_step_continues_the_run_exactly() -> None:
    """Started at step k with the data plug-in and the schedule at k: the last steps of the full run."""
    x, y = _data()
    data = ShardedPermutation(x, y, batch_size=16, seed=5)  # 6 steps an epoch, order from (seed, epoch)
    total, k = 18, 8
    saved = {}
    full = _model()
    opt, sched = SGDConfig().build(full.parameters(), total)
    fit(full, data, opt, F.cross_entropy, epochs=3, scheduler=sched,
        callbacks=[LambdaCallback(on_step_end=lambda s: saved.setdefault(s.step, copy.deepcopy(
            (full.state_dict(), opt.state_dict(), sched.state_dict()))))])
    late = _model()
    opt2, sched2 = SGDConfig().build(late.parameters(), total)
    for obj, sd in zip((late, opt2, sched2), saved[k]):
        obj.load_state_dict(sd)
    rows = History()
    state = fit(late, data, opt2, F.cross_entropy, epochs=3, scheduler=sched2, start_step=k, callbacks=[rows])
    assert state.step == total and _same(late, full)
    assert [r["epoch"] for r in rows.rows] == [2, 3]  # the run began inside epoch 2


class _Stop(Exception):
    pass


def _resumable_run(folder: Path, stop_at: int | None = None) -> tuple[nn.Module, History]:
    x, y = _data()
    data = ShardedPermutation(x, y, batch_size=16, seed=2)
    model = _model()
    opt, sched = SGDConfig(lr=0.08).build(model.parameters(), 18)
    def test_loss(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"test_loss": float(F.cross_entropy(m(x), y))}

    history = History(test_loss)
    callbacks: list[Callback] = [SparsifierCallback(sf.methods.SET(0.7, frequency=3, seed=1)), history,
                                 CheckpointCallback(folder, every_steps=4, keep=10)]
    if stop_at is not None:
        def stop(state) -> None:
            if state.step == stop_at:
                raise _Stop

        callbacks.append(LambdaCallback(order=90, on_step_end=stop))  # after the checkpoint callback
    fit(model, data, opt, F.cross_entropy, epochs=3, scheduler=sched, callbacks=callbacks)
    return model, history


def test_checkpoint_resume_ends_with_the_uninterrupted_weights(tmp_path) -> None:
    straight, straight_history = _resumable_run(tmp_path / "straight")
    with pytest.raises(_Stop):
        _resumable_run(tmp_path / "resumed", stop_at=10)
    # every 4 steps; an epoch's end (6) only when it falls on one, as in `sparseforge train`
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [4, 8]
    saved = load_training_checkpoint(list_checkpoints(tmp_path / "resumed")[-1][1])
    assert saved["version"] == 2 and saved["step"] == 8 and saved["sparsifier"] is not None
    resumed, resumed_history = _resumable_run(tmp_path / "resumed")
    assert _same(resumed, straight)
    drop = ("epoch_seconds", "total_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed_history.rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in straight_history.rows]


def test_lbfgs_gets_a_closure_and_after_backward_sees_gradients() -> None:
    x, y = _data()
    model = nn.Linear(6, 3)
    seen: list[float] = []
    opt = torch.optim.LBFGS(model.parameters(), max_iter=20)
    state = fit(model, [(x, y)], opt, F.cross_entropy, steps=1,
                callbacks=[LambdaCallback(after_backward=lambda s: seen.append(float(model.weight.grad.norm())))])
    assert state.step == 1 and len(seen) > 1  # L-BFGS evaluated the loss several times within its one step
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.7


def test_an_error_reaches_every_callback_and_is_raised() -> None:
    errors: list[BaseException] = []

    class Watch(Callback):
        def on_fit_error(self, state, error) -> None:
            errors.append(error)

    def boom(state) -> None:
        if state.step == 2:
            raise RuntimeError("boom")

    model = nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [(torch.ones(1, 2), torch.zeros(1, 1))] * 4, torch.optim.SGD(model.parameters(), lr=0.1),
            F.mse_loss, epochs=1, callbacks=[Watch(), LambdaCallback(on_step_end=boom)])
    assert len(errors) == 1 and str(errors[0]) == "boom"


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs epochs or steps"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"epochs": 1, "start_step": 5}, "start_step must be in"),
])
def test_bad_arguments_are_refused(kwargs, message) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(SparseforgeError, match=message):
        fit(model, [(torch.ones(1, 2), torch.zeros(1, 1))] * 3, torch.optim.SGD(model.parameters(), lr=0.1),
            F.mse_loss, **kwargs)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_allreduce_hook_in_one_process_trains_the_plain_weights() -> None:
    """DDP over one process averages nothing: the comm-hook path gives plain fit's weights, and counts bytes."""
    x, y = _data()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    plain = _model()
    opt, _ = SGDConfig().build(plain.parameters(), 6)
    fit(plain, batches, opt, F.cross_entropy, epochs=2)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        hooked = _model()
        opt, _ = SGDConfig().build(hooked.parameters(), 6)
        comm = CommHookCallback(register_allreduce_counter)
        state = fit(hooked, batches, opt, F.cross_entropy, epochs=2, callbacks=[comm])
        assert isinstance(state.net, nn.parallel.DistributedDataParallel)
        steady = comm.after_warmup()
        dense = 4 * sum(p.numel() for p in hooked.parameters())
        assert steady == {"from_step": 0, "steps": 6, "bytes_per_step": dense, "dense_bytes_per_step": dense}
    finally:
        dist.destroy_process_group()
    assert _same(hooked, plain)


def test_a_comm_hook_needs_a_process_group() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(SparseforgeError, match="needs torch.distributed initialised"):
        fit(model, [(torch.ones(1, 2), torch.zeros(1, 1))], torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
            epochs=1, callbacks=[CommHookCallback(register_allreduce_counter)])


def test_history_rows_and_json(tmp_path) -> None:
    """Per-epoch rows (loss, accuracy, evaluation, times) and the same rows in the JSON file."""
    import json

    x, y = _data()
    model = _model()
    path = tmp_path / "history.json"
    history = History(lambda m: {"seen": 1}, path=path, evaluate_every=2)
    opt, sched = SGDConfig().build(model.parameters(), 9)
    fit(model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)], opt, F.cross_entropy, epochs=3,
        scheduler=sched, callbacks=[history])
    rows = history.rows
    assert [(r["epoch"], r["step"], "seen" in r) for r in rows] == [(1, 3, False), (2, 6, True), (3, 9, True)]
    assert all(0 <= r["train_accuracy"] <= 100 and r["train_loss"] > 0 for r in rows)
    assert all(0 < r["epoch_seconds"] <= r["total_seconds"] for r in rows)
    assert json.loads(path.read_text())["history"] == json.loads(json.dumps(rows))
    assert history.last_sums[2] == 96  # every example counted once in the last epoch
