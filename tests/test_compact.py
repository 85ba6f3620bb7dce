"""compact(): pruned channels and heads are physically removed, outputs unchanged.

Every test compares the compacted model with the masked model it came from,
in eval mode, on random inputs, and checks the exact shapes and parameter
counts the removal implies.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseforge as sf
from sparseforge.cli import main as cli_main
from sparseforge.io.checkpoint import load_checkpoint, save_checkpoint
from sparseforge.compact import LinearHandler, handler_for, register_handler
from sparseforge.compact.dependency import analyze
from sparseforge.zoo import build_model
from sparseforge.zoo.data import DEFAULT_DATA_DIR


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_outputs(before: nn.Module, after: nn.Module, x: torch.Tensor) -> None:
    before.eval()
    after.eval()
    with torch.no_grad():
        torch.testing.assert_close(after(x), before(x), rtol=1e-5, atol=1e-5)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Nontrivial BatchNorm statistics and affine parameters, so that slicing them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def test_lenet_rows_removed_exactly_and_constant_rows_folded() -> None:
    torch.manual_seed(0)
    model = build_model("lenet300")
    with torch.no_grad():
        model.fc1.weight[:100] = 0
        model.fc1.bias[:50] = 0  # rows 0-49: zero; rows 50-99: constant relu(bias) > 0, folded into fc2's bias
        model.fc1.bias[50:100] = torch.rand(50) + 0.1
        model.fc2.weight[10:30] = 0
        model.fc2.bias[10:30] = 0
    masked = copy.deepcopy(model)
    rep = sf.compact(model)
    assert (model.fc1.out_features, model.fc2.in_features) == (200, 200)
    assert (model.fc2.out_features, model.fc3.in_features) == (80, 80)
    assert model.fc3.out_features == 10  # the output is never compacted
    removed = 100 * (784 + 1) + 100 * 100 + 20 * (200 + 1) + 20 * 10
    assert rep.params_before - rep.params_after == removed == _params(masked) - _params(model)
    assert rep.groups[0]["folded"] == 50
    _same_outputs(masked, model, torch.randn(16, 1, 28, 28))


def test_conv4_group_pruning_compacts_every_layer_and_counts() -> None:
    torch.manual_seed(1)
    model = build_model("conv4")
    pruning = sf.prune_channels(model, "l1", sparsity=0.5)
    assert pruning.pruned_channels == 32 + 32 + 64 + 64 + 128 + 128
    masked = copy.deepcopy(model)
    rep = sf.compact(model)
    widths = [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels,
              model.conv4.out_channels, model.fc1.out_features, model.fc2.out_features]
    assert widths == [32, 32, 64, 64, 128, 128]
    assert model.fc1.in_features == 64 * 7 * 7 and model.fc3.in_features == 128
    expected = (32 * 9 + 32) + (32 * 32 * 9 + 32) + (64 * 32 * 9 + 64) + (64 * 64 * 9 + 64) \
        + (3136 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    assert rep.params_after == _params(model) == expected
    assert rep.ratio > 3.9
    _same_outputs(masked, model, torch.randn(8, 1, 28, 28))


def test_conv4_per_layer_channel_prune_keeps_constant_channels_before_padded_convs() -> None:
    """sf.prune(pattern="channel") leaves biases: a pruned filter outputs relu(bias); where that is
    positive and feeds a padded conv the channel is kept, where it is zero it goes, and a constant
    feeding fc1 (through flatten) is folded into fc1's bias."""
    torch.manual_seed(2)
    model = build_model("conv4")
    sf.prune(model, "l1", sparsity=0.5, pattern="channel")
    masked = copy.deepcopy(model)
    rep = sf.compact(model)
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(masked, name)
        zero_rows = (conv.weight.reshape(conv.out_channels, -1) == 0).all(dim=1)
        assert int(zero_rows.sum()) == conv.out_channels // 2
        gone = int((zero_rows & (conv.bias <= 0)).sum())
        assert 0 < gone < conv.out_channels // 2
        assert getattr(model, name).out_channels == conv.out_channels - gone, name
    assert model.conv4.out_channels == 64 and model.fc1.in_features == 64 * 49  # folded into fc1
    assert (model.fc1.out_features, model.fc2.out_features) == (128, 128)
    assert rep.changed and rep.params_after < rep.params_before
    _same_outputs(masked, model, torch.randn(8, 1, 28, 28))


