"""GPTQ, the shared OBS solver and block-by-block calibration capture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseforge as sf
from sparseforge.cli import main as cli_main
from sparseforge.io.checkpoint import save_checkpoint
from sparseforge.oneshot.calibration import LayerStats, input_matrix, sequential, weight_matrix
from sparseforge.oneshot.obs import inverse_hessian_factor, obs_compress
from sparseforge.quant import gptq_, quantization_of, quantize_weight
from sparseforge.zoo.data import DEFAULT_DATA_DIR
from sparseforge.zoo.models import build_model


def _correlated(n: int = 2048, d: int = 64, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features, where error feedback matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def _rel_error(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> float:
    ref = x @ w.T
    return float((ref - x @ w2.T).square().sum() / ref.square().sum())


@pytest.mark.parametrize("bits,group", [(4, None), (4, 16), (8, None)])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, group: int | None) -> None:
    x = _correlated()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T @ x / x.shape[0]
    rtn = quantize_weight(w, bits, group).dequantize()
    for act_order in (False, True):
        res = obs_compress(w, h, bits=bits, group_size=group, act_order=act_order)
        # the result lies on the recorded grid exactly, codes in range
        g = group or 64
        deq = (res.codes.float().reshape(32, -1, g) * res.scale.reshape(32, -1, 1)).reshape(32, 64)
        assert torch.equal(res.weight, deq)
        assert int(res.codes.abs().max()) <= 2 ** (bits - 1) - 1
        # at least twice better than round-to-nearest on the layer's own reconstruction error
        assert _rel_error(x, w, res.weight) < 0.5 * _rel_error(x, w, rtn)


def test_gptq_keeps_sparsity_pattern_and_count() -> None:
    x = _correlated(seed=2)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen) * (torch.rand(16, 64, generator=gen) > 0.7)
    w[0] = 0.0  # an all-zero row
    h = 2 * x.T @ x / x.shape[0]
    res = obs_compress(w, h, bits=4, group_size=16)
    assert bool((res.weight[w == 0] == 0).all()) and torch.equal(res.keep, w != 0)
    assert torch.equal(res.codes != 0, res.weight != 0)
    assert float((res.weight != 0).sum()) > 0.9 * float((w != 0).sum())  # few kept weights round to 0
    # with the pruned weights pinned at zero, error feedback still beats plain RTN
    assert _rel_error(x, w, res.weight) < _rel_error(x, w, quantize_weight(w, 4, 16).dequantize())


def test_obs_pruning_patterns_and_error() -> None:
    x = _correlated(seed=4)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    h = 2 * x.T @ x / x.shape[0]
    res = obs_compress(w, h, sparsity=0.5)
    assert int((res.weight == 0).sum()) == w.numel() // 2 and torch.equal(res.keep, res.weight != 0)
    mag = w * (w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    assert _rel_error(x, w, res.weight) < 0.5 * _rel_error(x, w, mag)
    nm = obs_compress(w, h, n_m=(2, 4))
    assert torch.equal((nm.weight.reshape(32, 16, 4) != 0).sum(-1), torch.full((32, 16), 2))
    with pytest.raises(sf.SparseforgeError, match="act_order"):
        obs_compress(w, h, n_m=(2, 4), act_order=True)
    with pytest.raises(sf.SparseforgeError, match="at most one"):
        obs_compress(w, h, sparsity=0.5, n_m=(2, 4))
    with pytest.raises(sf.SparseforgeError, match="Hessian is"):
        obs_compress(w, h[:10, :10], bits=4)


def test_inverse_hessian_damping_retries_on_a_singular_hessian() -> None:
    h = torch.zeros(4, 4)
    h[0, 0] = 1.0
    h[1, 1] = -1.0  # negative curvature: not positive definite with the default damping
    with pytest.warns(UserWarning, match="needed damping"):
        factor, lam = inverse_hessian_factor(h, damp=0.01)
    assert lam > 0.01 * float(torch.diagonal(h).mean()) and torch.isfinite(factor).all()
    with pytest.raises(sf.SparseforgeError, match="not positive definite"):
        inverse_hessian_factor(-torch.eye(3) * 1e6, damp=0.01, retries=1)


def test_conv_input_matrix_matches_weight_columns() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 8, 8)
    rows = input_matrix(conv, x)
    out = rows @ weight_matrix(conv).T + conv.bias
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.out(torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)))


class _Stack(nn.Module):
    def __init__(self, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h, scale=0.5)
        return self.head(h)


def _gram_of(model: nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    module = dict(model.named_modules())[name]
    stats = LayerStats(want_gram=True)
    handle = module.register_forward_hook(lambda m, a, o: stats.add(input_matrix(m, a[0])))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return stats.gram


@pytest.mark.parametrize("blocks", [True, False])
def test_sequential_sees_already_processed_layers(blocks: bool) -> None:
    """Each layer's statistics are taken after every earlier layer was processed, and the Gram is
    the one a fresh forward of the processed model gives."""
    torch.manual_seed(0)
    model = _Stack() if blocks else build_model("lenet300")
    shape = (6, 4) if blocks else (6, 1, 28, 28)
    batches = [torch.randn(*shape) for _ in range(3)]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen: list[str] = []
    expected: dict[str, torch.Tensor] = {}

    def process(name: str, module: nn.Module, stats: LayerStats) -> None:
        block = name.rsplit(".", 1)[0] if blocks and name.startswith("layers.") else name
        if not any(n.startswith(block) for n in seen):
            # the first layer of a block (or a lone layer): the statistics of every layer of it are those
            # of a fresh forward of the model as processed so far
            expected.update({n: _gram_of(model, n, batches) for n in layers if n.startswith(block)})
        torch.testing.assert_close(stats.gram, expected[name], rtol=1e-4, atol=1e-4)
        assert stats.rows == sum(b.shape[0] for b in batches)
        torch.testing.assert_close(stats.feature_norms, torch.diagonal(stats.gram).sqrt(), rtol=1e-4, atol=1e-5)
        seen.append(name)
        with torch.no_grad():
            module.weight.mul_(0.5)  # a visible change later layers must see

    sequential(model, batches, layers, process)
    if blocks:  # the input projection, the blocks in order, then the head
        assert seen == ["inp"] + [f"layers.{i}.{p}" for i in range(3) for p in ("q", "k", "out")] + ["head"]
    else:
        assert seen == list(layers)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sequential_removes_hooks_on_error_and_checks_input() -> None:
    model = _Stack()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def boom(name: str, module: nn.Module, stats: LayerStats) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sequential(model, [torch.randn(2, 4)], layers, boom)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(sf.SparseforgeError, match="no calibration batches"):
        sequential(model, [], layers, boom)


def test_gptq_model_records_codes_that_sfz_stores_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lenet300")
    sf.prune(model, "magnitude", sparsity=0.8)
    nonzeros = sf.report(model).layer_nonzeros
    batches = [(torch.randn(32, 1, 28, 28), None) for _ in range(4)]
    rep = gptq_(model, batches, "gptq-int4")
    assert set(rep.layers) == {"fc1", "fc2", "fc3"}
    assert sf.report(model).layer_nonzeros == nonzeros
    for m in (model.fc1, model.fc2, model.fc3):
        qt = quantization_of(m)
        assert qt is not None and qt.method == "gptq" and qt.bits == 4
    path = tmp_path / "g.sfz"
    sf.save(model, path, values="int4")
    back = sf.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert quantization_of(back.fc1).method == "gptq"


def test_gptq_rejects_bad_scheme_and_group_before_changing_anything() -> None:
    model = build_model("lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 1, 28, 28)]
    with pytest.raises(sf.SparseforgeError, match=r"unknown quantization scheme 'gptq-int3'; did you mean "
                                                  r"'gptq-int[48]'\? \(known: gptq-int8, gptq-int4\)"):
        gptq_(model, batches, "gptq-int3")
    with pytest.raises(sf.SparseforgeError, match="fc1.weight has 784 inputs"):
        gptq_(model, batches, "gptq-int4", group_size=128)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(sf.SparseforgeError, match="needs calibration data"):
        sf.quant.quantize_(model, "gptq-int4")


def test_gptq_on_conv_model_beats_rtn_on_outputs() -> None:
    torch.manual_seed(0)
    model = build_model("conv4")
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    rtn = build_model("conv4")
    rtn.load_state_dict(model.state_dict())
    sf.quant.quantize_(rtn, "int4")
    gptq_(model, [x[:32], x[32:]], "gptq-int4")
    with torch.no_grad():
        e_gptq = F.mse_loss(model(x), ref)
        e_rtn = F.mse_loss(rtn(x), ref)
    assert e_gptq < e_rtn


@pytest.mark.skipif(not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_cli_quantize_gptq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = build_model("lenet300")
    sf.prune(model, "magnitude", sparsity=0.9)
    src = save_checkpoint(model, tmp_path / "p.safetensors")
    out = tmp_path / "g.sfz"
    assert cli_main(["quantize", str(src), "--out", str(out), "--scheme", "gptq-int4", "--group-size", "4",
                     "--calibration-batches", "1", "--json"]) == 0
    capsys.readouterr()
    back = sf.load(out)
    qt = quantization_of(back.fc2)
    assert qt.method == "gptq" and qt.bits == 4 and qt.group_size == 4
    assert sf.report(back).layer_nonzeros == sf.report(model).layer_nonzeros
