"""One sf.save / sf.load over every file format (sparseforge.formats.FORMATS).

Round trips through sf.save and sf.load in each built-in format (plain
checkpoints, .sfz, Hugging Face folders of tiny random BERT and LLaMA
models, adapters) give bit-identical tensors; reading tells the format from
the content, not the name; wrong, unknown and damaged files are clear errors;
and a format a user registers from outside the package is written and read
by the same two calls, and offered by the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.cli import main
from sparseforge.errors import SparseforgeError
from sparseforge.formats import FORMATS, FileFormat, get_format
from sparseforge.io import load_with_metadata
from sparseforge.pipelines import export_formats, load_any
from sparseforge.zoo import build_model

from conftest import build_mlp


def _pruned(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("lenet300")
    sf.prune(model, sparsity=0.8)
    return model


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# -- the registry ----------------------------------------------------------------------------


def test_every_built_in_format_is_registered_by_importing_any_part_of_sparseforge() -> None:
    code = "import sparseforge.formats as f; print(','.join(f.FORMATS.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == ["checkpoint", "sfz", "hf", "adapter"]
    assert get_format("safetensors")[0] == "checkpoint"  # the CLI's old name for it
    assert export_formats() == ("checkpoint", "safetensors", "sfz", "hf")  # adapters hold no whole model


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options", "fmt"), [("m.safetensors", {}, "checkpoint"),
                                                      ("m.sfz", {"values": "fp32"}, "sfz")])
def test_file_round_trips_are_bit_identical(tmp_path, name, options, fmt) -> None:
    model = _pruned()
    path = sf.save(model, tmp_path / name, extra={"note": "kept"}, **options)
    loaded, meta = load_with_metadata(path)  # no model given: rebuilt from the file
    _same_state(model, loaded)
    assert meta["format"] == fmt and meta["arch"] == "lenet300" and meta["extra"] == {"note": "kept"}
    into = build_model("lenet300")
    assert sf.load(path, into) is into
    _same_state(model, into)


def test_options_reach_the_writer(tmp_path) -> None:
    model = _pruned()
    int8 = sf.save(model, tmp_path / "q.sfz", values="int8")
    meta = load_with_metadata(int8)[1]
    assert {info["values"] for info in meta["tensors"].values() if "values" in info} == {"int8"}


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config).eval()


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_llama], ids=["bert", "llama"])
def test_hf_folder_round_trip_is_bit_identical(tmp_path, build) -> None:
    pytest.importorskip("transformers")
    model = build()
    sf.prune(model, sparsity=0.5)
    folder = sf.save(model, tmp_path / "model", extra={"pruned": 0.5})  # a folder: the model is a transformers one
    assert (folder / "config.json").is_file() and (folder / "SHA256SUMS").is_file()
    loaded, meta = load_with_metadata(folder)
    assert type(loaded) is type(model) and meta["format"] == "hf" and meta["extra"] == {"pruned": 0.5}
    _same_state(model, loaded)
    into = build()
    assert sf.load(folder, into) is into
    _same_state(model, into)


def test_adapter_round_trip_needs_the_base_and_is_bit_identical(tmp_path) -> None:
    model = build_mlp()
    sf.peft.apply(model, sf.peft.PaCA(rank=4, seed=3))
    with torch.no_grad():
        for p in sf.peft.trainable_parameters(model):
            p.add_(torch.randn_like(p))  # trained, as far as the file can tell
    folder = sf.save(model, tmp_path / "adapter")  # a folder: the model carries adapters
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    with pytest.raises(SparseforgeError, match=r"is an adapter: .*pass the base model .*model=base"):
        sf.load(folder)
    fresh = build_mlp()
    loaded, meta = load_with_metadata(folder, fresh)
    assert loaded is fresh and meta["format"] == "adapter" and meta["report"].layers == ["0", "2", "5"]
    _same_state(model, fresh)
    again = build_mlp()
    sf.load(folder / "adapter.safetensors", again)  # its weights file names the adapter too
    _same_state(model, again)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)) and torch.equal(again(x), model(x))


# -- telling formats apart ---------------------------------------------------------------------


def test_formats_are_detected_by_content_not_by_name(tmp_path) -> None:
    model = _pruned()
    ckpt = sf.save(model, tmp_path / "model.bin", format="checkpoint")
    loaded, meta = load_with_metadata(ckpt)
    assert meta["format"] == "checkpoint"
    _same_state(model, loaded)
    sfz = sf.save(model, tmp_path / "model.safetensors", format="sfz", values="fp32")
    loaded, meta = load_with_metadata(sfz)
    assert meta["format"] == "sfz" and "tensors" in meta
    _same_state(model, loaded)
    assert load_any(str(ckpt))[1]["format"] == "checkpoint"  # the CLI's reader is the same one


def test_format_given_but_content_is_another(tmp_path) -> None:
    path = sf.save(_pruned(), tmp_path / "m.safetensors")
    with pytest.raises(SparseforgeError, match=r"is a plain sparseforge checkpoint \(format 'checkpoint'\), not an "
                                               r"sfz file \(format 'sfz'\): pass format='checkpoint'"):
        sf.load(path, format="sfz")
    assert sf.load(path, format="safetensors") is not None  # its alias is the same format


def test_unknown_formats_and_names_are_clear_errors(tmp_path) -> None:
    junk = tmp_path / "notes.dat"
    junk.write_bytes(b"plain text, no model here\n" * 10)
    with pytest.raises(SparseforgeError, match=r"notes.dat is in none of the file formats sparseforge reads "
                                               r"\(known formats: checkpoint .*, sfz .*, hf .*, adapter .*\)"):
        sf.load(junk)
    pickled = tmp_path / "model.pt"
    torch.save(build_mlp().state_dict(), pickled)
    with pytest.raises(SparseforgeError, match=r"is a PyTorch file written by torch.save.*\(known formats: checkpoint"):
        sf.load(pickled)
    with pytest.raises(SparseforgeError, match="does not exist"):
        sf.load(tmp_path / "absent.sfz")
    with pytest.raises(SparseforgeError, match=r"unknown file format 'szf'; did you mean 'sfz'\?"):
        sf.save(_pruned(), tmp_path / "m.sfz", format="szf")
    with pytest.raises(SparseforgeError, match=r"cannot tell which format to write .*m.pt in from its name: give a "
                                               r"name ending in .safetensors, .sfz"):
        sf.save(_pruned(), tmp_path / "m.pt")
    with pytest.raises(SparseforgeError, match=r"the sfz writer takes no option 'valuez'; did you mean 'values'\?"):
        sf.save(_pruned(), tmp_path / "m.sfz", valuez="int8")
    path = sf.save(_pruned(), tmp_path / "m.safetensors")
    with pytest.raises(SparseforgeError, match=r"the checkpoint reader takes no option 'strict' \(its options: none\)"):
        sf.load(path, strict=False)
    sfz = sf.save(_pruned(), tmp_path / "m.sfz")
    with pytest.raises(SparseforgeError, match=r"the sfz reader .* takes no option 'bogus'"):
        sf.load(sfz, bogus=True)


def test_a_detect_that_raises_is_named(tmp_path) -> None:
    class Broken(FileFormat):
        name = "broken-detect"

        def detect(self, path):
            raise RuntimeError("boom")

    path = sf.save(_pruned(), tmp_path / "m.safetensors")
    FORMATS.register(Broken())
    try:
        with pytest.raises(SparseforgeError, match=r"file format 'broken-detect' failed to tell whether .* "
                                                   r"\(RuntimeError: boom\)"):
            sf.load(path)
    finally:
        FORMATS.unregister("broken-detect")
    assert sf.load(path) is not None


def test_a_folder_two_formats_could_be_asks_which(tmp_path) -> None:
    pytest.importorskip("transformers")
    model = _tiny_bert()
    sf.peft.apply(model, sf.peft.LoRA(rank=2, targets=["query"]))
    with pytest.raises(SparseforgeError, match=r"can be written as a Hugging Face model folder or as a sparseforge "
                                               r"adapter folder: pass format='hf' or format='adapter'"):
        sf.save(model, tmp_path / "both")
    base = sf.save(_tiny_bert(), tmp_path / "base")
    sf.save(model, base, format="adapter")  # the adapter beside the base model's files
    with pytest.raises(SparseforgeError, match="holds a Hugging Face model folder and a sparseforge adapter folder"):
        sf.load(base)
    fresh = sf.load(base, format="hf")
    sf.load(base, fresh, format="adapter")
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(fresh(x).last_hidden_state, model(x).last_hidden_state)


# -- damaged files -----------------------------------------------------------------------------


def test_a_flipped_byte_is_detected_in_every_format(tmp_path) -> None:
    model = _pruned()
    for name in ("m.safetensors", "m.sfz"):
        path = sf.save(model, tmp_path / name)
        _flip(path, path.stat().st_size - 5)  # inside the last tensor's bytes
        with pytest.raises(SparseforgeError, match=rf"{name} is corrupted: tensor .* does not match its checksum"):
            sf.load(path)
    header = sf.save(model, tmp_path / "h.safetensors")
    data = header.read_bytes()
    _flip(header, data.index(b"lenet300") + 2)  # the architecture name in the header
    with pytest.raises(SparseforgeError, match="h.safetensors is corrupted: its metadata does not match its checksum"):
        sf.load(header)
    adapted = build_mlp()
    sf.peft.apply(adapted, sf.peft.LoRA(rank=2))
    folder = sf.save(adapted, tmp_path / "adapter")
    _flip(folder / "adapter.safetensors", (folder / "adapter.safetensors").stat().st_size - 3)
    with pytest.raises(SparseforgeError, match="does not match its recorded shape and SHA-256"):
        sf.load(folder, build_mlp())


def test_a_flipped_byte_in_a_hf_folder_is_detected(tmp_path) -> None:
    pytest.importorskip("transformers")
    folder = sf.save(_tiny_bert(), tmp_path / "bert")
    weights = folder / "model.safetensors"
    _flip(weights, weights.stat().st_size - 5)
    with pytest.raises(SparseforgeError, match="model.safetensors does not match its checksum in SHA256SUMS"):
        sf.load(folder)


# -- a user's format ---------------------------------------------------------------------------

PLUGIN = '''
"""A user's file format: a JSON file of the state dict (float32 values written exactly), registered from outside."""
import json
from pathlib import Path

