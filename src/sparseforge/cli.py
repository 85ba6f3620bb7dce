"""The ``sparseforge`` command line: ``demo``, ``prune``, ``inspect``, ``compact``, ``export``, ``quantize``.

Bad input ends with one line, ``sparseforge: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sparseforge.errors import SparseforgeError

EPILOG = """examples:
  sparseforge demo                                   # train, prune to 90% with GMP, compare (about a minute)
  sparseforge inspect runs/demo-lenet300-*/model.safetensors
  sparseforge prune model.safetensors --sparsity 0.5 --pattern 2:4 --out pruned.safetensors
  sparseforge prune model.safetensors --score snip --sparsity 0.8 --allocation global --out pruned.safetensors
  sparseforge compact pruned.safetensors --out small.safetensors   # remove channels pruned with --pattern channel
  sparseforge export pruned.safetensors --out model.sfz --values fp16   # bitmask + packed values
  sparseforge quantize pruned.safetensors --out model-int8.sfz --scheme int8
"""


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from sparseforge.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a dense model on Fashion-MNIST, prune it with GMP, compare",
        description=(
            "Train a dense model on Fashion-MNIST, then continue training it twice from the same "
            "point: dense (the baseline) and under gradual magnitude pruning to --sparsity. Prints "
            "a table (accuracy, sparsity, nonzeros, FLOPs) and writes RUNS_DIR/NAME/ with "
            "metrics.json, training.png and model.safetensors."
        ),
    )
    p.add_argument("--model", default=d.model, help=f"zoo model: lenet300, conv4, resnet20 (default {d.model})")
    p.add_argument("--sparsity", type=float, default=d.sparsity, help=f"final sparsity in [0, 1) (default {d.sparsity})")
    p.add_argument("--dense-epochs", type=int, default=d.dense_epochs, help=f"dense training epochs (default {d.dense_epochs})")
    p.add_argument("--sparse-epochs", type=int, default=d.sparse_epochs,
                   help=f"epochs of pruning + fine-tuning, and of the dense baseline (default {d.sparse_epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak SGD learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument("--data-dir", default=None,
                   help="folder with the Fashion-MNIST .gz files (default: $SPARSEFORGE_DATA or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--runs-dir", default=d.runs_dir, help=f"where run folders go (default {d.runs_dir})")
    p.add_argument("--name", default=None, help="run folder name (default demo-MODEL-TIMESTAMP)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a saved checkpoint once (score, sparsity, pattern, allocation)",
        description=(
            "One-shot pruning of a checkpoint written by sparseforge (e.g. the demo's model.safetensors). "
            "Gradient scores (gradient, snip, taylor) use Fashion-MNIST training batches for calibration."
        ),
    )
    p.add_argument("checkpoint", help="a sparseforge .safetensors checkpoint")
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--score", default="magnitude", help="magnitude (default), random, gradient, snip, taylor")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of the targeted weights to prune, in [0, 1); optional for N:M")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default), N:M (e.g. 2:4), block:B, channel")
    p.add_argument("--allocation", default="uniform", help="uniform (default), global, erk, er, lamp")
    p.add_argument("--include", nargs="+", default=None, metavar="GLOB", help="module name globs to prune (default: all Linear/Conv)")
    p.add_argument("--exclude", nargs="+", default=(), metavar="GLOB", help="module name globs to leave dense")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches for gradient scores (default 8)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder for calibration")
    p.add_argument("--seed", type=int, default=0, help="seed of random scores and calibration batches (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print the sparsity report of a checkpoint",
        description="Per-layer and total sparsity, parameters, nonzeros and FLOPs of a sparseforge checkpoint.",
    )
    p.add_argument("checkpoint", help="a sparseforge .safetensors checkpoint")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compact",
        help="physically remove pruned channels: a smaller dense checkpoint",
        description=(
            "Remove every channel (and attention head) that is pruned in all the slices tied to it "
            "(see sparseforge.compact), check the outputs are unchanged, and write a checkpoint that "
            "stores the new layer sizes (inspect and load rebuild them)."
        ),
    )
    p.add_argument("checkpoint", help="a sparseforge .safetensors checkpoint")
    p.add_argument("--out", required=True, help="where to write the compacted checkpoint")
    p.add_argument("--json", action="store_true", help="print the compaction report as JSON")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a compressed .sfz file (bitmask + packed values) or plain safetensors",
        description=(
            "Convert a sparseforge checkpoint (.safetensors or .sfz) to --format sfz (Linear/Conv weights as "
            "a bitmask plus the packed nonzero values, see sparseforge.save) or safetensors (plain, dense)."
        ),
    )
    p.add_argument("checkpoint", help="a sparseforge checkpoint (.safetensors or .sfz)")
    p.add_argument("--out", required=True, help="where to write the result")
    p.add_argument("--format", default="sfz", choices=("sfz", "safetensors"), help="(default sfz)")
    p.add_argument("--values", default="fp16", choices=("fp16", "fp32", "int8", "int4"),
                   help="sfz weight values: fp16 (default), fp32 (exact), int8/int4 (codes + per-channel scales)")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="weight quantization (int8/int4 round-to-nearest, or GPTQ) that keeps zeros zero",
        description=(
            "Quantize every Linear/Conv weight of a checkpoint (symmetric, scales over the kept weights, zeros "
            "stay zero; see sparseforge.quant): int8/int4 round to nearest, gptq-int8/gptq-int4 correct each "
            "column's rounding error with the Hessian of the layer inputs on Fashion-MNIST calibration images. "
            "An --out ending in .sfz stores the codes (int4 packed two per byte); any other name a plain "
            "checkpoint of the dequantized weights."
        ),
    )
    p.add_argument("checkpoint", help="a sparseforge checkpoint (.safetensors or .sfz)")
    p.add_argument("--out", required=True, help="where to write the quantized checkpoint (.sfz: compressed)")
    p.add_argument("--scheme", default="int8", choices=("int8", "int4", "gptq-int8", "gptq-int4"),
                   help="(default int8)")
    p.add_argument("--group-size", type=int, nargs="?", const=128, default=None, metavar="G",
                   help="inputs per scale along the input dimension (bare flag: 128; default: one scale per output channel)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="GPTQ: batches of 128 Fashion-MNIST training images (default 4)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder for GPTQ calibration")
    p.add_argument("--seed", type=int, default=0, help="GPTQ: which calibration images (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseforge",
        description="Make neural networks sparse and small: prune, train sparse, inspect.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sparseforge import __version__

    parser.add_argument("--version", action="version", version=f"sparseforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_prune(sub)
    _add_inspect(sub)
    _add_compact(sub)
    _add_export(sub)
    _add_quantize(sub)
    return parser


def _print_report(rep, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep, end="")


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparseforge.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model=args.model, sparsity=args.sparsity, dense_epochs=args.dense_epochs, sparse_epochs=args.sparse_epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, data_dir=args.data_dir, runs_dir=args.runs_dir,
        name=args.name, limit_train=args.limit_train, limit_test=args.limit_test,
    )
    run_demo(cfg, quiet=args.quiet)
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from sparseforge.export.checkpoint import load_checkpoint, save_checkpoint
    from sparseforge.oneshot.prune import prune
    from sparseforge.scores import Random, as_score
    from sparseforge.targets import Target

    model, meta = load_checkpoint(args.checkpoint)
    score = Random(seed=args.seed) if str(args.score).lower() == "random" else as_score(args.score)
    calibration = None
    if score.needs_grad:
        if int(args.calibration_batches) < 1:
            raise SparseforgeError("--calibration-batches must be >= 1 for gradient scores")
        calibration = _fashion_calibration(args.data_dir, args.seed, args.calibration_batches)
    target = Target(include=tuple(args.include) if args.include else ("*",), exclude=tuple(args.exclude))
    torch.manual_seed(args.seed)
    rep = prune(model, score, sparsity=args.sparsity, pattern=args.pattern, allocation=args.allocation,
                target=target, calibration=calibration)
    extra = dict(meta["extra"]) | {
        "pruned": {"score": str(score), "sparsity": rep.sparsity, "pattern": args.pattern,
                   "allocation": args.allocation, "source": str(args.checkpoint)}
    }
    save_checkpoint(model, args.out, arch=meta["arch"], arch_kwargs=meta["arch_kwargs"], extra=extra)
    _print_report(rep, args.json)
    if not args.json:
        print(f"wrote {args.out}")
    return 0


def _fashion_calibration(data_dir: str | None, seed: int, batches: int) -> list:
    """``batches`` shuffled batches of 128 Fashion-MNIST training images with their labels."""
    from sparseforge.zoo.data import fashion_mnist

    train, _ = fashion_mnist(batch_size=128, data_dir=data_dir, seed=seed, limit_train=128 * int(batches),
                             limit_test=1)
    return list(train)


def _load_any(path: str):
    """(model, metadata) of a sparseforge checkpoint in either format, told apart by its metadata
    (a file named ``.sfz`` that is not one gets the sfz reader's error)."""
    from sparseforge.export.checkpoint import load_checkpoint
    from sparseforge.export.sfz import is_sfz, load_sfz

    return load_sfz(path) if is_sfz(path) or str(path).endswith(".sfz") else load_checkpoint(path)


def _sfz_table(meta: dict) -> str:
    import io

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sfz format version {meta['format_version']}: {meta['file_bytes']:,} bytes on disk")
    for col in ("tensor", "shape", "encoding", "values", "pattern", "nonzeros", "bytes"):
        t.add_column(col, justify="right" if col in ("nonzeros", "bytes") else "left")
    for name, info in meta["tensors"].items():
        q = info.get("quant")
        values = info.get("values", info["dtype"]) + (f" g{q['group_size']}" if q and q.get("group_size") else "")
        t.add_row(name, "x".join(map(str, info["shape"])), info["encoding"], values, info.get("pattern", "-"),
                  f"{info['nnz']:,}" if "nnz" in info else "-", f"{info['bytes']:,}")
    buf = io.StringIO()
    Console(file=buf, width=120, force_terminal=False, color_system=None).print(t)
    return buf.getvalue()


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sparseforge.report import report

    model, meta = _load_any(args.checkpoint)
    rep = report(model)
    tensors = meta.get("tensors")
    if args.json:
        out = {"checkpoint": str(args.checkpoint), "arch": meta["arch"], "extra": meta["extra"]} | rep.to_dict()
        if tensors is not None:
            out |= {"format": "sfz", "format_version": meta["format_version"], "file_bytes": meta["file_bytes"],
                    "tensors": {k: {f: v for f, v in info.items() if f != "sha256"} for k, info in tensors.items()}}
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.checkpoint}: {meta['arch'] or 'custom model'}")
        _print_report(rep, False)
        if tensors is not None:
            print(_sfz_table(meta), end="")
    return 0


