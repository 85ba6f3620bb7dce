"""Corruption sweep over every format sparseforge writes: truncations and single-bit flips.

Each format is written once (module fixtures), then damaged one way at a
time and read back by the project's own reader:

- truncated at every tensor boundary and at points inside the header (and,
  for JSON files, at points through the file): the reader must raise a
  :class:`SparseforgeError` (never half-read a file, never another exception);
- one bit flipped at seeded random offsets of the header and of the data:
  the reader must either raise a :class:`SparseforgeError` or return exactly
  what it returns for the undamaged file (tensors bit for bit, and every piece
  of metadata it hands on). A flip that changes a weight or a piece of
  metadata and loads is the failure this suite exists to catch.

Formats: checkpoint ``.safetensors``; ``.sfz`` with fp32, fp16, int8 and int4
values and with recorded int4 codes (group size 4, ``quantize_``); a merged
checkpoint (``merge_files``); an adapter folder (``adapter.safetensors`` and
``adapter.json``); a training checkpoint as ``sparseforge train`` writes it
(``torch.save`` zip with the content digest); a Hugging Face folder from ``save_pretrained`` (tiny
Llama built from a config, no download; skipped without transformers). Files
written before the header digest (built here as the old code wrote them)
still load, and are checked for the wording of their errors.

The counts (the ``SWEEP`` plan) go into docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparseforge as sf
from sparseforge.errors import SparseforgeError
from sparseforge.formats import HEADER_DIGEST
from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.io.sfz import read_sfz
from sparseforge.merge.streaming import merge_files
from sparseforge.quant import quantize_
from sparseforge.zoo import build_model

HEADER_FLIPS = 24  # per safetensors file: bits flipped at random offsets of the header
DATA_FLIPS = 12  # per safetensors file: bits flipped at random offsets of the tensor data
JSON_FLIPS = 12  # per JSON/text file of a folder format
PT_FLIPS = 64  # per training checkpoint (torch.save zip)
SEED = 20


# -- the formats ------------------------------------------------------------------------------

def _pruned(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("lenet300")
    sf.prune(model, sparsity=0.9)
    return model


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@dataclass
class Format:
    """A written artifact: its folder, the files of it to damage, and how the project reads it back."""

    name: str
    folder: Path
    files: list[str]
    read: Callable[[Path], Any]  # folder -> everything the reader hands on (compared with _same)


def _checkpoint_read(name: str) -> Callable[[Path], Any]:
    def read(folder: Path) -> Any:
        model, meta = load_checkpoint(folder / name)
        return model.state_dict(), meta
    return read


def _sfz_read(folder: Path) -> Any:
    state, meta, quant = read_sfz(folder / "m.sfz")
    meta = {k: v for k, v in meta.items() if k != "file_bytes"}
    sf.load(folder / "m.sfz")  # and the model is rebuilt from the metadata
    return state, meta, {k: (q.q, q.scale, q.bits, q.group_size, q.shape, q.method) for k, q in quant.items()}


def _adapter_read(folder: Path) -> Any:
    base = _mlp()
    report = sf.peft.load_adapter(base, folder)
    return base.state_dict(), report.layers


def _hf_read(folder: Path) -> Any:
    from sparseforge.io.hf import load_pretrained

    model, _ = load_pretrained(folder)
    return model.state_dict(), model.config.to_dict()


def _write_formats(root: Path) -> list[Format]:
    formats = []
    ck = root / "checkpoint"
    save_checkpoint(_pruned(), ck / "m.safetensors", extra={"note": "sweep", "accuracy": 88.5})
    formats.append(Format("checkpoint", ck, ["m.safetensors"], _checkpoint_read("m.safetensors")))
    for values in ("fp32", "fp16", "int8", "int4"):
        folder = root / f"sfz-{values}"
        sf.save(_pruned(), folder / "m.sfz", values=values, extra={"values": values})
        formats.append(Format(f"sfz-{values}", folder, ["m.sfz"], _sfz_read))
    quantized = quantize_(_pruned(), scheme="int4", group_size=4)
    sf.save(quantized, root / "sfz-quantized" / "m.sfz", values="int8")
    formats.append(Format("sfz-quantized", root / "sfz-quantized", ["m.sfz"], _sfz_read))
    merged = root / "merged"
    inputs = [save_checkpoint(_pruned(s), root / "inputs" / f"{s}.safetensors") for s in (1, 2)]
    merge_files(inputs, merged / "m.safetensors", weights=[0.25, 0.75])
    formats.append(Format("merged", merged, ["m.safetensors"], _checkpoint_read("m.safetensors")))
    model = _mlp()
    sf.peft.apply(model, sf.peft.PaCA(rank=4, seed=3))
    with torch.no_grad():
        for p in sf.peft.trainable_parameters(model):
            p.add_(torch.randn_like(p))  # trained adapters are not the initial ones
    sf.peft.save_adapter(model, root / "adapter")
    formats.append(Format("adapter", root / "adapter", ["adapter.safetensors", "adapter.json"], _adapter_read))
    formats.append(_training_checkpoint(root / "train"))
    try:
        import transformers  # noqa: F401
    except ImportError:
        return formats
    from sparseforge.io.hf import save_pretrained
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model as build_lm

    lm = build_lm(TINY_CONFIG)
    sf.prune(lm, sparsity=0.5)
    save_pretrained(lm, root / "hf", metadata={"method": "magnitude"})
    formats.append(Format("hf-folder", root / "hf", ["model.safetensors", "config.json", "sparseforge.json",
                                                      "SHA256SUMS"], _hf_read))
    return formats


def _training_checkpoint(folder: Path) -> Format:
    """A training checkpoint as `sparseforge train` writes it (torch.save of the payload with its digest)."""
    from sparseforge.training.checkpoint import (
        CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_training_checkpoint, state_digest,
    )

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sf.Sparsifier(model, sf.methods.RigL(0.8, frequency=1, seed=2), total_steps=4, optimizer=opt)
    for _ in range(2):
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
               "optimizer": opt.state_dict(), "sparsifier": sp.state_dict(), "step": 2,
               "rng": [{"torch": torch.get_rng_state()}], "history": [{"epoch": 1, "loss": 0.5}]}
    payload["sha256"] = state_digest(payload)
    folder.mkdir(parents=True)
    torch.save(payload, folder / "step-00000002.pt")
    return Format("training-checkpoint", folder, ["step-00000002.pt"],
                  lambda f: load_training_checkpoint(f / "step-00000002.pt", torch.device("cpu")))


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Format]:
    torch.set_num_threads(1)  # tiny models: a contended pool only slows them
    return {f.name: f for f in _write_formats(tmp_path_factory.mktemp("formats"))}


FORMAT_NAMES = ["checkpoint", "sfz-fp32", "sfz-fp16", "sfz-int8", "sfz-int4", "sfz-quantized", "merged", "adapter",
                "training-checkpoint", "hf-folder"]


def _format(formats: dict[str, Format], name: str) -> Format:
    if name not in formats:
        pytest.skip(f"{name}: transformers is not installed")
    return formats[name]


# -- damage -----------------------------------------------------------------------------------

def _layout(data: bytes) -> tuple[int, dict[str, Any]]:
    """(header length N, parsed header) of a safetensors file: the data start at 8 + N."""
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def truncation_points(name: str, data: bytes) -> list[int]:
    """Where to cut: every tensor boundary and points inside the header (safetensors), or through the file (JSON)."""
    if name.endswith((".safetensors", ".sfz")):
        n, header = _layout(data)
        points = {0, 1, 4, 7, 8, 9, 8 + n // 3, 8 + n // 2, 8 + 2 * n // 3, 8 + n - 1}
        for key, info in header.items():
            if key != "__metadata__":
                points |= {8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1]}
        points.add(len(data) - 1)
    else:  # the last point cuts the last character that is not the final newline (without it, the same JSON)
        points = {0, 1, len(data) // 4, len(data) // 2, 3 * len(data) // 4, len(data.rstrip()) - 1}
    return sorted(p for p in points if p < len(data))


def flip_offsets(name: str, data: bytes, rng: random.Random) -> list[tuple[str, int, int]]:
    """(region, byte offset, bit) of the flips in one file: its header and data (safetensors), or anywhere (text)."""
    if name.endswith((".safetensors", ".sfz")):
        n, _ = _layout(data)
        header = [("header", rng.randrange(8 + n), rng.randrange(8)) for _ in range(HEADER_FLIPS)]
        body = [("data", rng.randrange(8 + n, len(data)), rng.randrange(8)) for _ in range(DATA_FLIPS)]
        return header + body
    if name.endswith(".pt"):  # a zip of a pickle and the tensors' storages, no header of ours
        return [("zip", rng.randrange(len(data)), rng.randrange(8)) for _ in range(PT_FLIPS)]
    return [("text", rng.randrange(len(data)), rng.randrange(8)) for _ in range(JSON_FLIPS)]


def _same(a: Any, b: Any) -> bool:
    """Equal all the way down: tensors bit for bit (dtype and shape too), everything else with ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _outcome(fmt: Format, reference: Any) -> str:
    """'detected' (SparseforgeError), 'same' (loads exactly as the original), or what went wrong."""
    try:
        got = fmt.read(fmt.folder)
    except SparseforgeError:
        return "detected"
    except Exception as e:  # noqa: BLE001 - any other exception type is a failure of the reader
        return f"{type(e).__name__}: {str(e)[:200]}"
    return "same" if _same(got, reference) else "SILENTLY DIFFERENT"