import torch

from sparseforge.architectures import build, name_of
from sparseforge.formats import FORMATS, FileFormat

TAG = "{p}-json"


@FORMATS.register
class JsonFormat(FileFormat):
    """A JSON file of the state dict."""

    name = "{p}"
    suffixes = (".{p}",)
    noun = "a {p} JSON file"

    def detect(self, path):
        try:
            with open(path, "rb") as f:
                return f.read(len(TAG) + 12).startswith(b'{{"format": "' + TAG.encode())
        except OSError:
            return False

    def save(self, model, path, *, extra=None):
        state = {{k: v.tolist() for k, v in model.state_dict().items()}}
        Path(path).write_text(json.dumps({{"format": TAG, "arch": name_of(model), "extra": extra or {{}},
                                           "state": state}}))
        return Path(path)

    def load(self, path, model=None):
        data = json.loads(Path(path).read_text())
        model = model if model is not None else build(data["arch"])
        model.load_state_dict({{k: torch.tensor(v, dtype=torch.float32) for k, v in data["state"].items()}})
        return model, {{"arch": data["arch"], "arch_kwargs": {{}}, "extra": data["extra"]}}
'''


@pytest.fixture
def json_format(tmp_path, monkeypatch):
    """A plug-in module in the working folder registering a format named uniquely for this test."""
    p = f"fmt{uuid.uuid4().hex[:6]}"
    module = f"sf_format_{p}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(p=p))
    monkeypatch.chdir(tmp_path)
    saved_path = list(sys.path)
    yield module, p
    FORMATS.unregister(p)
    sys.modules.pop(module, None)
    sys.path[:] = saved_path


def test_a_format_registered_from_outside_is_written_and_read(json_format, tmp_path) -> None:
    from sparseforge.registry import import_plugins

    module, name = json_format
    import_plugins([module])
    model = _pruned()
    path = sf.save(model, tmp_path / f"m.{name}", extra={"by": "plug-in"})  # its suffix picks it
    renamed = path.rename(tmp_path / "m.data")
    loaded, meta = load_with_metadata(renamed)  # its detect() tells it by content
    assert meta["format"] == name and meta["extra"] == {"by": "plug-in"}
    _same_state(model, loaded)
    with pytest.raises(SparseforgeError, match=rf"is a {name} JSON file \(format '{name}'\), not an sfz file"):
        sf.load(renamed, format="sfz")


def test_the_cli_exports_to_a_format_registered_from_outside(json_format, tmp_path, capsys) -> None:
    module, name = json_format
    source = sf.save(_pruned(), tmp_path / "m.safetensors")
    out = tmp_path / f"e.{name}"
    assert main(["--plugin", module, "export", str(source), "--format", name, "--out", str(out), "--quiet"]) == 0
    assert f"wrote {out} ({name}," in capsys.readouterr().out
    _same_state(sf.load(source), sf.load(out))
    assert json.loads(out.read_text())["format"] == f"{name}-json"
