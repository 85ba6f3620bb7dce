"""The one prune path gives what the four old entry points gave, bit for bit.

``tests/data/prune_golden.pt`` was recorded before ``sf.prune`` became the one entry point (see
``tests/prune_golden.py``): magnitude, random and gradient scores with every pattern and several
allocations, Wanda and SparseGPT unstructured and 2:4, OWL, on MLPs, conv nets, a LLaMA-style
causal LM, GPT-2 (transformers Conv1D) and BERT, and dependency-group channel pruning. Each case
runs here through ``sf.prune`` and must give the same bits in every tensor of the model; MaskLLM's
learned masks likewise.
"""

from __future__ import annotations

import pytest
import torch
from prune_golden import CASES, GOLDEN, MASKLLM_CASES, build_mlp, fingerprint, maskllm_batches, mse, unpack

import sparseforge as sf
from sparseforge.scores import Random

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("transformers")
golden = torch.load(GOLDEN, weights_only=False)


def new_call(name: str, model, data):
    """The case as one sf.prune call (the old call is in tests/data/record_prune_golden.py)."""
    kind, method, spec = name.split("-", 2) if name.count("-") >= 2 else (*name.split("-"), "")
    fixed = {
        "mlp-magnitude-0.6": lambda: sf.prune(model, "magnitude", 0.6),
        "mlp-magnitude-2:4": lambda: sf.prune(model, "magnitude", pattern="2:4"),
        "mlp-magnitude-block4": lambda: sf.prune(model, "magnitude", 0.5, pattern="block:4"),
        "mlp-magnitude-channel": lambda: sf.prune(model, "magnitude", 0.5, pattern="channel"),
        "mlp-magnitude-global": lambda: sf.prune(model, "magnitude", 0.7, allocation="global"),
        "mlp-magnitude-lamp": lambda: sf.prune(model, "magnitude", 0.7, allocation="lamp"),
        "conv-magnitude-erk": lambda: sf.prune(model, "magnitude", 0.8, allocation="erk"),
        "conv-magnitude-2:4": lambda: sf.prune(model, "magnitude", pattern="2:4", target=["2", "5"]),
        "mlp-random-0.5": lambda: sf.prune(model, Random(seed=3), 0.5),
        "mlp-snip-0.6": lambda: sf.prune(model, "snip", 0.6, calibration=data),
        "mlp-taylor-global": lambda: sf.prune(model, "taylor", 0.6, allocation="global", calibration=data),
        "conv-wanda-0.5": lambda: sf.prune(model, "wanda", 0.5, calibration=data),
        "conv-sparsegpt-0.5": lambda: sf.prune(model, "sparsegpt", 0.5, calibration=data),
        "conv-wanda-2:4": lambda: sf.prune(model, "wanda", pattern="2:4", target=["2", "5"], calibration=data),
        "conv-magnitude-cal-2:4": lambda: sf.prune(model, "magnitude", pattern="2:4", target=["2", "5"],
                                                   calibration=data),
        "gpt2-wanda-2:4": lambda: sf.prune(model, "wanda", pattern="2:4", calibration=data),
        "gpt2-sparsegpt-2:4": lambda: sf.prune(model, "sparsegpt", pattern="2:4", calibration=data),
        "gpt2-magnitude-cal-2:4": lambda: sf.prune(model, "magnitude", pattern="2:4",
                                                   calibration=data),
        "bert-wanda-globs": lambda: sf.prune(model, "wanda", 0.5, target=["*.intermediate.dense", "*.output.dense"],
                                             calibration=data),
        "lenet-channels-l1": lambda: sf.prune(model, "l1", 0.5, pattern="channel-groups"),
        "lenet-channels-taylor": lambda: sf.prune(model, "taylor", 0.5, pattern="channel-groups", calibration=data),
        "resnet-channels-l2": lambda: sf.prune(model, "l2", 0.5, pattern="channel-groups"),
        "lenet-channels-l1-fc1-only": lambda: sf.prune(model, "l1", 0.25, pattern="channel-groups",
                                                       target=sf.Target(include=["fc1"])),
    }
    if name in fixed:
        return fixed[name]()
    assert kind in ("mlp", "lm") and method in ("magnitude", "wanda", "sparsegpt"), name
    if spec == "owl":
        return sf.prune(model, method, 0.7, allocation="owl", calibration=data)
    if spec == "2:4":
        return sf.prune(model, method, pattern="2:4", calibration=data)
    return sf.prune(model, method, float(spec), calibration=data)


def assert_same(name: str, got: dict, want: dict) -> None:
    assert got["sha256"].keys() == want["sha256"].keys()
    for key in want["sha256"]:
        if got["sha256"][key] == want["sha256"][key]:
            continue
        # not bit-identical: say how far off, masks first
        if key in want["masks"]:
            assert key in got["masks"], f"{name}: {key} was pruned before, not now"
            assert torch.equal(unpack(got["masks"][key]), unpack(want["masks"][key])), f"{name}: mask of {key}"
            if key in want["weights"]:
                diff = (got["weights"][key] - want["weights"][key]).abs().max()
                raise AssertionError(f"{name}: {key} has the same mask but weights differ by up to {float(diff):.3g}")
        raise AssertionError(f"{name}: {key} is not bit-identical")


@pytest.mark.parametrize("name", list(CASES))
def test_sf_prune_gives_the_old_results_bit_for_bit(name: str) -> None:
    build, keep_weights = CASES[name]
    model, data = build()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = new_call(name, model, data)
    assert isinstance(report, sf.PruneReport)
    assert_same(name, fingerprint(model, before, keep_weights), golden[name])


@pytest.mark.parametrize("name", list(MASKLLM_CASES))
def test_maskllm_learns_the_old_masks_bit_for_bit(name: str) -> None:
    from sparseforge.oneshot.maskllm import train_maskllm

    model = build_mlp(9)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = train_maskllm(model, maskllm_batches(), mse, "2:4", **MASKLLM_CASES[name])
    assert isinstance(report, sf.PruneReport)
    got = fingerprint(model, before, False)
    if not MASKLLM_CASES[name].get("weight_reg"):
        assert report.history == golden[name]["history"]
        assert_same(name, got, golden[name])
        return
    # With the regulariser the logits' gradient arrives in two parts (the task's through the weight's
    # gradient, the regulariser's through the loss), summed in another order than one backward pass
    # summed them: the same masks, losses equal to float rounding.
    assert [r["changed"] for r in report.history] == [r["changed"] for r in golden[name]["history"]]
    for a, b in zip(report.history, golden[name]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert got["masks"].keys() == golden[name]["masks"].keys()
    for key in got["masks"]:
        assert torch.equal(unpack(got["masks"][key]), unpack(golden[name]["masks"][key])), key
    assert got["sha256"] == golden[name]["sha256"]  # same masks on the same frozen weights: the same bits
