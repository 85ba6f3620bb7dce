"""Transformer block layouts as data (sparseforge.compact.layouts): a layout registered from outside the
package compacts a model of its own; modules that look like a layout but do not fit it are reported;
the built-in layouts beyond BERT/LLaMA/GPT-2 (OPT's FFN in the decoder layer, GPT-NeoX's per-head
fused qkv) remove exactly what is zero and leave the outputs equal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers", reason="compact on Hugging Face models needs transformers (the hf extra)")

from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

import sparseforge as sf  # noqa: E402
from sparseforge.compact.layouts import LAYOUTS, AttentionLayout, FFNLayout  # noqa: E402
from sparseforge.errors import SparseforgeError  # noqa: E402

D = 8  # head size of every tiny model here


class MixerConfig(PretrainedConfig):
    model_type = "sparseforge-layout-test"

    def __init__(self, dim: int = 32, heads: int = 4, vocab_size: int = 50, fused: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.dim, self.heads, self.vocab_size, self.fused = dim, heads, vocab_size, fused


class Mixer(nn.Module):
    """Multi-head attention with its own names: wq/wk/wv/wo, n_heads, d_head (or one fused wqkv)."""

    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.n_heads, self.d_head = heads, dim // heads
        if fused:
            self.wqkv = nn.Linear(dim, 3 * dim)
        else:
            self.wq, self.wk, self.wv = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        width = self.n_heads * self.d_head
        qkv = self.wqkv(x).split(width, dim=-1) if hasattr(self, "wqkv") else (self.wq(x), self.wk(x), self.wv(x))
        q, k, v = (p.view(b, t, self.n_heads, self.d_head).transpose(1, 2) for p in qkv)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        return self.wo(y.transpose(1, 2).reshape(b, t, width))


class MixerModel(PreTrainedModel):
    config_class = MixerConfig

    def __init__(self, config: MixerConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.mixers = nn.ModuleList(Mixer(config.dim, config.heads, config.fused) for _ in range(2))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embed(input_ids)
        for mixer in self.mixers:
            x = x + mixer(x, mask)
        return x


MIXER = AttentionLayout(q="wq", k="wk", v="wv", o="wo", head_dim="d_head", num_heads="n_heads",
                        attributes={"n_heads": "heads"}, summary="The test's Mixer.")
FUSED_MIXER = AttentionLayout(qkv="wqkv", fused="qkv", o="wo", head_dim="d_head", num_heads="n_heads",
                              attributes={"n_heads": "heads"}, summary="The test's Mixer with a fused wqkv.")


@pytest.fixture
def registered():
    """Register layouts for the test, and remove them afterwards (other tests see the built-ins only)."""
    names = []

    def register(name: str, layout: AttentionLayout | FFNLayout) -> None:
        LAYOUTS.register(name, layout)
        names.append(name)

    yield register
    for name in names:
        LAYOUTS.unregister(name)


def _mixer_model(fused: bool = False) -> MixerModel:
    torch.manual_seed(0)
    model = MixerModel(MixerConfig(fused=fused)).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF initialises biases to zero; non-zero ones exercise the folds
            if p.dim() == 1:
                p.normal_(0, 0.3)
    return model


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    return ids, mask


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_a_user_layout_compacts_its_heads_with_equal_outputs(registered) -> None:
    registered("test-mixer", MIXER)
    model = _mixer_model()
    m0, m1 = model.mixers
    m0.wo.weight[:, D:2 * D] = 0                    # head 1: output columns zero
    m0.wv.weight[2 * D:3 * D] = 0                   # head 2: value rows zero, bias kept -> folded into wo
    m1.wo.weight[:, 3 * D:] = 0                     # layer 1, head 3
    m1.wq.weight[:D] = 0                            # layer 1, head 0: zero query rows alone keep the head
    ids, mask = _ids()
    before, params = model(ids, mask), _params(model)

    report = sf.compact(model, {"input_ids": ids, "attention_mask": mask})

    head = 3 * (D * 32 + D) + 32 * D               # q/k/v rows and biases, wo columns
    assert params - _params(model) == 3 * head
    assert (m0.n_heads, m0.wq.out_features, m0.wv.out_features, m0.wo.in_features) == (2, 2 * D, 2 * D, 2 * D)
    assert (m1.n_heads, m1.wk.out_features) == (3, 3 * D)
    assert [(h["layout"], h["after"], h["folded"]) for h in report.heads] == [("test-mixer", 2, 1),
                                                                             ("test-mixer", 3, 0)]
    assert report.shapes["mixers.0"] == {"kind": "attributes", "values": {"n_heads": 2}}
    torch.testing.assert_close(model(ids, mask), before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_fused_user_layout_keeps_q_k_and_v_rows_of_the_same_heads(registered) -> None:
    registered("test-fused-mixer", FUSED_MIXER)
    model = _mixer_model(fused=True)
    m0 = model.mixers[0]
    m0.wo.weight[:, :D] = 0                         # head 0
    m0.wqkv.weight[64 + 3 * D:64 + 4 * D] = 0       # head 3's value rows (v starts at 2 x 32)
    m0.wqkv.bias[64 + 3 * D:64 + 4 * D] = 0
    ids, mask = _ids()
    before = model(ids, mask)
    kept = torch.cat([m0.wqkv.weight[r * 32 + D:r * 32 + 3 * D] for r in range(3)])  # heads 1, 2 of q, k, v

    sf.compact(model, {"input_ids": ids, "attention_mask": mask})

    assert m0.n_heads == 2 and m0.wqkv.out_features == 6 * D
    assert torch.equal(m0.wqkv.weight, kept)
    assert model.mixers[1].wqkv.out_features == 96
    torch.testing.assert_close(model(ids, mask), before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_without_its_layout_the_model_is_refused_naming_the_known_layouts() -> None:
    model = _mixer_model()
    model.mixers[0].wo.weight[:, :D] = 0
    with pytest.raises(SparseforgeError, match=r"MixerModel has no attention or feed-forward block.*llama-attention"):
        sf.compact(model)


def test_registering_a_taken_name_is_an_error() -> None:
    with pytest.raises(SparseforgeError, match="'llama-attention' is already registered"):
        LAYOUTS.register("llama-attention", MIXER)
    with pytest.raises(SparseforgeError, match="already registered"):
        LAYOUTS.register("Llama_Attention", MIXER)  # the same name spelt differently
    assert LAYOUTS.get("llama-attention").o == "o_proj"


def test_layouts_check_their_fields() -> None:
    with pytest.raises(SparseforgeError, match="q, k and v, or one fused qkv"):
        AttentionLayout(q="wq", o="wo", head_dim="d_head")
    with pytest.raises(SparseforgeError, match="not both"):
        AttentionLayout(q="wq", k="wk", v="wv", qkv="wqkv", o="wo", head_dim="d_head")
    with pytest.raises(SparseforgeError, match="each role is one of heads, kv_heads, width, kv_width"):
        AttentionLayout(q="wq", k="wk", v="wv", o="wo", head_dim="d_head", attributes={"n_heads": "count"})
    with pytest.raises(SparseforgeError, match="fused='interleaved'"):
        AttentionLayout(qkv="wqkv", fused="interleaved", o="wo", head_dim="d_head")


class Opaque(nn.Module):
    """A projection compact has no handler for (as a quantized layer would be)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inner = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _llama(**kw):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                  num_hidden_layers=2, vocab_size=100, **kw)).eval()


