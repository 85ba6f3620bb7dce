"""Write ``tests/data/prune_golden.pt``: what the four old prune entry points gave (run at commit 244daaa).

    PYTHONPATH=src:tests python tests/data/record_prune_golden.py

Each case of ``tests/prune_golden.CASES`` is run through the call it had before the one prune path
(``sf.prune``, ``sf.oneshot.prune_calibrated``, ``sf.prune_channels``) on one thread, and
fingerprinted. Kept for provenance: the equality test compares ``sf.prune`` against this file.
"""

from __future__ import annotations

import torch
from prune_golden import CASES, GOLDEN, MASKLLM_CASES, build_mlp, fingerprint, maskllm_batches, mse

import sparseforge as sf
from sparseforge.oneshot import prune_calibrated
from sparseforge.scores import Random


def old_call(name: str, model, data) -> None:
    kind, method, spec = name.split("-", 2) if name.count("-") >= 2 else (*name.split("-"), "")
    if name == "mlp-magnitude-0.6":
        sf.prune(model, "magnitude", 0.6)
    elif name == "mlp-magnitude-2:4":
        sf.prune(model, "magnitude", pattern="2:4")
    elif name == "mlp-magnitude-block4":
        sf.prune(model, "magnitude", 0.5, pattern="block:4")
    elif name == "mlp-magnitude-channel":
        sf.prune(model, "magnitude", 0.5, pattern="channel")
    elif name == "mlp-magnitude-global":
        sf.prune(model, "magnitude", 0.7, allocation="global")
    elif name == "mlp-magnitude-lamp":
        sf.prune(model, "magnitude", 0.7, allocation="lamp")
    elif name == "conv-magnitude-erk":
        sf.prune(model, "magnitude", 0.8, allocation="erk")
    elif name == "conv-magnitude-2:4":
        sf.prune(model, "magnitude", pattern="2:4", target=["2", "5"])
    elif name == "mlp-random-0.5":
        sf.prune(model, Random(seed=3), 0.5)
    elif name == "mlp-snip-0.6":
        sf.prune(model, "snip", 0.6, calibration=data)
    elif name == "mlp-taylor-global":
        sf.prune(model, "taylor", 0.6, allocation="global", calibration=data)
    elif kind in ("mlp", "lm") and method in ("magnitude", "wanda", "sparsegpt"):
        if spec == "owl":
            prune_calibrated(model, data, method, 0.7, allocation="owl")
        elif spec == "2:4":
            prune_calibrated(model, data, method, pattern="2:4")
        else:
            prune_calibrated(model, data, method, float(spec))
    elif name == "conv-wanda-0.5":
        prune_calibrated(model, data, "wanda", 0.5)
    elif name == "conv-sparsegpt-0.5":
        prune_calibrated(model, data, "sparsegpt", 0.5)
    elif name == "conv-wanda-2:4":
        prune_calibrated(model, data, "wanda", pattern="2:4", target=["2", "5"])
    elif name == "conv-magnitude-cal-2:4":
        prune_calibrated(model, data, "magnitude", pattern="2:4", target=["2", "5"])
    elif name == "gpt2-wanda-2:4":
        prune_calibrated(model, data, "wanda", pattern="2:4")
    elif name == "gpt2-sparsegpt-2:4":
        prune_calibrated(model, data, "sparsegpt", pattern="2:4")
    elif name == "gpt2-magnitude-cal-2:4":
        prune_calibrated(model, data, "magnitude", pattern="2:4")
    elif name == "bert-wanda-globs":
        prune_calibrated(model, data, "wanda", 0.5, target=["*.intermediate.dense", "*.output.dense"])
    elif name == "lenet-channels-l1":
        sf.prune_channels(model, "l1", sparsity=0.5)
    elif name == "lenet-channels-taylor":
        sf.prune_channels(model, "taylor", sparsity=0.5, calibration=data)
    elif name == "resnet-channels-l2":
        sf.prune_channels(model, "l2", sparsity=0.5)
    elif name == "lenet-channels-l1-fc1-only":
        sf.prune_channels(model, "l1", sparsity=0.25, include=["fc1"])
    else:
        raise KeyError(name)


def main() -> None:
    torch.set_num_threads(1)
    golden = {}
    for name, (build, keep_weights) in CASES.items():
        model, data = build()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        old_call(name, model, data)
        golden[name] = fingerprint(model, before, keep_weights)
        print(name, len(golden[name]["masks"]), "tensors changed")
    from sparseforge.oneshot.maskllm import train_maskllm

    for name, kwargs in MASKLLM_CASES.items():
        model = build_mlp(9)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rep = train_maskllm(model, maskllm_batches(), mse, "2:4", **kwargs)
        golden[name] = fingerprint(model, before, False) | {"history": rep.history}
        print(name, rep.changed_groups, rep.history[-1])
    torch.save(golden, GOLDEN)
    print("wrote", GOLDEN, GOLDEN.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
