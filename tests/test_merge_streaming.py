"""Streaming merges of safetensors files: the same tensors as the in-memory merges, and every bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparseforge.merge as sm
from sparseforge.errors import SparseforgeError
from sparseforge.formats import tensor_digest
from sparseforge.io.checkpoint import read_checkpoint, save_checkpoint
from sparseforge.merge import streaming
from sparseforge.merge.streaming import merge_files


def _state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A small state dict with float32, bfloat16, float64 and integer tensors; a 'fine-tuned' copy of base if given."""
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "fc.weight": torch.randn(12, 7, generator=g),
            "fc.bias": torch.randn(12, generator=g),
            "emb.weight": torch.randn(5, 6, generator=g).to(torch.bfloat16),
            "scale": torch.randn(3, generator=g, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(100 + seed),
        }
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            out[k] = (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
        else:
            out[k] = v + seed
    return out


@pytest.fixture
def files(tmp_path):
    base = _state(0)
    models = [_state(i, base) for i in (1, 2, 3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(m, str(paths[-1]))
    return tmp_path, base, models, paths


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_streamed_average_equals_in_memory_bit_for_bit(files, weights):
    tmp, _, models, paths = files
    report = merge_files(paths, tmp / "avg.safetensors", weights=weights)
    assert _equal(load_file(str(tmp / "avg.safetensors")), sm.weighted_average(models, weights))
    assert report["method"] == "average" and report["tensors"] == 5
    assert report["bytes"] == (tmp / "avg.safetensors").stat().st_size and report["peak_rss_bytes"] > 0


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties"])
def test_streamed_task_vector_merges_equal_in_memory_bit_for_bit(files, method):
    tmp, base, models, paths = files
    options = {"lam": 0.7, "weights": [1.0, 0.5, 2.0]}
    if method != "task_arithmetic":
        options["density"] = 0.4
    if method.startswith("dare"):
        options["seed"] = 5
    out = tmp / f"{method}.safetensors"
    merge_files(paths, out, method=method, base=tmp / "base.safetensors", **options)
    expected = sm.merge_task_arithmetic(base, models, sm.preset(method, **options))
    got = load_file(str(out))
    assert _equal(got, expected)
    # the integer counter comes from the base, not from a model
    assert got["bn.num_batches_tracked"].item() == base["bn.num_batches_tracked"].item()


def test_dare_seed_changes_the_drops_and_is_reproducible(files):
    tmp, _, _, paths = files
    kw = {"method": "dare", "base": tmp / "base.safetensors", "density": 0.5}
    merge_files(paths, tmp / "a.safetensors", seed=1, **kw)
    merge_files(paths, tmp / "b.safetensors", seed=1, **kw)
    merge_files(paths, tmp / "c.safetensors", seed=2, **kw)
    a, b, c = (load_file(str(tmp / f"{x}.safetensors")) for x in "abc")
    assert _equal(a, b) and not torch.equal(a["fc.weight"], c["fc.weight"])


def test_mmap_fallback_gives_the_same_result(files, monkeypatch):
    # safetensors without the pread backend: the file is opened per tensor instead.
    tmp, _, _, paths = files
    merge_files(paths, tmp / "pread.safetensors", method="ties", base=tmp / "base.safetensors")
    monkeypatch.setattr(streaming, "_open_pread", lambda path, stack: None)
    merge_files(paths, tmp / "mmap.safetensors", method="ties", base=tmp / "base.safetensors")
    assert _equal(load_file(str(tmp / "pread.safetensors")), load_file(str(tmp / "mmap.safetensors")))


def test_checkpoint_metadata_is_carried_with_recomputed_digests(tmp_path):
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = sm_model()
        save_checkpoint(model, tmp_path / f"c{seed}.safetensors", extra={"note": "kept"})
        states.append(read_checkpoint(tmp_path / f"c{seed}.safetensors")[0])
    out = tmp_path / "merged.safetensors"
    merge_files([tmp_path / "c1.safetensors", tmp_path / "c2.safetensors"], out, method="task_arithmetic",
                base=tmp_path / "c0.safetensors", lam=0.5)
    state, meta = read_checkpoint(out)  # verifies every digest
    assert _equal(state, sm.task_arithmetic(states[0], states[1:], lam=0.5))
    assert meta["extra"]["note"] == "kept" and meta["extra"]["merge"]["method"] == "task_arithmetic"
    assert meta["extra"]["merge"]["lambda"] == 0.5
    with safe_open(str(out), framework="pt") as f:
        digests = json.loads(f.metadata()["sha256"])
    assert digests == {k: tensor_digest(v) for k, v in state.items()}


def sm_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


# -- errors -----------------------------------------------------------------------------------------


def test_mismatched_keys_name_the_file_and_first_keys(files):
    tmp, base, models, paths = files
    odd = dict(models[0])
    for i in range(7):
        odd[f"extra.{i}"] = torch.zeros(1)
    del odd["fc.bias"]
    save_file(odd, str(tmp / "odd.safetensors"))
    with pytest.raises(SparseforgeError) as e:
        merge_files([paths[0], tmp / "odd.safetensors"], tmp / "o.safetensors")
    msg = str(e.value)
    assert "odd.safetensors" in msg and "'fc.bias'" in msg and "'extra.0'" in msg and "and 2 more" in msg
    assert not (tmp / "o.safetensors").exists()


def test_mismatched_shape_and_dtype_are_named(files):
    tmp, _, models, paths = files
    bad = dict(models[1], **{"fc.weight": torch.zeros(12, 8)})
    save_file(bad, str(tmp / "shape.safetensors"))
    with pytest.raises(SparseforgeError, match=r"shape\.safetensors.*'fc\.weight' \(\[12, 8\] vs \[12, 7\]\)"):
        merge_files([paths[0], tmp / "shape.safetensors"], tmp / "o.safetensors")
    bad = dict(models[1], **{"fc.bias": models[1]["fc.bias"].half()})
    save_file(bad, str(tmp / "dtype.safetensors"))
    with pytest.raises(SparseforgeError, match=r"dtype\.safetensors.*dtype differs for 'fc\.bias'"):
        merge_files([paths[0], tmp / "dtype.safetensors"], tmp / "o.safetensors", method="ties",
                    base=tmp / "base.safetensors")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties"])
def test_task_vector_methods_need_a_base(files, method):
    tmp, _, _, paths = files
    with pytest.raises(SparseforgeError, match="base"):
        merge_files(paths, tmp / "o.safetensors", method=method)


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": [1.0, -1.0, 1.0]}, "do not sum sensibly"),
    ({"weights": [0.0, 0.0, 0.0]}, "do not sum sensibly"),
    ({"weights": [1.0, 1.0]}, "2 weights for 3 models"),
    ({"density": 0.5}, "density applies to"),
    ({"lam": 0.5}, "average takes none"),
    ({"method": "ties", "weights": [1.0, -1.0, 1.0]}, "non-negative"),
    ({"method": "ties", "density": 0.0}, r"density must be a number in \(0, 1\]"),
    ({"method": "task_arithmetic", "density": 0.5}, "density applies to"),
    ({"method": "nope"}, r"unknown merge method 'nope' \(known: average, task_arithmetic, ties, dare, dare_ties\)"),
    ({"method": "fisher"}, "Python API only"),
])
def test_bad_options_are_refused_before_reading(files, kwargs, match):
    tmp, _, _, paths = files
    if kwargs.get("method", "average") not in ("average", "nope", "fisher"):
        kwargs = dict(kwargs, base=tmp / "base.safetensors")
    with pytest.raises(SparseforgeError, match=match):
        merge_files(paths, tmp / "o.safetensors", **kwargs)
    assert not (tmp / "o.safetensors").exists()


def test_average_refuses_a_base(files):
    tmp, _, _, paths = files
    with pytest.raises(SparseforgeError, match="average does not use a base"):
        merge_files(paths, tmp / "o.safetensors", base=tmp / "base.safetensors")


def test_out_equal_to_an_input_is_refused(files):
    tmp, _, _, paths = files
    before = paths[0].read_bytes()
    with pytest.raises(SparseforgeError, match="one of the inputs"):
        merge_files(paths, tmp / "." / "m0.safetensors")
    with pytest.raises(SparseforgeError, match="one of the inputs"):
        merge_files(paths, tmp / "base.safetensors", method="ties", base=tmp / "base.safetensors")
    assert paths[0].read_bytes() == before


def _no_leftovers(tmp) -> bool:
    return not (tmp / "o.safetensors").exists() and not list(tmp.glob(".o.safetensors.*"))


def test_truncated_and_foreign_files_are_named(files):
    tmp, _, _, paths = files
    data = paths[1].read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(SparseforgeError, match=r"cut\.safetensors is not a safetensors file or is corrupted"):
        merge_files([paths[0], tmp / "cut.safetensors"], tmp / "o.safetensors")
    (tmp / "text.safetensors").write_text("hello, not tensors\n" * 10)
    with pytest.raises(SparseforgeError, match=r"text\.safetensors is not a safetensors file"):
        merge_files([paths[0], tmp / "text.safetensors"], tmp / "o.safetensors")
    with pytest.raises(SparseforgeError, match="does not exist"):
        merge_files([paths[0], tmp / "missing.safetensors"], tmp / "o.safetensors")
    assert _no_leftovers(tmp)


def test_flipped_byte_in_a_checkpoint_is_detected_and_no_output_is_left(tmp_path):
    for seed in range(2):
        torch.manual_seed(seed)
        save_checkpoint(sm_model(), tmp_path / f"c{seed}.safetensors")
    raw = bytearray((tmp_path / "c1.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data: the header still parses, the digest does not match
    (tmp_path / "c1.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SparseforgeError, match=r"c1\.safetensors is corrupted: tensor '.*' does not match its checksum"):
        merge_files([tmp_path / "c0.safetensors", tmp_path / "c1.safetensors"], tmp_path / "o.safetensors")
    assert _no_leftovers(tmp_path)


def test_sfz_files_are_refused_with_the_conversion(tmp_path):
    import sparseforge as sf

    for seed in range(2):
        torch.manual_seed(seed)
        sf.save(torch.nn.Sequential(torch.nn.Linear(8, 8)), tmp_path / f"s{seed}.sfz")
    with pytest.raises(SparseforgeError, match="sparseforge export"):
        merge_files([tmp_path / "s0.sfz", tmp_path / "s1.sfz"], tmp_path / "o.safetensors")


def test_merge_memory_bench_quick_runs_and_the_two_paths_agree(tmp_path):
    import argparse

    from sparseforge.bench import merge_memory

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    merge_memory.add_arguments(parser)
    result = merge_memory.run(parser.parse_args(["--quick", "--workdir", str(tmp_path)]))
    rows = result["rows"]
    assert {(r["method"], r["mode"]) for r in rows} == {(m, p) for m in ("average", "ties")
                                                          for p in ("streaming", "load_all")}
    assert all(r["same_as_load_all"] for r in rows)  # the streamed file holds the in-memory merge's tensors
    assert all(r["peak_rss_mb"] >= 0 and r["seconds"] > 0 for r in rows)
    assert not list(tmp_path.iterdir())  # its synthetic checkpoints are cleaned up
