"""Nothing silent: progress in logs, and the user's thread setting respected.

Issue 20, item 6. With stderr not a terminal (pytest's capture, like a log
file, CI or a notebook) every long command writes plain progress lines to
stderr: a start and an end line for each phase (loading, calibration text,
quality before and after, writing) and for each counted task (blocks, steps,
tensors), while stdout holds only the result (``--json`` parses). The lines
are held back for the first few seconds (``progress.HOLD_S``), so the tests
set that to 0 to see them; one test keeps it, to check that a quick failure
is still one line. Threads: ``OMP_NUM_THREADS`` set by the user wins in
``train`` (one process, and the workers' environment for N), the demo and the
other commands; the default follows the machine's load (given here as a
number, so nothing depends on the clock or on what else runs).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from sparseforge import progress, threads
from sparseforge.cli import main
from sparseforge.errors import SparseforgeError
from sparseforge.io.checkpoint import save_checkpoint
from sparseforge.zoo import build_model
from sparseforge.zoo.data import load_fashion_mnist
from sparseforge.zoo.text import DEFAULT_FORTUNES_DIR

try:
    load_fashion_mnist("test")
    HAVE_DATA = True
except Exception:  # noqa: BLE001 - any reason the data cannot be read skips the data-driven tests
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST files not available")

try:
    import transformers  # noqa: F401

    HAVE_HF = Path(DEFAULT_FORTUNES_DIR).is_dir()
except ImportError:
    HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers or the fortune files are not installed")

LINE = re.compile(r"^\[ *\d+\.\ds\] \S")
SMALL = ["--samples", "8", "--seq-len", "32", "--eval-texts", "32"]


@pytest.fixture
def plain(monkeypatch):
    """Progress lines from the first moment (the default holds them back for HOLD_S seconds)."""
    monkeypatch.setattr(progress, "HOLD_S", 0.0)


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    """The commands set torch's thread count; give the next test the one it had."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.SOURCE_ENV, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(build_model("lenet300"), tmp_path_factory.mktemp("zoo") / "lenet.safetensors")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from sparseforge.io.hf import save_pretrained
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model as build_lm, train_tokenizer
    from sparseforge.zoo.text import fortunes

    tokenizer = train_tokenizer(fortunes().calibration[:300], vocab_size=TINY_CONFIG.vocab_size)
    return save_pretrained(build_lm(TINY_CONFIG, tokenizer), tmp_path_factory.mktemp("lm") / "tiny-llama", tokenizer)


def progress_lines(err: str) -> list[str]:
    """The stderr lines, each checked to be a plain progress line (no bar, no escape codes)."""
    lines = err.splitlines()
    assert lines, "no progress on stderr"
    bad = [line for line in lines if not LINE.match(line) or "\x1b" in line or "\r" in line]
    assert not bad, f"not plain progress lines: {bad}"
    return [line.split("] ", 1)[1] for line in lines]


def assert_phase(lines: list[str], start: str) -> None:
    """A phase or task that starts with ``start`` has a start line and, later, a 'done in' line."""
    first = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
    assert first is not None, f"no line starting {start!r} in {lines}"
    assert any(line.startswith(start) and " done in " in line for line in lines[first + 1:]), \
        f"{start!r} has no end line in {lines}"


# -- commands: progress on stderr, the result alone on stdout ----------------------------------


