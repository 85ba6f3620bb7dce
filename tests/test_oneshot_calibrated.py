"""Wanda, SparseGPT and magnitude with calibration data through sf.prune, and OWL's layer-wise sparsity.

The checks follow the published rules on small matrices: Wanda's mask is a
per-row ranking of |W| * ||X|| (the Wanda score with the pattern's per-row
form), SparseGPT reconstructs a layer's output better than magnitude and
Wanda at the same sparsity, later layers are calibrated on the outputs of the
already pruned earlier ones, and OWL's sparsities average to the target
within +-lambda.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.allocation import OWL, block_of
from sparseforge.errors import SparseforgeError
from sparseforge.oneshot import prune_calibrated
from sparseforge.patterns import as_pattern
from sparseforge.scores import Wanda


def wanda_score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return Wanda()(weight, None, SimpleNamespace(feature_norms=norms))


def wanda_mask(score: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """Wanda's selection: the pattern compared within rows, as select_masks applies it for the Wanda score."""
    return as_pattern(pattern).within_rows().mask(score, sparsity)


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with unequal feature scales and correlations, so the three methods disagree."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    scale = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    return (torch.randn(rows, features, generator=g) @ mix + 0.3 * torch.randn(rows, features, generator=g)) * scale


def test_wanda_mask_is_a_per_row_ranking():
    g = torch.Generator().manual_seed(1)
    w, norms = torch.randn(12, 40, generator=g), torch.rand(40, generator=g) * 5
    score = wanda_score(w, norms)
    keep = wanda_mask(score, 0.3)
    for i in range(12):  # direct rule: the 12 (= int(40 * 0.3)) lowest of row i go
        lowest = set(torch.argsort(w[i].abs() * norms).tolist()[:12])
        assert set(torch.nonzero(~keep[i]).flatten().tolist()) == lowest
    keep24 = wanda_mask(score, 0.5, "2:4")
    groups = score.reshape(12, 10, 4)
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    assert torch.equal(keep24, expected.reshape(12, 40))


def test_wanda_prunes_each_row_equally_and_uses_the_input_norms():
    torch.manual_seed(0)
    layer = nn.Linear(40, 12)
    x = correlated_inputs(256, 40)
    w0 = layer.weight.detach().clone()
    rep = sf.prune(layer, "wanda", 0.5, calibration=[x])
    keep = layer.weight != 0
    assert torch.equal(keep.sum(dim=1), torch.full((12,), 20))
    assert torch.equal(keep, wanda_mask(wanda_score(w0, x.double().norm(dim=0).float()), 0.5))
    assert torch.equal(layer.weight[keep], w0[keep])  # Wanda does not update kept weights
    assert rep.achieved == 0.5 and rep.calibration_rows == 256
    # the activation factor matters: magnitude alone keeps a different set
    assert not torch.equal(keep, wanda_mask(w0.abs(), 0.5))