@pytest.fixture(scope="module")
def resnet_case():
    torch.manual_seed(3)
    model = build_model("resnet20")
    _randomize_bn(model)
    with torch.no_grad():
        # inner conv of block layer1.0: channels 0-5 pruned with their BN (free to remove)
        model.layer1[0].conv1.weight[:6] = 0
        model.layer1[0].bn1.weight[:6] = 0
        model.layer1[0].bn1.bias[:6] = 0
        # inner conv of layer2.1: filter zero but BN shift nonzero -> constant into a padded conv: kept
        model.layer2[1].conv1.weight[:4] = 0
        # residual stream of stage 1: channel 3 pruned in EVERY member (stem and the three conv2/bn2)
        stage1 = [(model.conv1, model.bn1)] + [(b.conv2, b.bn2) for b in model.layer1]
        for conv, bn in stage1:
            conv.weight[3] = 0
            bn.weight[3] = 0
            bn.bias[3] = 0
        # channel 7 pruned in some members only (not in the stem): kept
        for conv, bn in stage1[1:]:
            conv.weight[7] = 0
            bn.weight[7] = 0
            bn.bias[7] = 0
    masked = copy.deepcopy(model)
    rep = sf.compact(model)
    return masked, model, rep


def test_resnet20_inner_and_residual_channels(resnet_case) -> None:
    masked, model, rep = resnet_case
    assert model.layer1[0].conv1.out_channels == 10 and model.layer1[0].conv2.in_channels == 10
    assert model.layer2[1].conv1.out_channels == 32  # constant channels before a padded conv stay
    # stage-1 stream: 16 -> 15 (only channel 3 is pruned in every member; 7 is kept)
    for m in [model.conv1, *[b.conv2 for b in model.layer1]]:
        assert m.out_channels == 15
    for b in model.layer1:
        assert b.conv1.in_channels == 15
    assert model.layer2[0].conv1.in_channels == 15 and model.layer2[0].shortcut[0].in_channels == 15
    assert model.layer2[0].conv2.out_channels == 32  # stage 2 untouched
    _same_outputs(masked, model, torch.randn(8, 1, 28, 28))
    # parameters removed, layer by layer (old shape - new shape)
    removed = (
        9 + 2  # stem conv1 16 -> 15 filters, bn1
        + (16 * 16 - 10 * 15) * 9 + 2 * 6  # layer1.0.conv1 [16,16] -> [10,15], bn1 16 -> 10
        + (16 * 16 - 15 * 10) * 9 + 2  # layer1.0.conv2 [16,16] -> [15,10], bn2
        + 2 * ((16 * 16 - 16 * 15) * 9 + (16 * 16 - 15 * 16) * 9 + 2)  # layer1.{1,2}: conv1 inputs, conv2 outputs, bn2
        + 32 * 9 + 32  # layer2.0.conv1 and shortcut conv: one input channel each
    )
    assert rep.params_before - rep.params_after == removed == _params(masked) - _params(model)


def test_resnet20_batchnorm_stats_are_sliced(resnet_case) -> None:
    masked, model, _ = resnet_case
    keep = torch.tensor([c for c in range(16) if c != 3])
    torch.testing.assert_close(model.bn1.running_mean, masked.bn1.running_mean[keep])
    torch.testing.assert_close(model.bn1.running_var, masked.bn1.running_var[keep])
    inner = torch.arange(6, 16)
    torch.testing.assert_close(model.layer1[0].bn1.running_var, masked.layer1[0].bn1.running_var[inner])
    torch.testing.assert_close(model.layer1[0].bn1.weight, masked.layer1[0].bn1.weight[inner])


