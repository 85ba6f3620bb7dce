"""Seeded models, data and a fingerprint of the result, for the one-prune-path equality test.

``tests/data/prune_golden.pt`` holds what the pruning code produced before the one prune path
(issue 15): for every case the SHA-256 of every parameter and buffer after pruning (bit-exact),
the keep-masks of the pruned layers and, for the weight-updating methods, the weights. It was
written by ``tests/data/record_prune_golden.py`` at commit 244daaa (the four old entry points);
``tests/test_prune_equality.py`` runs the same cases through ``sf.prune`` and compares.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import build_convnet, build_mlp, random_loader
from torch import nn

GOLDEN = Path(__file__).parent / "data" / "prune_golden.pt"


def features(rows: int, width: int, seed: int) -> torch.Tensor:
    """Inputs with unequal feature scales and correlations (so Wanda, SparseGPT and magnitude disagree)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5
    scale = torch.logspace(-1, 1, width)[torch.randperm(width, generator=g)]
    return (torch.randn(rows, width, generator=g) @ mix + 0.3 * torch.randn(rows, width, generator=g)) * scale


def mlp_batches() -> list[torch.Tensor]:
    return [features(64, 16, seed) for seed in (1, 2)]


def conv_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]


def causal_lm() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model

    model = build_model(TINY_CONFIG, seed=0).eval()
    g = torch.Generator().manual_seed(5)
    return model, [{"input_ids": torch.randint(0, 320, (4, 16), generator=g)} for _ in range(3)]


def tiny_gpt2() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(6)
    return model, [{"input_ids": torch.randint(0, 100, (4, 16), generator=g)} for _ in range(2)]


def tiny_bert() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    import transformers

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    return model, [{"input_ids": torch.randint(0, 50, (4, 16), generator=g),
                    "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]


def zoo(name: str, **kwargs: Any) -> nn.Module:
    from sparseforge.zoo import build_model

    torch.manual_seed(3)
    return build_model(name, **kwargs)


def grad_loader():
    return random_loader((16,), n=48, batch_size=16, seed=5)


def fingerprint(model: nn.Module, before: dict[str, torch.Tensor], keep_weights: bool) -> dict[str, Any]:
    """SHA-256 of every tensor of the state dict; masks (and weights) of the tensors pruning changed."""
    out: dict[str, Any] = {"sha256": {}, "masks": {}, "weights": {}}
    for key, value in model.state_dict().items():
        t = value.detach().contiguous().cpu().reshape(-1)
        out["sha256"][key] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
        if key in before and value.is_floating_point() and not torch.equal(value, before[key]):
            out["masks"][key] = pack(value != 0)
            if keep_weights:
                out["weights"][key] = value.detach().clone()
    return out


def pack(mask: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """A bool mask as (shape, 8 bits per byte), to keep the golden file small."""
    bits = np.packbits(mask.detach().cpu().reshape(-1).numpy())
    return tuple(mask.shape), torch.from_numpy(bits)


def unpack(packed: tuple[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    shape, bits = packed
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(bits.numpy())[:n].astype(bool)).reshape(shape)


Case = tuple[Callable[[], tuple[nn.Module, Any]], bool]
"""(build: () -> (model, data), whether the method updates kept weights)."""

CASES: dict[str, Case] = {
    # data-free scores, patterns and allocations (sf.prune before)
    "mlp-magnitude-0.6": (lambda: (build_mlp(0), None), False),
    "mlp-magnitude-2:4": (lambda: (build_mlp(1), None), False),
    "mlp-magnitude-block4": (lambda: (build_mlp(2), None), False),
    "mlp-magnitude-channel": (lambda: (build_mlp(3), None), False),
    "mlp-magnitude-global": (lambda: (build_mlp(4), None), False),
    "mlp-magnitude-lamp": (lambda: (build_mlp(5), None), False),
    "conv-magnitude-erk": (lambda: (build_convnet(0), None), False),
    "conv-magnitude-2:4": (lambda: (build_convnet(1), None), False),
    "mlp-random-0.5": (lambda: (build_mlp(6), None), False),
    "mlp-snip-0.6": (lambda: (build_mlp(7), grad_loader()), False),
    "mlp-taylor-global": (lambda: (build_mlp(8), grad_loader()), False),
    # calibrated methods (prune_calibrated before)
    **{f"mlp-{m}-{p}": ((lambda s=s: (build_mlp(s), mlp_batches())), m == "sparsegpt")
       for s, (m, p) in enumerate((m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("0.5", "2:4"))},
    "conv-wanda-0.5": (lambda: (build_convnet(2), conv_batches()), False),
    "conv-sparsegpt-0.5": (lambda: (build_convnet(3), conv_batches()), True),
    "conv-wanda-2:4": (lambda: (build_convnet(4), conv_batches()), False),
    "conv-magnitude-cal-2:4": (lambda: (build_convnet(5), conv_batches()), False),
    **{f"lm-{m}-{p}": (causal_lm, m == "sparsegpt")
       for m in ("magnitude", "wanda", "sparsegpt") for p in ("0.5", "2:4", "owl")},
    "gpt2-wanda-2:4": (tiny_gpt2, False),
    "gpt2-sparsegpt-2:4": (tiny_gpt2, True),
    "gpt2-magnitude-cal-2:4": (tiny_gpt2, False),
    "bert-wanda-globs": (tiny_bert, False),
    # dependency-group channel pruning (prune_channels before)
    "lenet-channels-l1": (lambda: (zoo("lenet300"), None), False),
    "lenet-channels-taylor": (
        lambda: (zoo("lenet300"), [(torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(s)),
                                    torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(s)))
                                   for s in (0, 1)]), False),
    "resnet-channels-l2": (lambda: (zoo("resnet20", width=8), None), False),
    "lenet-channels-l1-fc1-only": (lambda: (zoo("lenet300"), None), False),
}


def maskllm_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(16, 16, generator=g), torch.randn(16, 4, generator=g)) for _ in range(4)]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


MASKLLM_CASES: dict[str, dict[str, Any]] = {
    # train_maskllm's arguments; the model is build_mlp(9), the batches maskllm_batches()
    "maskllm-magnitude": {"steps": 30, "lr": 1e-2},
    "maskllm-wanda-reg": {"steps": 20, "lr": 1e-2, "prior": "wanda", "weight_reg": 0.5, "seed": 3},
}