def test_later_layers_are_calibrated_on_the_pruned_earlier_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 64))
    dense = [p.detach().clone() for p in (model[0].weight, model[2].weight)]
    x = correlated_inputs(200, 24)
    sf.prune(model, "wanda", 0.6, calibration=[x])
    hidden = torch.relu(model[0](x))  # first layer already pruned
    expected = wanda_mask(wanda_score(dense[1], hidden.double().norm(dim=0).float()), 0.6)
    assert torch.equal(model[2].weight != 0, expected)
    dense_hidden = torch.relu(x @ dense[0].t() + model[0].bias)
    assert not torch.equal(expected, wanda_mask(wanda_score(dense[1], dense_hidden.norm(dim=0)), 0.6))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_the_layer_better_than_magnitude_and_wanda(pattern):
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=False)
    x = correlated_inputs(512, 64, seed=3)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        layer = nn.Linear(64, 32, bias=False)
        layer.load_state_dict(base.state_dict())
        sf.prune(layer, method, 0.5, pattern, calibration=[x])
        w = layer.weight.detach()
        assert float((w == 0).float().mean()) == 0.5
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert torch.equal((w.reshape(32, -1, m) != 0).sum(-1), torch.full((32, 64 // m), n))
        errors[method] = float((x @ base.weight.detach().t() - x @ w.t()).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 50, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]
    return model, batches


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_transformer_blocks_get_exact_nm_counts_and_the_rest_stays_dense(method):
    model, batches = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = sf.prune(model, method, pattern="2:4", calibration=batches)
    assert len(rep.pruned) == 3 * 6 and all(n.startswith("encoder.layer.") for n in rep.pruned)
    for name, module in model.named_modules():
        if name in rep.pruned:
            w = module.weight.detach()
            assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))
    for key, value in model.state_dict().items():  # embeddings, norms, biases, pooler untouched
        if not any(key == f"{n}.weight" for n in rep.pruned):
            assert torch.equal(value, before[key]), key
    assert rep.achieved == 0.5


def test_owl_allocation_spans_lambda_and_averages_to_the_target():
    names = [f"layers.{b}.{p}" for b in range(4) for p in ("q", "fc")]
    shapes = [torch.Size([16, 16])] * len(names)
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(16, 16, generator=g) for _ in names]
    scores[2][0, :5] = 100.0  # block 1 has outliers, block 3 more
    scores[6][:3, :] = 100.0
    owl = OWL(m=5.0, lam=0.08)
    got = dict(zip(names, owl.allocate(names, shapes, 0.7, scores)))
    per_block = {block_of(n): s for n, s in got.items()}
    assert all(got[n] == per_block[block_of(n)] for n in names)  # one sparsity per block
    assert sum(per_block.values()) / 4 == pytest.approx(0.7)
    assert max(per_block.values()) - min(per_block.values()) == pytest.approx(0.16)
    assert per_block["layers.3"] == min(per_block.values())  # most outliers: pruned least
    with pytest.raises(SparseforgeError, match="scores"):
        owl.allocate(names, shapes, 0.7, None)


def test_owl_through_sf_prune_keeps_the_model_sparsity():
    model, batches = tiny_bert()
    norms: dict[str, torch.Tensor] = {}  # Wanda scores on the dense model, computed directly
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: norms.__setitem__(
        n, norms.get(n, 0) + i[0].reshape(-1, i[0].shape[-1]).double().square().sum(0)))
        for n, m in model.named_modules() if n.startswith("encoder.layer.") and isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    scores = [wanda_score(dict(model.named_modules())[n].weight.detach(), v.sqrt().float()) for n, v in norms.items()]
    ratios = OWL().outlier_ratios(list(norms), scores)
    rep = sf.prune(model, "wanda", 0.7, allocation="owl", calibration=batches)
    blocks = {block_of(n): v["sparsity"] for n, v in rep.pruned.items()}
    assert max(blocks.values()) - min(blocks.values()) == pytest.approx(0.16)
    assert sum(blocks.values()) / 3 == pytest.approx(0.7)
    # more outliers, less pruning
    assert sorted(blocks, key=blocks.get) == sorted(ratios, key=ratios.get, reverse=True)
    # per-row rounding (int(32 * s) weights per row) costs at most one weight per row
    assert 0.7 - 1 / 32 <= rep.achieved <= 0.7 + 1e-9