class Attention(nn.Module):
    """Hand-written multi-head self-attention following the q/k/v/out_proj + num_heads/head_dim convention."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def test_transformer_block_heads_and_ffn_units() -> None:
    torch.manual_seed(4)
    model = Block()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        a = model.attn
        a.v_proj.weight[4:8] = 0  # head 1: value rows and bias zero -> outputs zero
        a.v_proj.bias[4:8] = 0
        a.out_proj.weight[:, 8:12] = 0  # head 2: output columns zero
        a.v_proj.weight[12:16] = 0  # head 3: value rows zero, bias not: outputs its bias, folded
        model.fc1.weight[:10] = 0  # FFN units 0-9: GELU(bias) constants, folded into fc2's bias
        model.fc1.weight[10:12] = 0
        model.fc1.bias[10:12] = 0
    masked = copy.deepcopy(model)
    rep = sf.compact(model, example_input=x)
    assert model.attn.num_heads == 1
    assert model.attn.q_proj.out_features == model.attn.v_proj.out_features == 4
    assert model.attn.out_proj.in_features == 4 and model.attn.out_proj.out_features == 16
    assert model.fc1.out_features == 20 and model.fc2.in_features == 20
    assert model.fc2.out_features == 16  # the residual stream reaches LayerNorm and the input: kept
    # 3 heads of q/k/v rows + biases, their out_proj columns; 12 fc1 rows + biases, their fc2 columns
    assert rep.params_before - rep.params_after == 3 * 3 * (4 * 16 + 4) + 12 * 16 + 12 * (16 + 1) + 12 * 16
    _same_outputs(masked, model, torch.randn(3, 7, 16))


def test_prune_channels_prunes_heads_and_ffn_jointly() -> None:
    torch.manual_seed(5)
    model = Block()
    x = torch.randn(2, 5, 16)
    sf.prune_channels(model, "l2", sparsity=0.5, example_input=x)
    masked = copy.deepcopy(model)
    sf.compact(model, example_input=x)
    assert model.attn.num_heads == 2 and model.fc1.out_features == 16
    _same_outputs(masked, model, torch.randn(3, 7, 16))


def test_group_scores_pick_the_weakest_channel_over_all_slices() -> None:
    """A channel that is weak in the producer but strong in its consumer columns is not the one pruned."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
        model[0].weight[0] = 0.1  # weakest filter ...
        model[2].weight[:, 0] = 10.0  # ... but read strongly: group L1 = 0.8 + 30
        model[0].weight[1] = 0.5  # group L1 = 4 + 3: the weakest group
    pruning = sf.prune_channels(model, "l1", sparsity=0.25, example_input=torch.randn(2, 8))
    assert pruning.groups[0]["pruned"] == [1]
    with torch.no_grad():
        assert float(model[0].weight[1].abs().sum()) == 0.0 and float(model[0].bias[1]) == 0.0
        assert float(model[2].weight[:, 1].abs().sum()) == 0.0


def test_taylor_channel_scores_are_squared_sums_of_w_times_g() -> None:
    w, g = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    expected = (w * g).sum(dim=(1, 2)).pow(2)
    torch.testing.assert_close(sf.Taylor().channel_scores(w, g, 0), expected)
    torch.testing.assert_close(sf.L1Norm().channel_scores(w, None, 1), w.abs().sum(dim=(0, 2)))
    torch.testing.assert_close(sf.L2Norm().channel_scores(w, None, 0), w.pow(2).sum(dim=(1, 2)))


