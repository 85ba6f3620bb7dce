"""``sparseforge train RECIPE --nproc N``: recipe checks, torchrun/DDP end to end, kill and resume.

Every run is LeNet-300-100 on 512 Fashion-MNIST examples, global batch 64
(8 steps per epoch, 2 epochs), RigL at 90% with a mask update every 4 steps
and a checkpoint every 2 steps, all kept: small enough that a torchrun launch
(two fresh interpreters, gloo on loopback) costs a few seconds. The runs are
shared through module-scoped fixtures:

- ``run_2``: the uninterrupted run on 2 processes, through the CLI;
- ``killed``: the same recipe (slowed by ``debug.step_delay_s``) on 2 processes,
  SIGKILLed (torchrun's whole process group) once a mid-run checkpoint exists;
  a copy of its run folder is kept for the 1-process resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from sparseforge.cli import main
from sparseforge.distributed.train import load_recipe
from sparseforge.training.checkpoint import list_checkpoints, state_digest
from sparseforge.training.data import epoch_permutation, rank_slice
from sparseforge.zoo.data import load_fashion_mnist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

try:
    load_fashion_mnist("test")
    HAVE_DATA = True
except Exception:  # noqa: BLE001 - any reason the data cannot be read skips the data-driven tests
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST files not available")

RUN_TIMEOUT_S = 180
STEPS = 16
SPARSITY = 0.9
RECIPE: dict[str, Any] = {
    "model": "lenet300",
    "data": {"limit_train": 512, "limit_test": 256},
    "method": {"name": "rigl", "sparsity": SPARSITY, "options": {"frequency": 4}},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "seed": 0},
    "distributed": {"backend": "gloo"},
    "checkpoint": {"every_steps": 2, "keep": 100},
}


def write_recipe(path: Path, **changes: Any) -> Path:
    """RECIPE with top-level sections updated by ``changes`` (a section's keys merged)."""
    data = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def cli_command(recipe: Path, out: Path, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sparseforge", "train", str(recipe), "--nproc", str(nproc), "--out", str(out),
            "--quiet", *extra]


def run_cli(recipe: Path, out: Path, nproc: int) -> None:
    """``sparseforge train`` in a subprocess (torchrun for nproc > 1); fails the test on a non-zero exit."""
    done = subprocess.run(cli_command(recipe, out, nproc), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"sparseforge train failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def checkpoint(out: Path, step: int) -> dict[str, Any]:
    return torch.load(out / "checkpoints" / f"step-{step:08d}.pt", weights_only=False)


def zero_fraction(weights: dict[str, torch.Tensor]) -> float:
    """Sparsity of the Linear weights (what RigL targets; biases stay dense)."""
    ws = [w for name, w in weights.items() if name.endswith(".weight")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_recipe")


@pytest.fixture(scope="module")
def run_2(work: Path) -> Path:
    out = work / "run2"
    run_cli(write_recipe(work / "recipe.yaml"), out, nproc=2)
    return out


@pytest.fixture(scope="module")
def killed(work: Path) -> tuple[Path, Path, Path, int]:
    """A 2-process run SIGKILLed in the middle: (recipe, its run folder, a copy of it, the last step saved)."""
    recipe = write_recipe(work / "slow.yaml", debug={"step_delay_s": 0.1})
    out = work / "killed"
    # A session of its own, so that killpg reaches the CLI and torchrun (not this test).
    proc = subprocess.Popen(cli_command(recipe, out, 2), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not any(step >= 4 for step, _ in list_checkpoints(out)):
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    # torchrun's workers live in sessions of their own; they must end with their parent (the
    # launcher's watchdog) instead of finishing the run unattended.
    time.sleep(1.5)
    saved = list_checkpoints(out)
    time.sleep(1.0)
    assert list_checkpoints(out) == saved, "workers kept training after torchrun was killed"
    last = saved[-1][0]
    assert last < STEPS and not (out / "model.safetensors").exists(), "the kill came after the end of the run"
    copy = work / "killed-copy"
    shutil.copytree(out, copy)
    return recipe, out, copy, last


# -- bad recipes fail before any process starts ------------------------------------------------


BAD = {
    "dgc density 0": ({"distributed": {"comm": "dgc", "dgc": {"density": 0}}}, 1, "density"),
    "dgc density 1.5": ({"distributed": {"comm": "dgc", "dgc": {"density": 1.5}}}, 1, "density"),
    "backend mpi2": ({"distributed": {"backend": "mpi2"}}, 1, "distributed.backend must be one of"),
    "nccl without CUDA": ({"distributed": {"backend": "nccl"}}, 2, "nccl needs CUDA"),
    "batch 100 on 3": ({"train": {"batch_size": 100}}, 3, "cannot be split equally over 3 processes"),
    "unknown method": ({"method": {"name": "rigl2"}}, 1,
                       "method.name: unknown method 'rigl2'; did you mean 'rigl'? (known: none, "),
    "unknown key": ({"train": {"epohcs": 3}}, 1, "unknown key 'train.epohcs' (did you mean 'epochs'?)"),
    "unknown method option": ({"method": {"options": {"frequncy": 4}}}, 1, "did you mean 'frequency'"),
    "fewer examples than a batch": ({"data": {"limit_train": 32}}, 1, "fewer than one global batch"),
    "sparsity 1": ({"method": {"sparsity": 1.0}}, 1, "sparsity must be in [0, 1)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_recipe_fails_before_any_process(name, tmp_path, capsys):
    changes, nproc, message = BAD[name]
    if name == "nccl without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    recipe = write_recipe(tmp_path / "bad.yaml", **changes)
    out = tmp_path / "run"
    started = time.perf_counter()
    code = main(["train", str(recipe), "--nproc", str(nproc), "--out", str(out), "--quiet"])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sparseforge: error: ") and message in err, err
    assert not out.exists(), "a run folder was created: something started"
    assert seconds < 3.0, f"took {seconds:.1f}s: more than checking a recipe"


def test_print_command_names_torchrun_and_starts_nothing(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    assert main(["train", str(recipe), "--nproc", "2", "--out", str(tmp_path / "run"), "--print-command"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and "sparseforge.distributed.launch" in cmd
    assert not (tmp_path / "run").exists()


def test_example_recipe_is_valid():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "examples" / "train-rigl.yaml")
    recipe.check_launch(2)
    assert recipe.method.name == "rigl" and recipe.steps_per_epoch() == 60000 // recipe.train.batch_size


# -- data sharding -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_tile_the_global_batch(world):
    """The ranks' pieces of global batch b are disjoint and together exactly that batch, in order."""
    order = epoch_permutation(100, seed=3, epoch=1)
    for b in range(100 // 16):
        pieces = [order[rank_slice(b, 16, r, world)] for r in range(world)]
        assert torch.equal(torch.cat(pieces), order[b * 16:(b + 1) * 16])
    assert not torch.equal(order, epoch_permutation(100, seed=3, epoch=2))


# -- end to end --------------------------------------------------------------------------------


@needs_data
def test_two_processes_end_to_end(run_2, capsys):
    metrics = json.loads((run_2 / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(0.0 <= h["test_accuracy"] <= 100.0 for h in metrics["history"])
    # Every rank recorded its own digest; they agree.
    assert len(metrics["mask_digests"]) == 2 and len(set(metrics["mask_digests"])) == 1
    assert metrics["masks_identical"]
    weights = final_weights(run_2)
    assert abs(zero_fraction(weights) - SPARSITY) < 1e-3
    assert abs(metrics["final"]["sparsity"] - zero_fraction(weights)) < 1e-6
    assert not any(name.endswith("_mask") for name in weights), "masks left in the final model"
    assert main(["inspect", str(run_2 / "model.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "lenet300" and report["total_sparsity"] > 0.85


@needs_data
def test_one_and_two_processes_train_the_same_model(run_2, work):
    """The same global batches for any world size: weights agree up to float summation order."""
    out = work / "run1"
    assert main(["train", str(work / "recipe.yaml"), "--out", str(out), "--quiet"]) == 0
    for step in (2, 4):  # a few steps, across the first mask update (step 4)
        one, two = checkpoint(out, step), checkpoint(run_2, step)
        for name in two["model"]:
            torch.testing.assert_close(one["model"][name], two["model"][name], rtol=0, atol=1e-6)
        for name, mask in two["sparsifier"]["masks"].items():
            assert torch.equal(one["sparsifier"]["masks"][name], mask)
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 1


@needs_data
def test_killed_run_resumes_to_the_same_weights(run_2, killed, work):
    _, out, _, last = killed
    run_cli(work / "recipe.yaml", out, nproc=2)  # without the slow-down: not part of what is trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and [h["epoch"] for h in metrics["history"]] == [1, 2]
    resumed, straight = final_weights(out), final_weights(run_2)
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert last < STEPS


@needs_data
def test_two_process_checkpoint_resumes_on_one_process(run_2, killed, capsys):
    """Resumed on 1 process: the run ends at the same step with the recipe's exact sparsity.

    The weights differ by float rounding only (one process sums each batch's
    gradient in another order than two do; measured: at most ~1e-8), but a
    RigL update could turn such a difference into another regrown weight at a
    near-tie. So the masks are compared by their overlap (> 99%) and the
    weights tightly where the masks agree.
    """
    recipe, _, copy, last = killed
    assert main(["train", str(recipe), "--out", str(copy), "--quiet"]) == 0
    assert "resuming" not in capsys.readouterr().out  # --quiet
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["steps"] == STEPS
    weights, straight = final_weights(copy), final_weights(run_2)
    assert zero_fraction(weights) == zero_fraction(straight)
    assert abs(zero_fraction(weights) - SPARSITY) < 1e-3
    for name in straight:
        agree = (weights[name] != 0) == (straight[name] != 0)
        assert agree.float().mean().item() > 0.99, name
        torch.testing.assert_close(weights[name][agree], straight[name][agree], rtol=0, atol=1e-5)
    assert last < STEPS


@needs_data
def test_resume_refuses_a_folder_of_another_recipe(run_2, work, capsys):
    other = write_recipe(work / "other-lr.yaml", train={"lr": 0.1})
    folder = work / "other"
    shutil.copytree(run_2 / "checkpoints", folder / "checkpoints")
    assert main(["train", str(other), "--out", str(folder), "--quiet"]) == 2
    assert "holds checkpoints of another recipe (differences in: train)" in capsys.readouterr().err


def test_readme_recipe_is_valid(tmp_path):
    """The recipe shown in the README's distributed-training section loads and fits 2 processes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Distributed training from a recipe", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "r.yaml").write_text(block)
    recipe = load_recipe(tmp_path / "r.yaml")
    recipe.check_launch(2)
    assert recipe.method.name == "rigl" and recipe.train.batch_size == 128


@needs_data
def test_dgc_run_resumes_exactly_with_its_hook_state(tmp_path):
    """DGC's unsent residuals, momentum and warm-up position travel in the checkpoints: a run resumed
    from a mid-run checkpoint ends with the uninterrupted run's weights (one process, in this process:
    a one-process group carries the hook). Without that state the resumed run ends elsewhere."""
    from sparseforge.distributed.train import run

    recipe = load_recipe(write_recipe(tmp_path / "dgc.yaml", distributed={
        "backend": "gloo", "comm": "dgc", "dgc": {"density": 0.05, "warmup_steps": 6}}))
    full = tmp_path / "full"
    run(recipe, full, quiet=True)
    saved = checkpoint(full, 6)["hook_states"]
    assert len(saved) == 1 and saved[0]["step"] == 6
    assert any(v.abs().sum() > 0 for v in saved[0]["v"])  # a residual was waiting to be sent

    def resume_from_step_6(name: str, drop_hook_state: bool) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        shutil.copytree(full, out)
        for step, path in list_checkpoints(out):
            if step > 6:
                path.unlink()
        (out / "model.safetensors").unlink()
        if drop_hook_state:
            path = out / "checkpoints" / f"step-{6:08d}.pt"
            state = torch.load(path, weights_only=False)
            state["hook_states"] = None
            state["sha256"] = state_digest(state)  # an intact checkpoint that lacks the hook state
            torch.save(state, path)
        run(recipe, out, quiet=True)
        return final_weights(out)

    expected = final_weights(full)
    resumed = resume_from_step_6("resumed", drop_hook_state=False)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    restarted = resume_from_step_6("restarted", drop_hook_state=True)
    assert not all(torch.equal(restarted[k], expected[k]) for k in expected)