@torch.no_grad()
def test_a_block_that_looks_like_a_layout_but_does_not_fit_is_reported() -> None:
    model = _llama()
    model.layers[0].self_attn.o_proj = Opaque(32, 32)  # not a layer compact can slice
    model.layers[0].mlp.down_proj.weight[:, :10] = 0
    ids, mask = _ids()
    before = model(ids, attention_mask=mask).last_hidden_state

    report = sf.compact(model, {"input_ids": ids, "attention_mask": mask})

    blocked = {g["members"][0]: g["blocked"] for g in report.groups if g["blocked"]}
    assert blocked == {"layers.0.self_attn": [
        "layers.0.self_attn: looks like a 'llama-attention' attention block, but o_proj is a Opaque, not a layer "
        "compact can slice (nn.Linear, transformers' Conv1D, or a layer registered with a LinearHandler); left whole"]}
    assert [h["members"] for h in report.heads] == [["layers.1.self_attn"]]  # the other attention is found
    assert model.layers[0].mlp.down_proj.in_features == 54                   # and the FFN units still go
    assert "kept whole: layers.0.self_attn: looks like" in str(report)
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, before, rtol=1e-5, atol=1e-5)


def test_missing_head_attributes_and_sizes_that_do_not_fit_are_reported() -> None:
    from sparseforge.compact.transformer import find_attention_and_ffn

    model = _llama()
    del model.layers[0].self_attn.head_dim                   # looks like LLaMA attention, but no head size
    model.layers[1].self_attn.num_key_value_groups = 3       # 4 query heads over 2 KV heads are 2 per group
    attn, _, left = find_attention_and_ffn(model)
    assert left == [("layers.0.self_attn", "layers.0.self_attn: looks like a 'llama-attention' attention block, "
                                           "but head_dim (the head size) is None, not a positive integer; left whole")]
    assert [(a.name, a.blocked) for a in attn] == [
        ("layers.1.self_attn", ["layers.1.self_attn: num_key_value_groups 3 does not match 4 query / 2 KV heads"])]