def test_prune_channels_taylor_needs_calibration_and_uses_it() -> None:
    torch.manual_seed(7)
    model = build_model("lenet300")
    with pytest.raises(sf.SparseforgeError, match="needs gradients"):
        sf.prune_channels(model, "taylor", sparsity=0.5)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    pruning = sf.prune_channels(model, "taylor", sparsity=0.5, calibration=batches)
    assert [len(g["pruned"]) for g in pruning.groups] == [150, 50, 0]


def test_checkpoint_roundtrip_rebuilds_compacted_shapes(tmp_path: Path) -> None:
    torch.manual_seed(8)
    model = build_model("resnet20", width=8)
    _randomize_bn(model)
    sf.prune_channels(model, "l1", sparsity=0.5)
    rep = sf.compact(model)
    path = save_checkpoint(model, tmp_path / "small.safetensors", arch_kwargs={"num_classes": 10, "width": 8})
    loaded, meta = load_checkpoint(path)
    assert meta["compact"] == rep.shapes
    assert loaded.layer3[0].conv2.out_channels == 16 and loaded.fc.in_features == 16
    _same_outputs(model, loaded, torch.randn(4, 1, 28, 28))
    again, _ = sf.load_compacted(path)
    assert _params(again) == rep.params_after
    # a plain checkpoint of a full-size model loads as before
    plain = save_checkpoint(build_model("lenet300"), tmp_path / "plain.safetensors")
    assert load_checkpoint(plain)[1]["compact"] == {}


