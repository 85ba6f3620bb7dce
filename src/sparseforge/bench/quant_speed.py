"""Dynamic int8 against fp32 (speed, size, accuracy) and int4 QAT (LSQ) against post-training RTN.

Part 1, dynamic int8 (:func:`sparseforge.quant.quantize_dynamic_int8`): a
LeNet-300-100 trained briefly on Fashion-MNIST, and a random 4096x4096
Linear, each timed at batch 1/8/64 in fp32 and int8 in alternating blocks
within one run (``sparseforge.timing``, order flipping every round; medians);
speed ratio = fp32 median / int8 median, relative output error
``||y - y_fp32|| / ||y_fp32||`` on the timed batch, size ratio of the
serialized state dicts (``torch.save``), and for LeNet the test accuracy on
the first 1000 test images of both.

Part 2, int4 at 90% sparsity on LeNet-300-100: the dense model of part 1 is
pruned to 90% (magnitude, uniform), then (a) fine-tuned in float with its
mask fixed and quantized post-training by RTN (int4, per channel), or (b)
fine-tuned with LSQ quantization-aware training (int4, per channel,
:func:`sparseforge.quant.qat_prepare`) under the same mask for the same
epochs and converted (:func:`sparseforge.quant.qat_convert`). RTN of the
pruned model before fine-tuning is reported too. Accuracy on the same test
images; 3 seeds (dense training, pruning and fine-tuning all seeded), mean
and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
from typing import Any

import torch
from torch import nn

from sparseforge.bench.common import RunConfig, print_table, summarize, train_run
from sparseforge.method import Method
from sparseforge.oneshot import prune
from sparseforge.quant.dynamic import quantize_dynamic_int8
from sparseforge.quant.qat import qat_convert, qat_prepare
from sparseforge.quant.rtn import quantization_of, quantize_, quantize_weight
from sparseforge.schedules import OneShot
from sparseforge.timing import median_ms, time_interleaved
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.training import evaluate

BATCHES = (1, 8, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (default 30, quick 3)")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default 3, quick 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="float and QAT fine-tuning epochs after pruning (default 2, quick 1)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--linear-size", type=int, default=None, help="square Linear to time (default 4096, quick 256)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images (quick: 2048)")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test images (default 1000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the QAT/RTN comparison (default 3, quick 1)")
    parser.add_argument("--candidates", action="store_true",
                        help="also time the kernels considered for dynamic int8 (torchao if importable, "
                             "torch._int_mm, dequantize on the fly) against fp32, on the same models")


def _state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def time_pair(fp32: nn.Module, int8: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """fp32 and int8 forward on ``x`` timed interleaved; medians, speed ratio and output error."""
    with torch.inference_mode():
        ref, y = fp32(x), int8(x)
        times, per_block = time_interleaved({"fp32": lambda: fp32(x), "int8": lambda: int8(x)}, rounds)
    f, q = median_ms(times["fp32"]), median_ms(times["int8"])
    ratios = [a / b for a, b in zip(times["fp32"], times["int8"])]
    return {
        "batch_size": int(x.shape[0]), "fp32_ms": round(f, 5), "int8_ms": round(q, 5),
        "speedup": round(f / q, 3), "speedup_median_of_round_ratios": round(statistics.median(ratios), 3),
        "rel_error": round(_rel_error(y, ref), 5), "rounds": rounds, "calls_per_block": per_block,
    }


def _dynamic_rows(
    name: str, fp32: nn.Module, input_shape: tuple[int, ...], rounds: int
) -> tuple[dict[str, Any], nn.Module]:
    """Time fp32 against its dynamic int8 copy at every batch size; rows, sizes and the int8 model."""
    int8 = quantize_dynamic_int8(fp32)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in BATCHES:
        r = time_pair(fp32, int8, torch.randn(b, *input_shape, generator=gen), rounds)
        print(f"{name:12s} batch {b:3d}  fp32 {r['fp32_ms']:9.4f} ms  int8 {r['int8_ms']:9.4f} ms  "
              f"x{r['speedup']:.2f}  rel.err {r['rel_error']:.4f}", flush=True)
        rows.append(r)
    fb, qb = _state_bytes(fp32), _state_bytes(int8)
    return {"model": name, "fp32_bytes": fb, "int8_bytes": qb, "size_ratio": round(fb / qb, 3),
            "timing": rows}, int8


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qt = quantize_weight(w.detach(), bits=8)
    return qt.q, qt.scale.reshape(1, -1)


class _IntMMLinear(nn.Module):
    """Candidate: int8 weights, int8 activations with one scale per row, ``torch._int_mm``."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        q, self.scale = _int8_rows(lin.weight)
        self.qt = q.t().contiguous()
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.qt).to(torch.float32) * xs * self.scale
        return y if self.bias is None else y + self.bias