def test_clear_errors():
    model, batches = tiny_bert()
    with pytest.raises(SparseforgeError, match="unknown one-shot method"):
        prune_calibrated(model, batches, "obd")
    with pytest.raises(SparseforgeError, match="unknown score 'obd'"):
        sf.prune(model, "obd", calibration=batches)
    with pytest.raises(SparseforgeError, match="wanda reads the layers' inputs on calibration data"):
        sf.prune(model, "wanda", 0.5)  # no calibration
    with pytest.raises(SparseforgeError, match="sparsegpt reads the layers' inputs"):
        sf.prune(model, "sparsegpt", pattern="2:4")
    with pytest.raises(SparseforgeError, match="N:M pattern fixes"):
        sf.prune(model, "wanda", pattern="2:4", allocation="owl", calibration=batches)
    with pytest.raises(SparseforgeError, match="not divisible by M=8"):
        sf.prune(nn.Linear(12, 4), "wanda", pattern="4:8", calibration=[torch.randn(8, 12)])
    with pytest.raises(SparseforgeError, match="unstructured and N:M"):
        sf.prune(model, "wanda", pattern="channel", calibration=batches)


def test_target_globs_select_hf_layers():
    model, batches = tiny_bert()
    rep = sf.prune(model, "magnitude", 0.5, target=["*.intermediate.dense", "*.output.dense"], calibration=batches)
    assert sorted(rep.pruned) == sorted(
        [f"encoder.layer.{i}.intermediate.dense" for i in range(3)]
        + [f"encoder.layer.{i}.output.dense" for i in range(3)]
        + [f"encoder.layer.{i}.attention.output.dense" for i in range(3)])
    assert sf.oneshot.METHODS == ("magnitude", "wanda", "sparsegpt")


