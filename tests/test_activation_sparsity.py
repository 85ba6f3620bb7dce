"""Activation sparsity (TEAL): calibrated thresholds, the column-block kernel's exactness, generation with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseforge as sf
from sparseforge.kernels.activation import (
    COLUMN_BLOCK, ActivationSparseLinear, activation_sparsity, calibrate_thresholds,
)
from sparseforge.kernels.native import native
from sparseforge.kernels.packed import PackedLinear

NATIVE = native()




@pytest.mark.parametrize("values", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (10, 7), (256, 64), (300, 130), (513, 257)])
def test_product_equals_dense_product_of_thresholded_input(isa, values, shape):
    n, k = shape
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, k) < 0.5)
        lin.weight[0] = 0                                   # an all-zero row
    w = lin.weight.detach() if values == "fp32" else lin.weight.detach().bfloat16().float()
    for t in (0.0, 0.4, 10.0):                              # nothing, some, every input skipped
        layer = ActivationSparseLinear.from_linear(lin, values, threshold=t)
        assert layer.cmask.shape == (-(-n // COLUMN_BLOCK), k, COLUMN_BLOCK // 64)
        assert torch.equal(layer.dense_weight(), w)        # the column blocks hold exactly the weight
        for x in (torch.randn(1, k), torch.randn(5, k), torch.randn(2, 3, k), torch.randn(k, 2).T):
            kept = torch.where(x.abs() > t, x, torch.zeros(()))
            ref = (kept.double() @ w.double().T + lin.bias.double()).reshape(*x.shape[:-1], n)
            scale = (kept.abs().double() @ w.abs().double().T + lin.bias.abs().double()).reshape(ref.shape)
            with torch.no_grad():
                y = layer(x)
            assert y.shape == ref.shape
            assert ((y.double() - ref).abs() <= 1e-5 * scale + 1e-6).all()


def test_thresholds_are_the_quantile_of_input_magnitudes_and_shared_inputs_share_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [torch.randn(64, 16) for _ in range(3)]
    t = calibrate_thresholds(model, data, sparsity=0.5)
    assert t["0"] == pytest.approx(float(torch.quantile(torch.cat(data).abs().reshape(-1), 0.5)), rel=1e-6)
    hidden = torch.cat([F.relu(model[0](d)) for d in data]).detach()
    assert t["2"] == pytest.approx(float(torch.quantile(hidden.abs().reshape(-1), 0.5)), rel=1e-6)
    assert calibrate_thresholds(model, data, sparsity=0.0)["0"] == 0.0
    with pytest.raises(sf.SparseforgeError, match=r"in \[0, 1\)"):
        calibrate_thresholds(model, data, sparsity=1.0)
    with pytest.raises(sf.SparseforgeError, match="no calibration batches"):
        calibrate_thresholds(model, [], sparsity=0.5)
    with pytest.raises(sf.SparseforgeError, match="match no Linear"):
        calibrate_thresholds(model, data, sparsity=0.5, layers="nothing.*")


def test_the_calibrated_fraction_of_inputs_is_skipped_and_packed_layers_keep_their_zeros():
    torch.manual_seed(1)
    lin = nn.Linear(512, 300)
    sf.prune(nn.Sequential(lin), "magnitude", sparsity=0.7)
    model = nn.Sequential(PackedLinear.from_dense(lin, "fp32"))
    data = [torch.randn(32, 512) for _ in range(4)]
    report = activation_sparsity(model, data, sparsity=0.4, values="fp32")
    layer = model[0]
    assert isinstance(layer, ActivationSparseLinear) and report.thresholds["0"] == float(layer.threshold)
    skipped = (torch.cat(data).abs() <= layer.threshold).float().mean()
    assert skipped == pytest.approx(0.4, abs=0.01)
    assert int(layer.cptr[-1, -1]) == int((lin.weight != 0).sum())   # only the weight's nonzeros are stored
    assert torch.equal(layer.weight, lin.weight.detach())


def test_llama_generates_with_activation_sparsity_and_zero_threshold_changes_nothing():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(dense.state_dict())
    calib = [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    activation_sparsity(model, calib, sparsity=0.0, layers="model.layers.*", values="fp32")
    assert isinstance(model.model.layers[0].mlp.down_proj, ActivationSparseLinear)
    prompt = calib[0][:1, :8]
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))
        sparse = transformers.LlamaForCausalLM(config).eval()
        sparse.load_state_dict(dense.state_dict())
        report = activation_sparsity(sparse, calib, sparsity=0.5, layers="model.layers.*")
        assert len(report.thresholds) == 14 and all(t > 0 for t in report.thresholds.values())
        assert sparse.generate(prompt, **kwargs).shape == (1, 18)
