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
images; one seed (a short run: the gap, not the decimals, is the result).
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
from typing import Any

import torch
from torch import nn

from sparseforge.bench.common import RunConfig, print_table, train_run
from sparseforge.methods.base import Method
from sparseforge.oneshot import prune
from sparseforge.quant.dynamic import quantize_dynamic_int8
from sparseforge.quant.qat import qat_convert, qat_prepare
from sparseforge.quant.rtn import quantization_of, quantize_
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
    parser.add_argument("--seed", type=int, default=0)


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


def _masked_finetune(cfg: RunConfig, model: nn.Module, sparsity: float) -> nn.Module:
    """Fine-tune ``model`` with its (magnitude, uniform) mask held fixed; returns it finalized."""
    method = Method(schedule=OneShot(final=sparsity))
    return train_run(cfg, method, model=model)[1]


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
    del big

    # Part 2: int4 QAT against post-training RTN at the given sparsity.
    ft_cfg = RunConfig(epochs=ft_epochs, seed=args.seed + 1, limit_train=limit_train, limit_test=limit_test,
                       data_dir=args.data_dir)
    pruned = copy.deepcopy(dense).train()
    prune(pruned, sparsity=args.sparsity)
    acc = {"dense_fp32": lenet["fp32_accuracy"], "pruned_fp32": evaluate(pruned, test)["accuracy"]}
    acc["pruned_rtn_int4"] = evaluate(quantize_(copy.deepcopy(pruned), "int4"), test)["accuracy"]
    float_ft = _masked_finetune(ft_cfg, copy.deepcopy(pruned), args.sparsity)
    acc["finetuned_fp32"] = evaluate(float_ft, test)["accuracy"]
    acc["finetuned_rtn_int4"] = evaluate(quantize_(float_ft, "int4"), test)["accuracy"]
    qat = _masked_finetune(ft_cfg, qat_prepare(copy.deepcopy(pruned), bits=4), args.sparsity)
    acc["qat_int4_fake_quant"] = evaluate(qat, test)["accuracy"]
    qat_convert(qat)
    acc["qat_int4_converted"] = evaluate(qat, test)["accuracy"]
    weights = [m.weight for m in qat.modules() if isinstance(m, nn.Linear)]
    qat_sparsity = 1.0 - sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    recorded = all(quantization_of(m) is not None and quantization_of(m).bits == 4
                   for m in qat.modules() if isinstance(m, nn.Linear))
    print_table(
        f"LeNet-300-100 at {args.sparsity:.0%} sparsity, int4 per channel: test accuracy (%, {limit_test} images)",
        ["dense fp32", "pruned fp32", "pruned RTN", "fine-tuned fp32", "fine-tuned RTN", "QAT (LSQ) int4"],
        [[acc["dense_fp32"], acc["pruned_fp32"], acc["pruned_rtn_int4"], acc["finetuned_fp32"],
          acc["finetuned_rtn_int4"], acc["qat_int4_converted"]]],
    )
    return {
        "benchmark": "quant-speed",
        "quick": quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
        "settings": {"rounds": rounds, "epochs": epochs, "finetune_epochs": ft_epochs, "sparsity": args.sparsity,
                     "linear_size": size, "limit_train": limit_train, "limit_test": limit_test, "seed": args.seed,
                     "batches": list(BATCHES)},
        "dynamic_int8": {"lenet300": lenet, "linear": linear, "dense_train_seconds": round(dense_result.seconds, 2)},
        "qat_vs_rtn_int4": {"accuracy": acc, "qat_sparsity": round(qat_sparsity, 5),
                            "qat_codes_recorded": recorded, "bits": 4, "per_channel": True,
                            "qat_gain_over_finetuned_rtn": round(acc["qat_int4_converted"] - acc["finetuned_rtn_int4"], 3)},
    }