def test_essential_sparsity_finds_the_knee_and_leaves_the_model_alone():
    from sparseforge.oneshot import essential_sparsity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def quality(m):  # free up to 42% of the weights pruned, then falls
        s = sf.report(m).sparsity
        return 1.0 - 5.0 * max(0.0, s - 0.42)

    levels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    curve = essential_sparsity(model, quality, levels)
    assert curve.essential == 0.4 and curve.dense == 1.0
    assert curve.values[:4] == [1.0] * 4 and curve.values[4] < 0.99
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # lower-is-better metrics (perplexity) read the same way
    worse = essential_sparsity(model, lambda m: 10.0 / quality(m), levels, higher_is_better=False)
    assert worse.essential == 0.4
    with pytest.raises(SparseforgeError, match="ascending"):
        essential_sparsity(model, quality, [0.5, 0.3])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt2_conv1d_layers_get_nm_along_their_inputs_and_save_pretrained_round_trips(method, tmp_path):
    """GPT-2 stores its Linears as transformers Conv1D with the weight [in, out]: groups run over inputs."""
    transformers = pytest.importorskip("transformers")
    from sparseforge.io.hf import load_pretrained, save_pretrained

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 100, (4, 32))} for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = sf.prune(model, method, pattern="2:4", calibration=batches)
    assert sorted(rep.pruned) == sorted(f"transformer.h.{i}.{p}" for i in range(2)
                                        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    modules = dict(model.named_modules())
    for name in rep.pruned:
        w = modules[name].weight.detach().T          # [out, in]
        assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])   # embeddings and tied head
    save_pretrained(model, tmp_path / "gpt2")
    reloaded, _ = load_pretrained(tmp_path / "gpt2")
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    x = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_gpt2_sparsegpt_unstructured_handles_the_transposed_conv1d_weight():
    """SparseGPT's unstructured mask is chosen on flat indices: GPT-2's Conv1D weight, stored [in, out],
    gives a column-major matrix, which once failed with a view error."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100,
                                                                 n_positions=32)).eval()
    batches = [{"input_ids": torch.randint(0, 100, (4, 32))} for _ in range(2)]
    dense = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    rep = sf.prune(model, "sparsegpt", 0.5, calibration=batches)
    assert len(rep.pruned) == 8 and rep.achieved == 0.5
    assert rep.calibration_rows == 2 * 4 * 32  # tokens
    w = model.transformer.h[0].mlp.c_fc.weight.detach()
    kept = w != 0
    assert float(kept.float().mean()) == 0.5
    assert not torch.equal(w[kept], dense[kept])  # the reconstruction moved the kept weights


def test_the_calibrator_collects_only_what_the_method_reads():
    from sparseforge.oneshot.calibration import Calibrator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(20, 12)
    layers = {"0": model[0], "2": model[2]}
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    seen = {}
    Calibrator(model, [x]).run(layers, lambda n, m, s: seen.__setitem__(n, s))  # neither: no forward at all
    assert not calls and all(s.rows == 0 and s.sq_sum is None for s in seen.values())
    Calibrator(model, [x]).run(layers, lambda n, m, s: seen.__setitem__(n, s), activations=True)
    assert calls and seen["0"].gram is None and seen["0"].rows == 20
    torch.testing.assert_close(seen["0"].feature_norms, x.double().norm(dim=0).float())
    stats = Calibrator(model, [x]).statistics(layers, hessian=True)
    torch.testing.assert_close(stats["0"].hessian, 2 * x.t() @ x / 20)
    handle.remove()


def test_a_users_activation_aware_score_runs_through_the_same_path():
    """A Score of one's own that reads the input norms (here |W| * ||X||^2, compared within rows) needs no
    other code: sf.prune collects the statistics its flags ask for and select_masks chooses the mask."""

    class SquaredWanda(sf.Score):
        needs_activations = True
        compare = "row"

        def __call__(self, weight, grad=None, stats=None):
            return weight.abs() * self._stats(stats).feature_norms.square().reshape(1, -1)

        def __str__(self):
            return "squared-wanda"

    torch.manual_seed(0)
    layer = nn.Linear(40, 12)
    x = correlated_inputs(128, 40)
    w0 = layer.weight.detach().clone()
    rep = sf.prune(layer, SquaredWanda(), 0.25, calibration=[x])
    expected = wanda_mask(w0.abs() * x.double().square().sum(0).float().reshape(1, -1), 0.25)
    assert torch.equal(layer.weight != 0, expected) and rep.method == "squared-wanda" and rep.calibration_rows == 128
    with pytest.raises(SparseforgeError, match="squared-wanda reads the layers' inputs"):
        sf.prune(nn.Linear(40, 12), SquaredWanda(), 0.25)


def test_a_method_object_brings_its_parts_and_the_call_overrides_them():
    torch.manual_seed(0)
    base = nn.Linear(64, 16, bias=False)
    x = correlated_inputs(256, 64, seed=2)
    a, b = nn.Linear(64, 16, bias=False), nn.Linear(64, 16, bias=False)
    a.load_state_dict(base.state_dict())
    b.load_state_dict(base.state_dict())
    rep = sf.prune(a, sf.oneshot.SparseGPT(0.5, block_size=16, damp=0.1), pattern="2:4", calibration=[x])
    prune_calibrated(b, [x], "sparsegpt", pattern="2:4", block_size=16, damp=0.1)
    assert rep.method == "sparsegpt" and rep.pattern == "2:4" and torch.equal(a.weight, b.weight)
    c = nn.Linear(64, 16, bias=False)
    c.load_state_dict(base.state_dict())
    sf.prune(c, "sparsegpt", pattern="2:4", calibration=[x])  # block_size 128: other OBS blocks, other weights
    assert not torch.equal(a.weight, c.weight)


def test_a_sparsifier_refuses_what_only_one_shot_pruning_can_give():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(SparseforgeError, match="reads the layers' inputs"):
        sf.Sparsifier(model, sf.Method(schedule=sf.OneShot(final=0.5), score="wanda"), total_steps=2)
    assert not hasattr(model[0], "weight_mask")
    with pytest.raises(SparseforgeError, match="dependency groups at once"):
        sf.Sparsifier(model, sf.Method(schedule=sf.OneShot(final=0.5), pattern="channel-groups"), total_steps=2)
    with pytest.raises(SparseforgeError, match="reconstructs layers"):
        sf.Sparsifier(model, sf.oneshot.SparseGPT(0.5), total_steps=2)