@needs_hf
def test_prune_of_a_model_folder_shows_every_phase_and_json_stays_pure(lm_dir, tmp_path, capsys, plain):
    assert main(["prune", str(lm_dir), "--method", "wanda", *SMALL, "--out", str(tmp_path / "p"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["method"] == "wanda"  # stdout is the JSON and nothing else
    lines = progress_lines(captured.err)
    assert re.match(r"sparseforge prune: \d+ threads? \(", lines[0]), lines[0]
    for start in (f"loading {lm_dir}", "reading and tokenizing", "quality of the dense model",
                  "wanda unstructured: blocks:", "quality of the pruned model", "writing"):
        assert_phase(lines, start)
    assert any(line.startswith("wanda unstructured: blocks: 2/2 done in") for line in lines)
    order = [next(i for i, line in enumerate(lines) if line.startswith(s))
             for s in ("loading", "reading", "quality of the dense", "wanda", "quality of the pruned", "writing")]
    assert order == sorted(order), lines


@needs_hf
def test_quantize_of_a_model_folder_shows_load_quality_and_write(lm_dir, tmp_path, capsys, plain):
    out = tmp_path / "q.sfz"
    assert main(["quantize", str(lm_dir), "--scheme", "int8", *SMALL, "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    lines = progress_lines(captured.err)
    for start in (f"loading {lm_dir}", "reading and tokenizing", "quality of the dense model", "quantizing to int8",
                  "quality of the quantized model", f"writing {out}"):
        assert_phase(lines, start)


def test_prune_and_export_of_a_checkpoint(zoo_checkpoint, tmp_path, capsys, plain):
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(zoo_checkpoint), "--sparsity", "0.5", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["layers"]
    lines = progress_lines(captured.err)
    for start in (f"loading {zoo_checkpoint}", "pruning by magnitude", f"writing {out}"):
        assert_phase(lines, start)
    assert main(["export", str(out), "--out", str(tmp_path / "p.sfz")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote ") and captured.out.count("\n") == 1
    for start in (f"loading {out}", "writing"):
        assert_phase(progress_lines(captured.err), start)


def test_merge_counts_tensors_on_stderr_and_prints_its_report_on_stdout(tmp_path, capsys, plain):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(save_checkpoint(build_model("lenet300"), tmp_path / f"m{seed}.safetensors")))
    assert main(["merge", *paths, "--out", str(tmp_path / "soup.safetensors")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("merged 2 models") and len(captured.out.splitlines()) == 3
    lines = progress_lines(captured.err)
    assert_phase(lines, "merging soup.safetensors: tensors:")
    assert any(line.startswith("merging soup.safetensors: tensors: 6/6 done in") for line in lines)


def test_quiet_means_no_progress(zoo_checkpoint, tmp_path, capsys, plain):
    assert main(["prune", str(zoo_checkpoint), "--sparsity", "0.5", "--out", str(tmp_path / "p.safetensors"),
                 "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert captured.err == ""


def test_a_failure_ends_the_progress_before_its_one_error_line(zoo_checkpoint, tmp_path, capsys, plain):
    argv = ["prune", str(zoo_checkpoint), "--sparsity", "0.5", "--include", "nope*", "--out", str(tmp_path / "x.safetensors")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("sparseforge: error: ") and "'nope*' matches no" in lines[-1]
    progress_lines("\n".join(lines[:-1]))
    assert not any("pruning by magnitude" in line and "done in" in line for line in lines), \
        "the failed phase got an end line"


def test_a_quick_failure_is_still_one_line(zoo_checkpoint, tmp_path, capsys, monkeypatch):
    # Phases started, but a run that ends within HOLD_S shows none of them (the clock is taken out
    # of it: HOLD_S is an hour here, the shipped value a few seconds).
    monkeypatch.setattr(progress, "HOLD_S", 3600.0)
    argv = ["prune", str(zoo_checkpoint), "--sparsity", "0.5", "--include", "nope*", "--out", str(tmp_path / "x.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error: ") and err.count("\n") == 1, err


# -- train and the demo: progress, per-epoch and total times, threads ---------------------------

RECIPE = {
    "model": "lenet300",
    "data": {"limit_train": 256, "limit_test": 128},
    "method": {"name": "gmp", "sparsity": 0.5},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "seed": 0},
    "distributed": {"backend": "gloo"},
}


def write_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@needs_data
def test_train_in_one_process(tmp_path, capsys, monkeypatch, plain):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # more than this 2-core machine's default could be
    out = tmp_path / "run"
    assert main(["train", str(write_recipe(tmp_path)), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert torch.get_num_threads() == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threads"]["threads"] == 3 and metrics["threads"]["source"] == "OMP_NUM_THREADS"
    stdout = captured.out.splitlines()
    assert stdout[0].startswith("sparseforge train:") and "3 threads (OMP_NUM_THREADS)" in stdout[0]
    epochs = [line for line in stdout if line.startswith("epoch")]
    assert len(epochs) == 2 and all(re.search(r"epoch \d+\.\d s, total \d+\.\d s$", line) for line in epochs)
    assert re.search(r"total \d+\.\d s;", stdout[-1]) and stdout[-1].startswith("done:")
    rows = metrics["history"]
    assert all(0 < r["epoch_seconds"] <= r["total_seconds"] for r in rows)
    assert rows[1]["total_seconds"] >= rows[0]["total_seconds"] + rows[1]["epoch_seconds"] - 1e-6
    assert rows[1]["total_seconds"] <= metrics["seconds"]
    lines = progress_lines(captured.err)
    for start in ("reading fashion-mnist", "train: steps:", "writing"):
        assert_phase(lines, start)
    assert "train: steps: 0/8 (0%), 0.0 s" in lines
    assert any(line.startswith("train: steps: 8/8 done in") and "epoch 2/2" in line for line in lines)


def test_the_launcher_keeps_the_users_threads_for_its_workers(tmp_path, monkeypatch):
    from sparseforge.distributed import launch as launch_module

    seen = []

    class FakePopen:  # what launch() would start; nothing is
        def __init__(self, cmd, env):
            seen.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(launch_module.subprocess, "Popen", FakePopen)
    recipe = write_recipe(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert launch_module.launch(recipe, nproc=2, out=tmp_path / "run") == 0
    assert seen[-1][1]["OMP_NUM_THREADS"] == "5" and threads.SOURCE_ENV not in seen[-1][1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    assert launch_module.launch(recipe, nproc=2, out=tmp_path / "run") == 0
    env = seen[-1][1]
    assert env["OMP_NUM_THREADS"] == "4" and "2 processes" in env[threads.SOURCE_ENV]
    # and a worker started with it reports the launcher's choice, not a user's setting
    choice = threads.choose_threads(2, env=env)
    assert choice.threads == 4 and choice.source.startswith("default")


@needs_data
def test_demo_respects_omp_num_threads_and_follows_the_load_without_it(tmp_path, capsys, monkeypatch, plain):
    argv = ["demo", "--limit-train", "256", "--limit-test", "128", "--dense-epochs", "1", "--sparse-epochs", "1",
            "--runs-dir", str(tmp_path)]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main([*argv, "--name", "omp"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads((tmp_path / "omp" / "metrics.json").read_text())
    assert metrics["threads"]["threads"] == 3 and torch.get_num_threads() == 3
    first = " ".join(captured.out.split("[ dense]")[0].split())  # rich wraps the first line at 80 columns
    assert "3 threads (OMP_NUM_THREADS)" in first
    assert all(r["epoch_seconds"] <= r["total_seconds"] for r in metrics["history"])
    assert_phase(progress_lines(captured.err), "dense epoch 1/1: batches")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))  # a machine flat out
    assert main([*argv, "--name", "busy", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "busy" / "metrics.json").read_text())
    assert metrics["threads"]["threads"] == 1 and metrics["threads"]["source"] == "default"
    assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""


def test_a_bad_omp_num_threads_is_one_line(zoo_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert main(["prune", str(zoo_checkpoint), "--sparsity", "0.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error: OMP_NUM_THREADS='lots'") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# -- the default thread count ---------------------------------------------------------------------


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_default_threads_is_between_one_and_the_cores_and_falls_with_load(cores, world):
    loads = [0.0, 0.3, 0.6, 1.0, 1.5, 2.4, 3.0, 7.9, 63.0, 500.0]
    counts = [threads.default_threads(world, cores=cores, load=load) for load in loads]
    assert all(1 <= n <= cores for n in counts)
    assert counts == sorted(counts, reverse=True), "more load never means more threads"
    assert counts[0] == max(1, cores // world), "an idle machine: all its cores, shared"
    assert counts[-1] == 1, "a machine flat out: one thread"


@pytest.mark.parametrize("cores, load, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.3, 1), (2, 2.6, 1),
                                                   (8, 2.6, 5), (8, 5.5, 2), (16, 0.2, 16)])
def test_default_threads_takes_the_other_work_off_the_cores(cores, load, expected):
    assert threads.default_threads(1, cores=cores, load=load) == expected


def test_choose_threads_prefers_the_users_setting():
    assert threads.choose_threads(env={"OMP_NUM_THREADS": "7"}, cores=2, load=0.0).threads == 7
    assert threads.choose_threads(env={"OMP_NUM_THREADS": "2,1"}, cores=4, load=0.0).threads == 2  # OpenMP's list
    chosen = threads.choose_threads(env={"OMP_NUM_THREADS": " "}, cores=4, load=1.0)
    assert (chosen.threads, chosen.source, chosen.load) == (3, "default", 1.0)
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(SparseforgeError, match="OMP_NUM_THREADS"):
            threads.choose_threads(env={"OMP_NUM_THREADS": bad})


def test_the_load_is_scaled_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (32.0, 0.0, 0.0))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    assert threads.other_load(2) == pytest.approx(1.0)  # half the machine busy: half of our 2 cores


# -- the reporter itself (no clock: lines at start and end only) -----------------------------------


def test_plain_lines_for_phases_and_tasks():
    buf = io.StringIO()
    with progress.Progress(stream=buf, terminal=False, hold_s=0, header="head") as p:
        with p.phase("loading"):
            pass
        with p.task("blocks", 3) as t:
            for _ in range(3):
                t.advance(info="loss 1.000")
        with pytest.raises(KeyError), p.phase("failing"):
            raise KeyError
    lines = progress_lines(buf.getvalue())
    assert lines[0] == "head" and lines[1] == "loading ..." and lines[2].startswith("loading: done in ")
    assert lines[3] == "blocks: 0/3 (0%), 0.0 s"
    assert lines[4].startswith("blocks: 3/3 done in ") and lines[4].endswith("loss 1.000")
    assert lines[5:] == ["failing ..."], "a failed phase has no end line"


def test_held_lines_of_a_short_run_are_dropped_and_disabled_prints_nothing():
    buf = io.StringIO()
    with progress.Progress(stream=buf, terminal=False, hold_s=3600) as p, p.task("t", 2) as t:
        t.advance(2)
    assert buf.getvalue() == ""
    with progress.Progress(enabled=False, stream=buf, terminal=False, hold_s=0) as p, p.phase("x"):
        pass
    assert buf.getvalue() == ""


def test_a_task_line_says_how_far_and_how_long():
    t = progress.Task("wanda: blocks", 4, completed=1, started=100.0)
    assert t.status(130.0) == "wanda: blocks: 1/4 (25%), 30 s, about 1 min 30 s left"
    t.update(4, info="loss 0.5")
    assert t.status(160.0) == "wanda: blocks: 4/4 (100%), 1 min 00 s  loss 0.5"
    assert progress.Task("loading", None, started=0.0).status(12.0) == "loading ... 12 s so far"


def test_a_terminal_gets_a_live_display_and_no_plain_lines():
    buf = io.StringIO()
    with progress.Progress(stream=buf, terminal=True, hold_s=0) as p, p.task("blocks", 2) as t:
        t.advance(2)
    assert "blocks" in buf.getvalue() and not re.search(r"\[ *\d+\.\ds\]", buf.getvalue())