def _sweep(fmt: Format, damages: Callable[[str, bytes], list[tuple[str, bytes]]]) -> tuple[dict[str, int], list[str]]:
    """Apply each damage to its file, read, restore; returns (counts by outcome, failures)."""
    reference = fmt.read(fmt.folder)
    assert _same(fmt.read(fmt.folder), reference), "an undamaged file must read the same twice"
    counts: dict[str, int] = {}
    failures = []
    for file in fmt.files:
        path = fmt.folder / file
        original = path.read_bytes()
        try:
            for label, damaged in damages(file, original):
                path.write_bytes(damaged)
                outcome = _outcome(fmt, reference)
                counts[outcome] = counts.get(outcome, 0) + 1
                if outcome not in ("detected", "same"):
                    failures.append(f"{fmt.name}/{file} {label}: {outcome}")
                elif outcome == "same" and label.startswith("truncated"):
                    failures.append(f"{fmt.name}/{file} {label}: a truncated file loaded")
        finally:
            path.write_bytes(original)
    assert _same(fmt.read(fmt.folder), reference)
    return counts, failures


# -- the sweep --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_truncation_is_an_error(formats, name: str) -> None:
    fmt = _format(formats, name)

    def cuts(file: str, data: bytes) -> list[tuple[str, bytes]]:
        return [(f"truncated at {p}/{len(data)}", data[:p]) for p in truncation_points(file, data)]

    counts, failures = _sweep(fmt, cuts)
    assert not failures, "\n".join(failures)
    assert set(counts) == {"detected"} and counts["detected"] >= 6 * len(fmt.files)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_flip_is_detected_or_harmless(formats, name: str) -> None:
    fmt = _format(formats, name)
    rng = random.Random(f"{SEED}-{name}")

    def flips(file: str, data: bytes) -> list[tuple[str, bytes]]:
        out = []
        for region, offset, bit in flip_offsets(file, data, rng):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            out.append((f"{region} byte {offset} bit {bit}", bytes(damaged)))
        return out

    counts, failures = _sweep(fmt, flips)
    assert not failures, "\n".join(failures)
    # Most flips change something that matters; a sweep where nothing was detected tests nothing.
    assert counts.get("detected", 0) > counts.get("same", 0)