@torch.no_grad()
def test_opt_ffn_in_the_decoder_layer_is_compacted() -> None:
    from transformers import OPTConfig, OPTModel

    torch.manual_seed(0)
    model = OPTModel(OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2,
                               vocab_size=100, word_embed_proj_dim=32)).eval()
    layer = model.decoder.layers[1]
    layer.fc1.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(2)).abs_()  # ReLU(b) = b > 0
    layer.fc1.weight[:6] = 0                        # ReLU(bias): constants folded into fc2's bias
    layer.fc2.weight[:, 20:24] = 0                  # zero output columns
    layer.self_attn.out_proj.weight[:, :D] = 0      # and a head
    ids, mask = _ids()
    before, params = model(ids, attention_mask=mask).last_hidden_state, _params(model)

    report = sf.compact(model, {"input_ids": ids, "attention_mask": mask})

    assert (layer.fc1.out_features, layer.fc2.in_features) == (54, 54)
    assert model.decoder.layers[0].fc1.out_features == 64
    assert params - _params(model) == 10 * (32 + 1 + 32) + 3 * (D * 32 + D) + 32 * D
    ffn = {g["members"][0]: g for g in report.groups}["decoder.layers.1.fc1"]
    assert (ffn["layout"], ffn["folded"]) == ("opt-ffn", 6)
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gpt_neox_per_head_fused_qkv_removes_whole_heads() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXModel

    torch.manual_seed(0)
    model = GPTNeoXModel(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                       num_hidden_layers=1, vocab_size=100)).eval()
    attn = model.layers[0].attention
    attn.dense.weight[:, 2 * D:3 * D] = 0           # head 2: [q_2 k_2 v_2] are rows 48..71 of query_key_value
    kept = torch.cat([attn.query_key_value.weight[:2 * 3 * D], attn.query_key_value.weight[3 * 3 * D:]])
    ids, mask = _ids()
    before = model(ids, attention_mask=mask).last_hidden_state

    report = sf.compact(model, {"input_ids": ids, "attention_mask": mask})

    assert report.heads[0]["layout"] == "gpt-neox-attention" and report.heads[0]["after"] == 3
    assert torch.equal(attn.query_key_value.weight, kept) and attn.dense.in_features == 3 * D
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, before, rtol=1e-5, atol=1e-5)


def test_the_built_in_layouts_describe_the_tiny_models_as_before() -> None:
    """Which layout describes each block of a few families (the per-architecture rules of before)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from sparseforge.compact.transformer import find_attention_and_ffn

    bert = BertModel(BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1,
                                vocab_size=100))
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=100, n_positions=16, bos_token_id=0,
                                eos_token_id=0))
    found = {}
    for name, model in (("bert", bert), ("llama", _llama()), ("gpt2", gpt2)):
        attn, ffn, left = find_attention_and_ffn(model)
        found[name] = ([(a.name, a.layout, a.num_heads, a.num_kv_heads) for a in attn],
                       [(f.name, f.layout, f.gate is not None) for f in ffn], left)
    assert found["bert"] == ([("encoder.layer.0.attention", "bert-attention", 4, 4)],
                             [("encoder.layer.0", "bert-ffn", False)], [])
    assert found["llama"] == ([(f"layers.{i}.self_attn", "llama-attention", 4, 2) for i in range(2)],
                              [(f"layers.{i}.mlp", "llama-ffn", True) for i in range(2)], [])
    assert found["gpt2"] == ([("h.0.attn", "gpt2-attention", 4, 4)], [("h.0.mlp", "gpt2-ffn", False)], [])