def test_cli_compact_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(9)
    model = build_model("conv4")
    sf.prune_channels(model, "l1", sparsity=0.5)
    src = save_checkpoint(model, tmp_path / "pruned.safetensors")
    out = tmp_path / "small.safetensors"
    assert cli_main(["compact", str(src), "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["changed"] and rep["params_after"] == 484330
    assert cli_main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    shapes = {layer["name"]: layer["shape"] for layer in inspected["layers"]}
    assert shapes["conv2"] == [32, 32, 3, 3] and shapes["fc1"] == [128, 3136]
    assert inspected["total_params"] == 484330
    assert cli_main(["compact", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error:") and err.count("\n") == 1


def test_nothing_pruned_is_a_reported_noop() -> None:
    model = build_model("lenet300")
    before = copy.deepcopy(model.state_dict())
    rep = sf.compact(model)
    assert not rep.changed and rep.removed_channels == 0
    assert "nothing to remove" in str(rep)
    assert not hasattr(model, "sparseforge_compact")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_model_names_the_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 2))
    with pytest.raises(sf.SparseforgeError, match=r"submodule 1 \(Gate\)"):
        sf.compact(model, example_input=torch.randn(2, 4))


def test_missing_example_input_and_live_masks_are_clear_errors() -> None:
    with pytest.raises(sf.SparseforgeError, match="example_input"):
        sf.compact(nn.Sequential(nn.Linear(4, 4)))
    model = build_model("lenet300")
    sparsifier = sf.Sparsifier(model, sf.methods.GMP(sparsity=0.5), total_steps=10)
    with pytest.raises(sf.SparseforgeError, match="finalize"):
        sf.compact(model)
    with pytest.warns(UserWarning, match="before the schedule's end"):
        sparsifier.finalize()
    assert not sf.compact(model).changed  # finalized at step 0: nothing pruned


def test_unknown_ops_block_their_group() -> None:
    """A channel reaching a non-channel-wise op (here a concatenation) is never removed."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(torch.cat([h, h.flip(-1)], dim=-1))

    model = Cat()
    with torch.no_grad():
        model.a.weight[:3] = 0
        model.a.bias[:3] = 0
    dep = analyze(model, torch.randn(2, 4))
    assert any("cat()" in reason for reason in dep.group_of("a").blocked)
    rep = sf.compact(model, example_input=torch.randn(2, 4))
    assert not rep.changed and model.a.out_features == 6


@pytest.mark.skipif(
    not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST is not installed"
)
def test_bench_compact_quick_writes_json(tmp_path: Path) -> None:
    from sparseforge.bench.__main__ import main as bench_main

    out = tmp_path / "compact.json"
    assert bench_main(["compact", "--quick", "--limit-train", "128", "--limit-test", "128", "--rounds", "2",
                       "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "compact" and result["quick"] is True
    (row,) = result["results"]
    assert row["model"] == "conv4"
    assert row["params_compacted"] < row["params_dense"] and row["param_ratio"] == pytest.approx(
        row["params_dense"] / row["params_compacted"])
    assert row["ms_dense"] > 0 and row["ms_compacted"] > 0 and math.isfinite(row["speedup"])
    # the compacted model is the masked model: same predictions on the test set
    assert row["accuracy_compacted"] == pytest.approx(row["accuracy_masked"], abs=1e-9)
    assert row["max_abs_diff"] < 1e-3
    assert all(0.0 <= row[k] <= 100.0 for k in ("accuracy_dense", "accuracy_masked", "accuracy_compacted"))


def test_readme_compact_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "sf.compact(" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md[compact]", "exec"), namespace)
    rep = namespace["compacted"]
    assert (rep.params_before, rep.params_after) == (272186, 68642)  # the numbers the comment quotes
    loaded, _ = load_checkpoint(tmp_path / "resnet20-small.safetensors")
    assert _params(loaded) == 68642


def test_hard_coded_view_blocks_but_flatten_style_view_compacts() -> None:
    class Net(nn.Module):
        def __init__(self, hard: bool) -> None:
            super().__init__()
            self.hard = hard
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.leaky_relu(self.conv(x), 0.5)
            return self.fc(h.view(-1, 64) if self.hard else h.view(h.size(0), -1))

    for hard in (True, False):
        torch.manual_seed(10)
        model = Net(hard)
        with torch.no_grad():
            model.conv.weight[1] = 0
            model.conv.bias[1] = -2.0  # leaky_relu(-2, 0.5) = -1: a constant folded into fc's bias
        masked = copy.deepcopy(model)
        x = torch.randn(2, 1, 6, 6)
        rep = sf.compact(model, example_input=x)
        assert rep.changed is (not hard)
        assert model.conv.out_channels == (4 if hard else 3) and model.fc.in_features == (64 if hard else 48)
        _same_outputs(masked, model, torch.randn(5, 1, 6, 6))


def test_option_a_shortcut_keeps_the_streams_whole_but_compacts_inner_convs() -> None:
    class BlockA(nn.Module):
        """Option-A residual block: stride-2 identity shortcut zero-padded from 4 to 8 channels."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.stem(x))
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
            return self.fc(F.adaptive_avg_pool2d(F.relu(out + short), 1).flatten(1))

    torch.manual_seed(11)
    model = BlockA()
    _randomize_bn(model)
    with torch.no_grad():
        for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
            conv.weight[:3] = 0
            bn.weight[:3] = 0
            bn.bias[:3] = 0
        model.stem.weight[0] = 0
        model.stem.bias[0] = 0
    masked = copy.deepcopy(model)
    x = torch.randn(2, 1, 8, 8)
    dep = analyze(model, x)
    assert dep.group_of("stem").blocked and dep.group_of("conv2").blocked
    sf.compact(model, example_input=x)
    assert model.conv1.out_channels == 5 and model.conv2.in_channels == 5  # the inner conv compacts
    assert model.stem.out_channels == 4 and model.conv2.out_channels == 8  # the streams stay whole
    _same_outputs(masked, model, torch.randn(3, 1, 8, 8))


def test_per_layer_channel_prune_on_trained_resnet_is_exact_but_keeps_bn_constant_channels() -> None:
    """sf.prune(pattern="channel") zeroes filters only; behind a BatchNorm a pruned filter's channel
    outputs relu(BN(0)): where that is positive it meets a padded conv and is kept, where it is 0 it
    goes (prune_channels zeroes the BatchNorm too, so all of them go)."""
    torch.manual_seed(12)
    model = build_model("resnet20")
    _randomize_bn(model)
    sf.prune(model, "l1", sparsity=0.5, pattern="channel")
    masked = copy.deepcopy(model)
    sf.compact(model)
    for old, new in zip(masked.modules(), model.modules()):
        if isinstance(old, type(masked.layer1[0])):
            zero = (old.conv1.weight.reshape(old.conv1.out_channels, -1) == 0).all(dim=1)
            bn = old.bn1
            const = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
            gone = int((zero & (const <= 0)).sum())
            assert 0 < gone < int(zero.sum())
            assert new.conv1.out_channels == old.conv1.out_channels - gone
    _same_outputs(masked, model, torch.randn(4, 1, 28, 28))


def test_multihead_attention_module_is_opaque() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc2(F.relu(self.fc1(x)))
            return self.mha(h, h, h)[0]

    torch.manual_seed(13)
    model = Net()
    with torch.no_grad():
        model.fc1.weight[:4] = 0
        model.fc1.bias[:4] = 0
        model.fc2.weight[:2] = 0
        model.fc2.bias[:2] = 0
    masked = copy.deepcopy(model)
    x = torch.randn(2, 3, 8)
    sf.compact(model, example_input=x)
    assert model.fc1.out_features == 12  # the FFN hidden units go
    assert model.fc2.out_features == 8 and model.mha.embed_dim == 8  # what reaches the MHA stays
    _same_outputs(masked, model, torch.randn(2, 5, 8))


class _Dense(nn.Module):
    """A user's own fully connected layer (not an nn.Linear): unknown to compaction until registered."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


class _DenseHandler(LinearHandler):
    """The handler a user writes for _Dense: a Linear with other attribute names and its own class."""

    kind = "_Dense"

    def out_channels(self, module: nn.Module) -> int:
        return module.n_out

    def entry(self, module: nn.Module) -> dict:
        return {"kind": self.kind, "n_in": module.n_in, "n_out": module.n_out}

    def resized(self, module: nn.Module, entry: dict) -> nn.Module:
        return _Dense(entry["n_in"], entry["n_out"])

    def sliced(self, module, out_index, in_index):  # noqa: ANN001, ANN201
        entry = self.entry(module)
        entry["n_out"] = len(out_index) if out_index is not None else module.n_out
        entry["n_in"] = len(in_index) if in_index is not None else module.n_in
        new = self.resized(module, entry)
        self._copy_slices(module, new, out_index, in_index)
        return entry, new


def test_a_registered_user_layer_is_compacted_and_reloaded(tmp_path: Path) -> None:
    """Without a handler a user's layer blocks its groups; with register_handler it compacts like a Linear,
    its pruned rows and the next layer's columns go, and a checkpoint rebuilds it through the same handler."""
    torch.manual_seed(0)
    model = nn.Sequential(_Dense(8, 16), nn.ReLU(), _Dense(16, 4))
    with torch.no_grad():
        model[0].weight[::2] = 0
        model[0].bias[::2] = 0
    fresh = copy.deepcopy(model)
    x = torch.randn(5, 8)
    unregistered = sf.compact(copy.deepcopy(model), example_input=x)
    assert not unregistered.changed
    register_handler(_Dense, _DenseHandler())
    assert handler_for(model[0]).kind == "_Dense"
    before = model(x)
    report = sf.compact(model, example_input=x)
    assert (model[0].n_out, model[2].n_in) == (8, 8) and isinstance(model[2], _Dense)
    assert report.shapes["0"] == {"kind": "_Dense", "n_in": 8, "n_out": 8}
    torch.testing.assert_close(model(x), before)
    path = save_checkpoint(model, tmp_path / "dense.safetensors")
    loaded, _ = load_checkpoint(path, fresh)
    torch.testing.assert_close(loaded(x), before)