class _DequantLinear(nn.Module):
    """Candidate: int8 weights dequantized at every call, float activations."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.q, self.scale = _int8_rows(lin.weight)
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.q.to(torch.float32) * self.scale.reshape(-1, 1), self.bias)


def _swap_linears(model: nn.Module, make) -> nn.Module:
    model = copy.deepcopy(model)
    if isinstance(model, nn.Linear):
        return make(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model


def candidates(name: str, fp32: nn.Module, input_shape: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    """Every dynamic int8 candidate against fp32, interleaved in one run per batch size."""
    models = {"fp32": fp32, "torch.ao dynamic (chosen)": quantize_dynamic_int8(fp32)}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig
            from torchao.quantization import quantize_ as ao_quantize_

            ao = copy.deepcopy(fp32)
            ao_quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        models[f"torchao {torchao.__version__} Int8DynamicActivationInt8Weight"] = ao
    except Exception as e:  # not installed, or its API moved: the row says so
        print(f"torchao not measured: {type(e).__name__}: {e}", flush=True)
    models["hand: torch._int_mm"] = _swap_linears(fp32, _IntMMLinear)
    models["hand: dequantize on the fly"] = _swap_linears(fp32, _DequantLinear)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in BATCHES:
        x = torch.randn(b, *input_shape, generator=gen)
        with torch.inference_mode():
            ref = fp32(x)
            errors = {k: _rel_error(m(x), ref) for k, m in models.items()}
            times, _ = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, rounds)
        base = median_ms(times["fp32"])
        for k in models:
            ms = median_ms(times[k])
            rows.append({"model": name, "candidate": k, "batch_size": b, "ms": round(ms, 5),
                         "speedup": round(base / ms, 3), "rel_error": round(errors[k], 5)})
            print(f"{name:12s} batch {b:3d}  {k:48s} {ms:9.4f} ms  x{base / ms:5.2f}  rel.err {errors[k]:.4f}",
                  flush=True)
    return rows


def _masked_finetune(cfg: RunConfig, model: nn.Module, sparsity: float) -> nn.Module:
    """Fine-tune ``model`` with its (magnitude, uniform) mask held fixed; returns it finalized."""
    method = Method(schedule=OneShot(final=sparsity))
    return train_run(cfg, method, model=model)[1]


def qat_vs_rtn(
    seed: int, dense: nn.Module | None, epochs: int, ft_epochs: int, sparsity: float,
    limit_train: int | None, limit_test: int, data_dir: str | None,
) -> dict[str, Any]:
    """One seed of part 2: dense (trained here unless given) -> prune -> float fine-tune + RTN, or QAT."""
    cfg = RunConfig(epochs=epochs, seed=seed, limit_train=limit_train, limit_test=limit_test, data_dir=data_dir)
    _, test = fashion_mnist(256, data_dir, seed, limit_train, limit_test)
    if dense is None:
        dense = train_run(cfg)[1]
    ft_cfg = RunConfig(epochs=ft_epochs, seed=seed + 1000, limit_train=limit_train, limit_test=limit_test,
                       data_dir=data_dir)
    pruned = copy.deepcopy(dense).train()
    prune(pruned, sparsity=sparsity)
    acc = {"dense_fp32": evaluate(dense, test)["accuracy"], "pruned_fp32": evaluate(pruned, test)["accuracy"]}
    acc["pruned_rtn_int4"] = evaluate(quantize_(copy.deepcopy(pruned), "int4"), test)["accuracy"]
    float_ft = _masked_finetune(ft_cfg, copy.deepcopy(pruned), sparsity)
    acc["finetuned_fp32"] = evaluate(float_ft, test)["accuracy"]
    acc["finetuned_rtn_int4"] = evaluate(quantize_(float_ft, "int4"), test)["accuracy"]
    qat = _masked_finetune(ft_cfg, qat_prepare(copy.deepcopy(pruned), bits=4), sparsity)
    acc["qat_int4_fake_quant"] = evaluate(qat, test)["accuracy"]
    qat_convert(qat)
    acc["qat_int4_converted"] = evaluate(qat, test)["accuracy"]
    weights = [m.weight for m in qat.modules() if isinstance(m, nn.Linear)]
    qat_sparsity = 1.0 - sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    recorded = all(quantization_of(m) is not None and quantization_of(m).bits == 4
                   for m in qat.modules() if isinstance(m, nn.Linear))
    return {"seed": seed, "accuracy": acc, "qat_sparsity": round(qat_sparsity, 5), "qat_codes_recorded": recorded}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    rounds = args.rounds or (3 if quick else 30)
    epochs = args.epochs or (1 if quick else 3)
    ft_epochs = args.finetune_epochs or (1 if quick else 2)
    size = args.linear_size or (256 if quick else 4096)
    limit_train = args.limit_train or (2048 if quick else None)
    limit_test = args.limit_test or 1000
    cfg = RunConfig(epochs=epochs, seed=args.seed, limit_train=limit_train, limit_test=limit_test,
                    data_dir=args.data_dir)
    _, test = fashion_mnist(256, args.data_dir, args.seed, limit_train, limit_test)

    # Part 1: dynamic int8 against fp32.
    dense_result, dense = train_run(cfg)
    dense.eval()
    lenet, lenet_int8 = _dynamic_rows("lenet300", dense, tuple(dense.input_shape), rounds)
    lenet["fp32_accuracy"] = evaluate(dense, test)["accuracy"]
    lenet["int8_accuracy"] = evaluate(lenet_int8, test)["accuracy"]
    print(f"lenet300 test accuracy ({limit_test} images): fp32 {lenet['fp32_accuracy']:.2f}%  "
          f"int8 {lenet['int8_accuracy']:.2f}%  size fp32/int8 x{lenet['size_ratio']:.2f}", flush=True)
    torch.manual_seed(args.seed)
    big = nn.Sequential(nn.Linear(size, size)).eval()
    linear, _ = _dynamic_rows(f"linear{size}", big, (size,), rounds)
    print(f"linear{size} size fp32/int8 x{linear['size_ratio']:.2f}", flush=True)
    cand = []
    if args.candidates:
        cand = candidates("lenet300", dense, tuple(dense.input_shape), rounds)
        cand += candidates(f"linear{size}", big, (size,), rounds)
    del big

    # Part 2: int4 QAT against post-training RTN at the given sparsity, one run per seed.
    seeds = list(range(args.seed, args.seed + (args.seeds or (1 if quick else 3))))
    runs = []
    for seed in seeds:
        model = dense if seed == args.seed else None
        runs.append(qat_vs_rtn(seed, model, epochs, ft_epochs, args.sparsity, limit_train, limit_test, args.data_dir))
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.2f}" for k, v in runs[-1]["accuracy"].items()), flush=True)
    keys = list(runs[0]["accuracy"])
    summary = {k: summarize([r["accuracy"][k] for r in runs]) for k in keys}
    gains = [r["accuracy"]["qat_int4_converted"] - r["accuracy"]["finetuned_rtn_int4"] for r in runs]
    cols = ["dense_fp32", "pruned_fp32", "pruned_rtn_int4", "finetuned_fp32", "finetuned_rtn_int4",
            "qat_int4_converted"]
    print_table(
        f"LeNet-300-100 at {args.sparsity:.0%} sparsity, int4 per channel: test accuracy (%, {limit_test} images, "
        f"mean ± std over {len(seeds)} seed(s))",
        ["dense fp32", "pruned fp32", "pruned RTN", "fine-tuned fp32", "fine-tuned RTN", "QAT (LSQ) int4"],
        [[f"{summary[k]['mean']:.2f} ± {summary[k]['std']:.2f}" for k in cols]],
    )
    qat_result = {
        "seeds": seeds, "bits": 4, "per_channel": True,
        "accuracy": {k: round(summary[k]["mean"], 4) for k in keys},
        "summary": summary,
        "qat_gain_over_finetuned_rtn": summarize(gains),
        "qat_sparsity": min(r["qat_sparsity"] for r in runs),
        "qat_codes_recorded": all(r["qat_codes_recorded"] for r in runs),
        "runs": runs,
    }
    return {
        "benchmark": "quant-speed",
        "quick": quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
        "settings": {"rounds": rounds, "epochs": epochs, "finetune_epochs": ft_epochs, "sparsity": args.sparsity,
                     "linear_size": size, "limit_train": limit_train, "limit_test": limit_test, "seed": args.seed,
                     "batches": list(BATCHES)},
        "dynamic_int8": {"lenet300": lenet, "linear": linear, "dense_train_seconds": round(dense_result.seconds, 2),
                         "candidates": cand},
        "qat_vs_rtn_int4": qat_result,
    }