def _write(model, out: str, meta: dict, fmt: str, values: str, extra: dict) -> None:
    from sparseforge.export.checkpoint import save_checkpoint
    from sparseforge.export.sfz import save

    if fmt == "sfz":
        save(model, out, values=values, arch=meta["arch"], arch_kwargs=meta["arch_kwargs"], extra=extra)
    else:
        save_checkpoint(model, out, arch=meta["arch"], arch_kwargs=meta["arch_kwargs"], extra=extra)


def _cmd_export(args: argparse.Namespace) -> int:
    import os

    model, meta = _load_any(args.checkpoint)
    _write(model, args.out, meta, args.format, args.values, dict(meta["extra"]))
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({args.format}{', ' + args.values + ' values' if args.format == 'sfz' else ''}, "
          f"{size:,} bytes; {args.checkpoint}: {os.path.getsize(args.checkpoint):,} bytes)")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from sparseforge.quant.rtn import quantize_
    from sparseforge.report import report

    scheme = str(args.scheme).lower()
    model, meta = _load_any(args.checkpoint)
    if scheme.startswith("gptq"):
        from sparseforge.quant.gptq import gptq_

        if int(args.calibration_batches) < 1:
            raise SparseforgeError("--calibration-batches must be >= 1")
        gptq_(model, _fashion_calibration(args.data_dir, args.seed, args.calibration_batches), scheme,
              args.group_size, act_order=args.act_order, progress=not args.json)
    else:
        quantize_(model, scheme, group_size=args.group_size)
    extra = dict(meta["extra"]) | {"quantized": {"scheme": scheme, "group_size": args.group_size,
                                                 "source": str(args.checkpoint)}}
    fmt = "sfz" if str(args.out).endswith(".sfz") else "safetensors"
    _write(model, args.out, meta, fmt, scheme.removeprefix("gptq-"), extra)
    _print_report(report(model), args.json)
    if not args.json:
        print(f"wrote {args.out} ({scheme}, {'per channel' if args.group_size is None else f'groups of {args.group_size}'}, {fmt})")
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from sparseforge.export.checkpoint import load_checkpoint, save_checkpoint
    from sparseforge.export.compact import compact

    model, meta = load_checkpoint(args.checkpoint)
    rep = compact(model)
    extra = dict(meta["extra"]) | {"compacted": {"source": str(args.checkpoint), "params_before": rep.params_before,
                                                 "params_after": rep.params_after}}
    save_checkpoint(model, args.out, arch=meta["arch"], arch_kwargs=meta["arch_kwargs"], extra=extra)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep)
        print(f"wrote {args.out}")
    return 0


COMMANDS = {"demo": _cmd_demo, "prune": _cmd_prune, "inspect": _cmd_inspect, "compact": _cmd_compact,
            "export": _cmd_export, "quantize": _cmd_quantize}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparseforge`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SparseforgeError as e:
        print(f"sparseforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparseforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