def test_every_data_flip_of_a_weight_is_named(formats) -> None:
    """A flipped byte in a tensor's data is reported as that tensor's checksum, not as anything vaguer."""
    fmt = formats["checkpoint"]
    path = fmt.folder / "m.safetensors"
    data = path.read_bytes()
    n, header = _layout(data)
    try:
        for key, info in header.items():
            if key == "__metadata__" or info["data_offsets"][0] == info["data_offsets"][1]:
                continue
            damaged = bytearray(data)
            damaged[8 + n + info["data_offsets"][0]] ^= 0x01
            path.write_bytes(bytes(damaged))
            with pytest.raises(SparseforgeError, match=rf"tensor '{key}' does not match its checksum"):
                read_checkpoint(path)
    finally:
        path.write_bytes(data)


# -- files written before the header digest ---------------------------------------------------

def _as_legacy(path: Path, out: Path, edit: Callable[[dict[str, str]], None] | None = None) -> Path:
    """``path`` rewritten as the code before the header digest wrote it: safetensors' save_file, no digest."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != HEADER_DIGEST}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit:
        edit(meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_files_without_a_header_digest_still_load(formats, tmp_path) -> None:
    ck = formats["checkpoint"].folder / "m.safetensors"
    legacy = _as_legacy(ck, tmp_path / "old.safetensors")
    state, meta = read_checkpoint(legacy)
    assert _same((state, meta), read_checkpoint(ck))
    for name in ("sfz-int8", "sfz-quantized"):
        new = formats[name].folder / "m.sfz"
        old = _as_legacy(new, tmp_path / f"{name}.sfz")
        a, b = read_sfz(old), read_sfz(new)
        assert _same(a[0], b[0]) and _same({k: v for k, v in a[1].items() if k != "file_bytes"},
                                           {k: v for k, v in b[1].items() if k != "file_bytes"})
    adapter = tmp_path / "adapter"
    shutil.copytree(formats["adapter"].folder, adapter)
    meta = json.loads((adapter / "adapter.json").read_text())
    del meta["sha256"]
    (adapter / "adapter.json").write_text(json.dumps(meta))
    assert _same(_adapter_read(adapter), _adapter_read(formats["adapter"].folder))


def test_old_files_get_the_corruption_words(formats, tmp_path) -> None:
    sfz = formats["sfz-fp16"].folder / "m.sfz"

    def flip_encoding(meta: dict[str, str]) -> None:
        header = json.loads(meta["sfz"])
        header["tensors"]["fc1.weight"]["encoding"] = "bitm`sk"  # what one flipped bit makes of "bitmask"
        meta["sfz"] = json.dumps(header)

    bad = _as_legacy(sfz, tmp_path / "enc.sfz", flip_encoding)
    with pytest.raises(SparseforgeError, match=r"enc.sfz is corrupted: tensor 'fc1.weight' has an unknown encoding "
                                               r"'bitm`sk'; write the file again"):
        sf.load(bad)

    def flip_raw(meta: dict[str, str]) -> None:
        header = json.loads(meta["sfz"])
        header["tensors"]["fc1.bias"]["encoding"] = "rav"
        meta["sfz"] = json.dumps(header)

    with pytest.raises(SparseforgeError, match="is corrupted: tensor 'fc1.bias' has an unknown encoding 'rav'"):
        sf.load(_as_legacy(sfz, tmp_path / "raw.sfz", flip_raw))
    renamed = _as_legacy(formats["checkpoint"].folder / "m.safetensors", tmp_path / "key.safetensors",
                         lambda m: m.update(exvra=m.pop("extra")))
    with pytest.raises(SparseforgeError, match=r"key.safetensors is corrupted: its metadata holds entries no "
                                               r"sparseforge writes \('exvra'\)"):
        read_checkpoint(renamed)
    version = _as_legacy(formats["checkpoint"].folder / "m.safetensors", tmp_path / "v.safetensors",
                         lambda m: m.update(format_version="q"))
    with pytest.raises(SparseforgeError, match="v.safetensors is corrupted: its format version 'q' is not a number"):
        read_checkpoint(version)


def test_metadata_flip_reads_as_corrupted_and_newer_versions_as_newer(formats, tmp_path) -> None:
    """The words: a changed metadata byte is 'corrupted'; only a higher format version says 'upgrade'."""
    sfz = formats["sfz-fp16"].folder / "m.sfz"
    data = sfz.read_bytes()
    at = data.index(b'bitmask') + len(b'bitm')  # in the header JSON's "sfz" string
    damaged = bytearray(data)
    damaged[at] ^= 0x01  # 'a' -> '`': bitm`sk
    (tmp_path / "flip.sfz").write_bytes(bytes(damaged))
    with pytest.raises(SparseforgeError, match=r"flip.sfz is corrupted: its metadata does not match its checksum"):
        sf.load(tmp_path / "flip.sfz")
    extra = bytearray(formats["checkpoint"].folder.joinpath("m.safetensors").read_bytes())
    at = bytes(extra).index(b"88.5")
    extra[at] ^= 0x01  # the recorded accuracy 88.5 -> 98.5
    (tmp_path / "extra.safetensors").write_bytes(bytes(extra))
    with pytest.raises(SparseforgeError, match="extra.safetensors is corrupted: its metadata does not match"):
        read_checkpoint(tmp_path / "extra.safetensors")

    from sparseforge.formats import CHECKPOINT_VERSION as FORMAT_VERSION, seal_metadata

    with safe_open(str(sfz), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = str(FORMAT_VERSION + 1)
    save_file(tensors, str(tmp_path / "newer.sfz"), metadata=meta)  # a digest this version cannot check
    with pytest.raises(SparseforgeError, match="upgrade sparseforge"):
        sf.load(tmp_path / "newer.sfz")
    save_file(tensors, str(tmp_path / "newer2.sfz"), metadata=seal_metadata(meta, tensors))
    with pytest.raises(SparseforgeError, match="upgrade sparseforge"):
        sf.load(tmp_path / "newer2.sfz")


def test_training_checkpoint_is_named_as_such(tmp_path) -> None:
    """A torch.save training checkpoint given where a model file belongs: say what it is and what to pass."""
    from sparseforge.training.checkpoint import CHECKPOINT_FORMAT

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000008.pt"
    step.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": _mlp().state_dict()}, step)
    for reader in (read_checkpoint, read_sfz, lambda p: merge_files([p, p], tmp_path / "o.safetensors")):
        with pytest.raises(SparseforgeError, match=r"is a training checkpoint written by `sparseforge train`.*"
                                                   r"pass the run folder's model.safetensors") as e:
            reader(step)
        assert "corrupted" not in str(e.value) and "\n" not in str(e.value)
    save_checkpoint(_mlp(), run / "model.safetensors", arch="", arch_kwargs={})
    with pytest.raises(SparseforgeError, match=rf"model.safetensors instead \({run / 'model.safetensors'}\)"):
        read_checkpoint(step)
    other = tmp_path / "weights.pt"
    torch.save(_mlp().state_dict(), other)
    with pytest.raises(SparseforgeError, match="weights.pt is a PyTorch file written by torch.save"):
        read_checkpoint(other)
    legacy = tmp_path / "legacy.pt"
    torch.save(_mlp().state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(SparseforgeError, match="legacy.pt is a PyTorch file written by torch.save"):
        read_sfz(legacy)
