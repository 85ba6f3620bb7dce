"""Every CLI command against a table of bad inputs and failing file systems.

Each case of :data:`CASES` runs one command line (in-process through
``sparseforge.cli.main``; ``train --nproc 2`` as a real subprocess, since
torchrun starts processes) and asserts what the project promises for bad
input: exit status 2, stderr exactly one line starting ``sparseforge:
error:`` (no traceback) that says what is wrong, and nothing left behind:
every file and folder under the test's folder (the output folder among
them, with its ``previous.safetensors`` from an earlier run) and under the
shared inputs is byte for byte as before, with no temporaries.

The output folder of a case comes from a fixture of ``faultfs.py``:
``writable_dir`` (plain), ``readonly_dir`` (mode 0555, or immutable for
root), ``readonly_fs`` (a read-only bind mount, root only) or ``full_fs``
(a 64 KiB tmpfs, root only); the root-only ones skip elsewhere with the
reason. Cases that need Fashion-MNIST, the fortune texts or transformers
skip without them.

After the table: the behaviours the fixes added that are not errors (RTN on
a model without a tokenizer, the count of weights rounded to zero, full
layer names, single-model merges that do change the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from faultfs import full_fs, readonly_dir, readonly_fs, writable_dir  # noqa: F401 (fixtures, by name)
from sparseforge.cli import main
from sparseforge.zoo.data import DEFAULT_DATA_DIR
from sparseforge.zoo.text import DEFAULT_FORTUNES_DIR

SRC = Path(__file__).resolve().parents[2] / "src"
HAVE_DATA = (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").is_file()
try:
    import transformers  # noqa: F401

    HAVE_HF = Path(DEFAULT_FORTUNES_DIR).is_dir()
except ImportError:
    HAVE_HF = False
TEXT = ("--samples", "4", "--seq-len", "16", "--eval-texts", "4")  # the smallest calibration that runs


@dataclass(frozen=True)
class Case:
    """One command line that must fail cleanly.

    ``argv`` may name ``{inp}`` (the shared inputs, see :func:`inputs`) and
    ``{out}`` (the case's output folder, from the fixture named by ``where``).
    ``message``: a fragment the error line must contain. ``needs``: ``data``
    (Fashion-MNIST), ``hf`` (transformers and fortunes). ``new_dirs``: folders
    (relative to ``{out}``) the command may leave, empty (train's run folder).
    """

    argv: tuple[str, ...]
    message: str
    where: str = "writable_dir"
    needs: tuple[str, ...] = ()
    new_dirs: tuple[str, ...] = ()
    subprocess: bool = False


def case(*argv: str, message: str, **kw) -> Case:
    return Case(tuple(argv), message, **kw)


RO_DIR = {"where": "readonly_dir"}
RO_FS = {"where": "readonly_fs"}
FULL = {"where": "full_fs"}
NOT_WRITABLE = "is not writable"
READ_ONLY = "read-only file system"
NO_SPACE = "no space left on device"

CASES: dict[str, list[Case]] = {
    "demo": [
        case("demo", "--runs-dir", "{out}/previous.safetensors", message="exists and is not a folder"),
        case("demo", "--runs-dir", "{out}", message=NOT_WRITABLE, **RO_DIR),
        case("demo", "--runs-dir", "{out}", message=READ_ONLY, **RO_FS),
        case("demo", "--runs-dir", "{out}", "--name", "run", "--quiet", "--limit-train", "128", "--limit-test", "64",
             "--dense-epochs", "1", "--sparse-epochs", "1", message=NO_SPACE, needs=("data",), **FULL),
        case("demo", "--runs-dir", "{out}", "--sparsity", "1.5", message="sparsity must be in [0, 1)"),
        case("demo", "--runs-dir", "{out}", "--dense-epochs", "0", message="dense-epochs must be >= 1"),
        case("demo", "--runs-dir", "{out}", "--dense-epochs", "two", message="invalid int value: 'two'"),
        case("demo", "--runs-dir", "{out}", "--data-dir", "{inp}/nowhere", message="does not exist"),
    ],
    "train": [
        case("train", "{inp}/missing.yaml", "--out", "{out}/run", message="does not exist"),
        case("train", "{inp}/folder.safetensors", "--out", "{out}/run", message="is not a file"),
        case("train", "{inp}/empty.yaml", "--out", "{out}/run", message="is empty"),
        case("train", "{inp}/comments.yaml", "--out", "{out}/run", message="is empty"),
        case("train", "{inp}/list.yaml", "--out", "{out}/run", message="must be a YAML mapping"),
        case("train", "{inp}/broken.yaml", "--out", "{out}/run", message="is not valid YAML at line"),
        case("train", "{inp}/train.yaml", "--out", "{out}/previous.safetensors", message="exists and is not a folder"),
        case("train", "{inp}/train.yaml", "--out", "{out}/run", message=NOT_WRITABLE, **RO_DIR),
        case("train", "{inp}/train.yaml", "--out", "{out}/run", "--nproc", "2", message=READ_ONLY, **RO_FS),
        case("train", "{inp}/train.yaml", "--out", "{out}/run", "--nproc", "0", message="must be >= 1"),
        case("train", "{inp}/train.yaml", "--out", "{out}/run", "--nproc", "two", message="invalid int value"),
        case("train", "{inp}/train.yaml", "--out", "{out}/run", "--quiet", message=NO_SPACE, needs=("data",),
             new_dirs=("run", "run/checkpoints"), **FULL),
        # A failure inside the workers: each rank's DataError, reported once by the agent.
        case("train", "{inp}/train-nodata.yaml", "--out", "{out}/run", "--nproc", "2", "--quiet",
             message="Fashion-MNIST folder", subprocess=True),
    ],
    "prune": [
        case("prune", "{inp}/missing.safetensors", "--out", "{out}/p.safetensors", message="does not exist"),
        case("prune", "{inp}/folder.safetensors", "--out", "{out}/p.safetensors", message="is not a file"),
        case("prune", "{inp}/cut.safetensors", "--out", "{out}/p.safetensors", message="cut.safetensors"),
        case("prune", "{inp}/garbage.safetensors", "--out", "{out}/p.safetensors", message="garbage.safetensors"),
        case("prune", "{inp}/empty.safetensors", "--out", "{out}/p.safetensors", message="empty.safetensors"),
        case("prune", "{inp}/flipped.safetensors", "--out", "{out}/p.safetensors", message="flipped.safetensors"),
        case("prune", "{inp}/notes.txt", "--out", "{out}/p.safetensors", message="notes.txt"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.pt", message="give a file name like 'NAME.safetensors'"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.txt", message="give a file name like 'NAME.safetensors'"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p", message="give a file name like 'NAME.safetensors'"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/existing-dir.safetensors", message="is a folder"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/previous.safetensors", message=NOT_WRITABLE, **RO_DIR),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/previous.safetensors", message=READ_ONLY, **RO_FS),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.safetensors", "--sparsity", "0.5", "--json",
             message=NO_SPACE, **FULL),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--sparsity", "0.5", "--json",
             message=NO_SPACE, **FULL),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--sparsity", "1.5",
             message="sparsity must be in [0, 1)"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--sparsity", "nan", message="sparsity"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--sparsity", "half",
             message="invalid float value: 'half'"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--allocation", "owl",
             message="--allocation owl weighs blocks by Wanda's"),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--method", "wanda", "--allocation", "owl",
             "--calibration-batches", "1", message="in no repeated block: fc1, fc2, fc3", needs=("data",)),
        case("prune", "{inp}/lenet.safetensors", "--out", "{out}/p.sfz", "--score", "snip",
             "--calibration-batches", "0", message="--calibration-batches must be >= 1"),
        case("prune", "{inp}/lm-badconfig", "--out", "{out}/p.sfz", *TEXT, message="config.json is not valid JSON",
             needs=("hf",)),
        case("prune", "{inp}/lm-badweights", "--out", "{out}/p.sfz", *TEXT, message="cannot load the model",
             needs=("hf",)),
        case("prune", "{inp}/lm", "--out", "{out}/p.pt", *TEXT, message="give a folder name or a file name",
             needs=("hf",)),
        case("prune", "{inp}/lm", "--out", "{out}", *TEXT, message="holds other files, not a model folder",
             needs=("hf",)),
        case("prune", "{inp}/lm", "--out", "{out}/pruned", *TEXT, message=NOT_WRITABLE, needs=("hf",), **RO_DIR),
        case("prune", "{inp}/lm", "--out", "{out}/pruned", *TEXT, message=READ_ONLY, needs=("hf",), **RO_FS),
        case("prune", "{inp}/lm", "--out", "{out}/pruned", *TEXT, "--json", message=NO_SPACE, needs=("hf",), **FULL),
        case("prune", "{inp}/lm", "--out", "{out}/p.sfz", "--samples", "0", message="--samples must be >= 1",
             needs=("hf",)),
        case("prune", "{inp}/lm", "--out", "{out}/p.sfz", *TEXT, "--allocation", "owl", "--include", "model.layers.0.*",
             message="form one block (model.layers.0)", needs=("hf",)),
    ],
    "inspect": [
        case("inspect", "{inp}/missing.safetensors", message="does not exist"),
        case("inspect", "{inp}/folder.safetensors", message="is not a file"),
        case("inspect", "{inp}/cut.safetensors", message="cut.safetensors"),
        case("inspect", "{inp}/cut.sfz", message="cut.sfz"),
        case("inspect", "{inp}/garbage.safetensors", message="garbage.safetensors"),
        case("inspect", "{inp}/empty.safetensors", message="empty.safetensors"),
        case("inspect", "{inp}/flipped.safetensors", message="flipped.safetensors"),
        case("inspect", "{inp}/notes.txt", message="notes.txt"),
        case("inspect", "{inp}/lm-badconfig", message="config.json is not valid JSON", needs=("hf",)),
    ],
    "compact": [
        case("compact", "{inp}/lenet.safetensors", "--out", "{out}/c.sfz", message="compact writes a .safetensors"),
        case("compact", "{inp}/lenet.safetensors", "--out", "{out}/c.pt", message="compact writes a .safetensors"),
        case("compact", "{inp}/lenet.safetensors", "--out", "{out}/existing-dir.safetensors", message="is a folder"),
        case("compact", "{inp}/lenet.safetensors", "--out", "{out}/c.safetensors", message=NOT_WRITABLE, **RO_DIR),
        case("compact", "{inp}/lenet.safetensors", "--out", "{out}/c.safetensors", message=READ_ONLY, **RO_FS),
        case("compact", "{inp}/lenet.safetensors", "--out", "{out}/c.safetensors", "--json", message=NO_SPACE, **FULL),
        case("compact", "{inp}/missing.safetensors", "--out", "{out}/c.safetensors", message="does not exist"),
        case("compact", "{inp}/cut.safetensors", "--out", "{out}/c.safetensors", message="cut.safetensors"),
    ],
    "speed": [
        case("speed", "{inp}/missing.safetensors", message="does not exist"),
        case("speed", "{inp}/cut.safetensors", message="cut.safetensors"),
        case("speed", "{inp}/lenet.safetensors", "--batch", "0", message="expected comma-separated positive integers"),
        case("speed", "{inp}/lenet.safetensors", "--tokens", "4", message="only a transformers causal LM generates"),
        case("speed", "{inp}/lenet.safetensors", "--precision", "fp8", message="invalid choice: 'fp8'"),
        case("speed", "{inp}/lenet.safetensors", "--json", "{out}/s.json", message=NOT_WRITABLE, **RO_DIR),
        case("speed", "{inp}/lenet.safetensors", "--json", "{out}/s.json", message=READ_ONLY, **RO_FS),
    ],
    "export": [
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/e.safetensors", message="give a file name like 'NAME.sfz'"),
        case("export", "{inp}/lenet.safetensors", "--format", "safetensors", "--out", "{out}/e.sfz",
             message="give a file name like 'NAME.safetensors'"),
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/e.pt", message="give a file name like 'NAME.sfz'"),
        case("export", "{inp}/lenet.safetensors", "--format", "hf", "--out", "{out}/hf",
             message="save_pretrained needs a transformers model"),
        case("export", "{inp}/lenet.safetensors", "--format", "hf", "--out", "{out}/hf.json",
             message="writes a Hugging Face model folder; give a folder name"),
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/existing-dir.safetensors", "--format", "safetensors",
             message="is a folder"),
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/e.sfz", message=NOT_WRITABLE, **RO_DIR),
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/e.sfz", message=READ_ONLY, **RO_FS),
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/e.sfz", message=NO_SPACE, **FULL),
        case("export", "{inp}/lm", "--format", "hf", "--out", "{out}/hf", message=NO_SPACE, needs=("hf",), **FULL),
        case("export", "{inp}/lenet.safetensors", "--out", "{out}/e.sfz", "--values", "int3",
             message="invalid choice: 'int3'"),
        case("export", "{inp}/cut.sfz", "--out", "{out}/e.sfz", message="cut.sfz"),
        case("export", "{inp}/missing.sfz", "--out", "{out}/e.sfz", message="does not exist"),
    ],
    "quantize": [
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.bin", message="give a file name like 'NAME.sfz'"),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q", message="give a file name like 'NAME.sfz'"),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/existing-dir.safetensors", message="is a folder"),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", message=NOT_WRITABLE, **RO_DIR),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", message=READ_ONLY, **RO_FS),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", "--json", message=NO_SPACE, **FULL),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", "--scheme", "int3",
             message="invalid choice: 'int3'"),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", "--group-size", "0",
             message="group_size must be a positive integer"),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", "--group-size", "7",
             message="not divisible by group_size 7"),
        case("quantize", "{inp}/lenet.safetensors", "--out", "{out}/q.sfz", "--scheme", "gptq-int8",
             "--calibration-batches", "0", message="--calibration-batches must be >= 1"),
        case("quantize", "{inp}/lm.sfz", "--out", "{out}/q.sfz", "--scheme", "gptq-int8", *TEXT,
             message="GPTQ calibrates on text", needs=("hf",)),
        case("quantize", "{inp}/cut.safetensors", "--out", "{out}/q.sfz", message="cut.safetensors"),
    ],
    "merge": [
        case("merge", "{inp}/lenet.safetensors", "--out", "{out}/m.safetensors",
             message="the average of one model is that model"),
        case("merge", "--method", "task_arithmetic", "--base", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors",
             "--out", "{out}/m.safetensors", message="gives that model back unchanged"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--out", "{out}/m.pt",
             message="merge writes a .safetensors file"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--out", "{out}/existing-dir.safetensors",
             message="is a folder"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--out", "{out}/m.safetensors",
             message=NOT_WRITABLE, **RO_DIR),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--out", "{out}/m.safetensors",
             message=READ_ONLY, **RO_FS),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--out", "{out}/m.safetensors", "--quiet",
             message=NO_SPACE, **FULL),
        case("merge", "--recipe", "{inp}/empty.yaml", "--out", "{out}/m.safetensors", message="is empty"),
        case("merge", "--recipe", "{inp}/comments.yaml", message="is empty"),
        case("merge", "--recipe", "{inp}/merge-one.yaml", "--out", "{out}/m.safetensors",
             message="the average of one model is that model"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/missing.safetensors", "--out", "{out}/m.safetensors",
             message="does not exist"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/cut.safetensors", "--out", "{out}/m.safetensors",
             message="cut.safetensors"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/garbage.safetensors", "--out", "{out}/m.safetensors",
             message="garbage.safetensors"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/conv4.safetensors", "--out", "{out}/m.safetensors",
             message="conv4.safetensors"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet.sfz", "--out", "{out}/m.safetensors",
             message="convert it first"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--weights", "-1", "1",
             "--out", "{out}/m.safetensors", message="weights"),
        case("merge", "--method", "ties", "--base", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors",
             "--density", "2", "--out", "{out}/m.safetensors", message="density"),
        case("merge", "{inp}/lenet.safetensors", "{inp}/lenet-b.safetensors", "--out", "{inp}/lenet.safetensors",
             message="is one of the inputs"),
        case("merge", "--out", "{out}/m.safetensors", message="give the model files and --out"),
    ],
}


def _params() -> list:
    out = []
    for command, cases in CASES.items():
        counts: dict[str, int] = {}
        for c in cases:
            kind = c.where.removesuffix("_dir").removesuffix("_fs")
            counts[kind] = counts.get(kind, 0) + 1
            out.append(pytest.param(c, id=f"{command}-{c.where}-{counts[kind]}"))
    return out


# -- shared inputs ---------------------------------------------------------------------------


def _save_zoo(path: Path, name: str, seed: int) -> None:
    from sparseforge.io.checkpoint import save_checkpoint
    from sparseforge.zoo.models import build_model

    torch.manual_seed(seed)
    save_checkpoint(build_model(name), path, arch=name)


def _tiny_lm(folder: Path) -> None:
    from sparseforge.io.hf import save_pretrained
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model, train_tokenizer
    from sparseforge.zoo.text import fortunes

    tokenizer = train_tokenizer(fortunes().calibration[:200], vocab_size=TINY_CONFIG.vocab_size)
    save_pretrained(build_model(TINY_CONFIG, tokenizer), folder, tokenizer)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Good and broken inputs, shared by the cases (which must leave them as they are)."""
    import sparseforge as sf
    from sparseforge.io.checkpoint import load_checkpoint

    inp = tmp_path_factory.mktemp("inputs")
    _save_zoo(inp / "lenet.safetensors", "lenet300", 0)
    _save_zoo(inp / "lenet-b.safetensors", "lenet300", 1)
    _save_zoo(inp / "conv4.safetensors", "conv4", 0)
    model, _ = load_checkpoint(inp / "lenet.safetensors")
    sf.save(model, inp / "lenet.sfz")
    good = (inp / "lenet.safetensors").read_bytes()
    (inp / "cut.safetensors").write_bytes(good[: len(good) * 3 // 5])
    sfz = (inp / "lenet.sfz").read_bytes()
    (inp / "cut.sfz").write_bytes(sfz[: len(sfz) * 3 // 5])
    flipped = bytearray(good)
    flipped[-1001] ^= 0x10  # a weight's byte: the file still parses, its digest does not match
    (inp / "flipped.safetensors").write_bytes(bytes(flipped))
    (inp / "garbage.safetensors").write_bytes(b"this is not a model\n" * 20)
    (inp / "empty.safetensors").write_bytes(b"")
    (inp / "folder.safetensors").mkdir()
    (inp / "notes.txt").write_text("a text file given where a model goes\n")
    (inp / "empty.yaml").write_text("")
    (inp / "comments.yaml").write_text("# a recipe that was never written\n\n")
    (inp / "list.yaml").write_text("- lenet300\n- rigl\n")
    (inp / "broken.yaml").write_text("model: [lenet300\n")
    recipe = {"model": "lenet300", "data": {"limit_train": 128, "limit_test": 64},
              "method": {"name": "gmp", "sparsity": 0.5}, "train": {"epochs": 1, "batch_size": 64}}
    (inp / "train.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    nodata = recipe | {"data": {"dir": str(inp / "no-such-data"), "limit_train": 128, "limit_test": 64}}
    (inp / "train-nodata.yaml").write_text(json.dumps(nodata))
    (inp / "merge-one.yaml").write_text("models: [lenet.safetensors]\nout: merged.safetensors\n")
    if HAVE_HF:
        from sparseforge.io.hf import load_pretrained

        _tiny_lm(inp / "lm")
        for name in ("lm-badconfig", "lm-badweights"):
            (inp / name).mkdir()
            for f in (inp / "lm").iterdir():
                # As a folder from elsewhere (the Hub, another tool) comes: no SHA256SUMS to catch the damage
                # first, so that the reader's own checks are what is tested.
                if f.name != "SHA256SUMS":
                    (inp / name / f.name).write_bytes(f.read_bytes())
        config = (inp / "lm" / "config.json").read_bytes()
        (inp / "lm-badconfig" / "config.json").write_bytes(config[: len(config) // 2])
        weights = (inp / "lm" / "model.safetensors").read_bytes()
        (inp / "lm-badweights" / "model.safetensors").write_bytes(weights[:100])
        lm, _ = load_pretrained(inp / "lm")
        sf.save(lm, inp / "lm.sfz", values="fp32")  # a transformers model without its tokenizer
    return inp


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (its SHA-256) and folder under ``roots``: what 'nothing left behind' compares."""
    seen: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                seen[os.path.join(dirpath, d)] = "folder"
            for f in filenames:
                p = os.path.join(dirpath, f)
                seen[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return seen


@pytest.mark.parametrize("c", _params())
def test_cli_fault(c: Case, inputs: Path, tmp_path: Path, request, capsys, monkeypatch) -> None:
    if "data" in c.needs and not HAVE_DATA:
        pytest.skip(f"Fashion-MNIST is not installed in {DEFAULT_DATA_DIR} (apt-get install dataset-fashion-mnist)")
    if "hf" in c.needs and not HAVE_HF:
        pytest.skip("needs transformers and the fortune texts (pip install 'sparseforge[hf]'; apt-get install fortunes)")
    out: Path = request.getfixturevalue(c.where)
    monkeypatch.chdir(tmp_path)  # a relative default path (runs/...) would land here, and be seen
    argv = [a.format(inp=inputs, out=out) for a in c.argv]
    before = snapshot(tmp_path, inputs)
    if c.subprocess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run([sys.executable, "-m", "sparseforge", *argv], capture_output=True, text=True, env=env,
                             timeout=300)
        status, err = res.returncode, res.stderr
    else:
        status = main(argv)
        err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparseforge: error: "), err
    assert c.message in lines[0], lines[0]
    after = snapshot(tmp_path, inputs)
    allowed = {str(out / d) for d in c.new_dirs}
    new = {p: v for p, v in after.items() if p not in before and not (p in allowed and v == "folder")}
    changed = {p for p in before if after.get(p) != before[p]}
    assert not new and not changed, f"left behind: {sorted(new)}; changed or removed: {sorted(changed)}"


def test_the_table_covers_every_command() -> None:
    from sparseforge.cli import COMMANDS

    assert set(CASES) == set(COMMANDS)
    for command, cases in CASES.items():
        writers = command not in ("inspect",)
        # speed writes only its optional JSON table, a few KiB: it fits the 64 KiB full_fs, so no full_fs case
        full = set() if command == "speed" else {"full_fs"}
        if writers:  # every command that writes meets a read-only folder, a read-only and a full file system
            assert {"readonly_dir", "readonly_fs"} | full <= {c.where for c in cases}, command


# -- what the fixes added besides errors --------------------------------------------------------


def test_rtn_counts_kept_weights_rounded_to_zero_exactly() -> None:
    from sparseforge.quant.rtn import quantize_, quantize_weight, rounded_to_zero

    # Per channel, int8: step = max|w| / 127. Row 0: step 1/127, so |w| < 0.5/127 ~ 0.003937 rounds to 0
    # (0.0039 does, 0.004 does not; 0.0 was pruned and is not counted). Row 1: step 2/127: 0.0078 does.
    w = torch.tensor([[1.0, 0.0039, -0.0039, 0.004, 0.0, 0.5],
                      [-2.0, 0.0078, 0.0079, 0.0, 0.0, 0.0]])
    qt = quantize_weight(w, bits=8)
    assert qt.rounded_to_zero == 3
    assert int(((w != 0) & (qt.dequantize() == 0)).sum()) == 3
    layer = torch.nn.Linear(6, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0.001], [0.0, 1.0]]))  # 0.001 < 0.5/127: one more
    quantize_(model, "int8")
    assert rounded_to_zero(model) == 4
    with torch.no_grad():
        model[2].weight.add_(1.0)  # no longer what was quantized: its record no longer counts
    assert rounded_to_zero(model) == 3


def test_gptq_report_counts_what_became_zero(capsys) -> None:
    from sparseforge.quant import gptq_, rounded_to_zero

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:, ::2] *= 1e-3  # small kept weights, many of which round to zero at int4
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rep = gptq_(model, [torch.randn(64, 16) for _ in range(2)], "gptq-int4")
    counts = {n: int(((before[n] != 0) & (m.weight == 0)).sum()) for n, m in model.named_modules() if n in before}
    assert counts["0"] > 0
    assert {n: int(v["rounded_to_zero"]) for n, v in rep.layers.items()} == counts
    assert rounded_to_zero(model) == sum(counts.values())


def test_cli_quantize_prints_and_stores_the_count(inputs: Path, tmp_path: Path, capsys) -> None:
    from sparseforge.io.checkpoint import load_checkpoint
    from sparseforge.io.sfz import load_sfz

    out = tmp_path / "q.sfz"
    assert main(["quantize", str(inputs / "lenet.safetensors"), "--scheme", "int4", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    source, _ = load_checkpoint(inputs / "lenet.safetensors")
    quantized, meta = load_sfz(out)
    expected = sum(int(((a != 0) & (b == 0)).sum()) for (n, a), (_, b)
                   in zip(source.state_dict().items(), quantized.state_dict().items()) if n.endswith("weight"))
    assert expected > 0 and result["rounded_to_zero"] == expected
    assert meta["extra"]["quantized"]["rounded_to_zero"] == expected
    assert main(["quantize", str(inputs / "lenet.safetensors"), "--out", str(tmp_path / "q8.safetensors")]) == 0
    assert "kept weights rounded to exactly zero" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_HF, reason="needs transformers and the fortune texts")
def test_rtn_on_a_model_without_tokenizer_skips_only_the_quality_report(inputs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q.sfz"
    assert main(["quantize", str(inputs / "lm.sfz"), "--scheme", "int8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "no quality report" in captured.out and "--tokenizer" in captured.out and captured.err == ""
    assert out.is_file()


def test_report_never_truncates_layer_names(monkeypatch) -> None:
    from sparseforge.report import report

    names = [f"encoder_layer_0_attention_self_{k}_projection_of_a_rather_long_model" for k in ("query", "key", "value")]
    model = torch.nn.Module()
    for n in names:
        model.add_module(n, torch.nn.Linear(4, 4))
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: the names wrap inside their cell
    text = str(report(model))
    assert "…" not in text
    rows = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert all(n in rows for n in names)
    monkeypatch.setenv("COLUMNS", "250")  # a wide one: each name whole on its line
    text = str(report(model))
    assert all(any(n in line for line in text.splitlines()) for n in names)


def test_single_model_merges_that_change_the_model_are_accepted(inputs: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, ft = inputs / "lenet.safetensors", inputs / "lenet-b.safetensors"
    half = tmp_path / "half.safetensors"
    assert main(["merge", "--method", "task_arithmetic", "--base", str(base), str(ft), "--lambda", "0.5",
                 "--out", str(half), "--quiet"]) == 0
    a, b, m = load_file(base), load_file(ft), load_file(half)
    assert torch.allclose(m["fc1.weight"], (a["fc1.weight"] + b["fc1.weight"]) / 2, atol=1e-6)
    assert main(["merge", "--method", "ties", "--base", str(base), str(ft), "--out", str(tmp_path / "t.safetensors"),
                 "--quiet"]) == 0


def test_prune_without_method_writes_the_format_its_out_names(inputs: Path, tmp_path: Path, capsys) -> None:
    from sparseforge.io.sfz import is_sfz

    out = tmp_path / "p.sfz"
    assert main(["prune", str(inputs / "lenet.safetensors"), "--sparsity", "0.5", "--out", str(out), "--json"]) == 0
    assert is_sfz(out)


# -- the one place that turns OS failures into errors -------------------------------------------------


def test_atomic_writes_report_a_read_only_file_system_by_themselves(readonly_fs: Path) -> None:
    """Without the CLI's checks before the work: the writer itself names the path and the reason."""
    from sparseforge.errors import SparseforgeError
    from sparseforge.files import write_json_atomic

    with pytest.raises(SparseforgeError, match=r"cannot write .*metrics\.json: read-only file system"):
        write_json_atomic(readonly_fs / "metrics.json", {"a": 1})
    assert sorted(p.name for p in readonly_fs.iterdir()) == ["existing-dir.safetensors", "previous.safetensors"]


def test_only_failures_of_the_machine_become_one_line_errors(tmp_path: Path) -> None:
    import errno

    from sparseforge.errors import SparseforgeError
    from sparseforge.oserrors import write_errors, write_failure_reason

    class SafetensorError(Exception):  # matched by name, as safetensors' Rust exception is
        pass

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure_reason(full) == "no space left on device: free some space or write elsewhere"
    assert write_failure_reason(SafetensorError("Error while serializing: header too large")) is None
    with pytest.raises(SparseforgeError, match="cannot write x.pt: no space left"):
        with write_errors("x.pt"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("unexpected pos 704 vs 598") from None  # what torch.save raises then
    for bug in (ValueError("a bug"), OSError(errno.ENOENT, "No such file"), KeyError("k")):
        with pytest.raises(type(bug)) as info:
            with write_errors("x.pt"):
                raise bug
        assert info.value is bug  # passed through untouched, traceback and all


def test_the_agent_reports_the_first_rank_that_wrote_its_error(tmp_path: Path) -> None:
    from sparseforge.distributed.torchrun import first_error

    assert first_error(tmp_path) is None
    (tmp_path / "rank-00001.txt").write_text("sparseforge: error: first\n")
    (tmp_path / "rank-00000.txt").write_text("sparseforge: error: second\n")
    os.utime(tmp_path / "rank-00001.txt", ns=(1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "rank-00000.txt", ns=(2_000_000_000, 2_000_000_000))
    assert first_error(tmp_path) == "sparseforge: error: first"
