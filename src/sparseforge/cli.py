"""The ``sparseforge`` command line: ``demo``, ``train``, ``prune``, ``inspect``, ``compact``, ``export``, ``quantize``, ``merge``,
``speed``.

Bad input ends with one line, ``sparseforge: error: ...``, and exit status 2.

Names the commands take (scores, allocations, patterns, merge methods, quantization
schemes, model architectures, datasets) come from the registries (:mod:`sparseforge.registry`);
``sparseforge --plugin MODULE COMMAND ...`` imports a user's module first, so that what
it registers is a choice too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from sparseforge.errors import SparseforgeError
from sparseforge.pipelines import (
    PRUNE_METHODS, QUANT_SCHEMES, SFZ_VALUES, CompactRecipe, ExportRecipe, PruneRecipe, QuantizeRecipe, check_out,
    export_formats, inspect_file, load_any, load_recipe,
)
from sparseforge.progress import Progress

EPILOG = """examples:
  sparseforge demo                                   # train, prune to 90% with GMP, compare (about a minute)
  sparseforge inspect runs/demo-lenet300-*/model.safetensors
  sparseforge prune model.safetensors --sparsity 0.5 --pattern 2:4 --out pruned.safetensors
  sparseforge prune model.safetensors --score snip --sparsity 0.8 --allocation global --out pruned.safetensors
  sparseforge prune ./hf-model --method sparsegpt --pattern 2:4 --calibration texts/ --out ./hf-model-2of4
  sparseforge compact pruned.safetensors --out small.safetensors   # remove channels pruned with --pattern channel
  sparseforge --plugin my_data demo --dataset blobs    # the demo on a dataset a plug-in registers
  sparseforge export pruned.safetensors --out model.sfz --values fp16   # bitmask + packed values
  sparseforge quantize pruned.safetensors --out model-int8.sfz --scheme int8
  sparseforge merge a.safetensors b.safetensors --out soup.safetensors            # weighted average
  sparseforge merge --method ties --base base.safetensors a.safetensors b.safetensors --density 0.2 --out m.safetensors
  sparseforge merge --recipe merge.yaml                       # a YAML merge recipe
  sparseforge train examples/train-rigl.yaml --nproc 2     # sparse training from a YAML recipe on torchrun/DDP
  sparseforge speed ./hf-model --batch 1,8 --tokens 64       # every deployment path timed: dense, bf16, int8, sparse
  sparseforge --plugin my_plugins prune model.safetensors --score my_score --sparsity 0.5 --out p.safetensors
"""


def _names(registry) -> str:
    """``a, b, c``: a registry's names, for help texts."""
    return ", ".join(registry.names())


def _add_dataset(p: argparse.ArgumentParser, default: str) -> None:
    from sparseforge.datasets import DATASETS

    p.add_argument("--dataset", default=None, choices=DATASETS.names(),
                   help=f"the data, by name (a plug-in's too; default {default})")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from sparseforge.architectures import ARCHITECTURES, HF
    from sparseforge.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a dense model on Fashion-MNIST, prune it with GMP, compare",
        description=(
            "Train a dense model on Fashion-MNIST (or --dataset), then continue training it twice from the same "
            "point: dense (the baseline) and under gradual magnitude pruning to --sparsity. Prints "
            "a table (accuracy, sparsity, nonzeros, FLOPs) and writes RUNS_DIR/NAME/ with "
            "metrics.json, training.png and model.safetensors."
        ),
    )
    classifiers = ", ".join(name for name in ARCHITECTURES.names() if name != HF)
    p.add_argument("--model", default=d.model, help=f"model architecture: {classifiers} (default {d.model})")
    _add_dataset(p, d.dataset)
    p.add_argument("--sparsity", type=float, default=d.sparsity, help=f"final sparsity in [0, 1) (default {d.sparsity})")
    p.add_argument("--dense-epochs", type=int, default=d.dense_epochs, help=f"dense training epochs (default {d.dense_epochs})")
    p.add_argument("--sparse-epochs", type=int, default=d.sparse_epochs,
                   help=f"epochs of pruning + fine-tuning, and of the dense baseline (default {d.sparse_epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak SGD learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument("--data-dir", default=None,
                   help="the dataset's folder (Fashion-MNIST's .gz files: default $SPARSEFORGE_DATA or "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--runs-dir", default=d.runs_dir, help=f"where run folders go (default {d.runs_dir})")
    p.add_argument("--name", default=None, help="run folder name (default demo-MODEL-TIMESTAMP)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="sparse training from a YAML recipe, in one process or on N processes (torchrun/DDP)",
        description=(
            "Train the recipe's model under its sparsity method (see sparseforge.distributed.train.TrainRecipe "
            "and examples/train-rigl.yaml). The recipe is checked, against --nproc too, before anything starts. "
            "--nproc 1 trains in this process; N > 1 runs torchrun --standalone with N local processes (gloo on "
            "CPU, nccl with one GPU each). The run folder gets checkpoints/, metrics.json and model.safetensors; "
            "running again on the same folder resumes from its newest checkpoint, on any --nproc that divides "
            "the global batch."
        ),
    )
    p.add_argument("recipe", help="the YAML training recipe")
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine (default 1)")
    p.add_argument("--out", default=None, help="the run folder (default: the recipe's out, else runs/RECIPE-NAME)")
    p.add_argument("--print-command", action="store_true", help="print the command that would run, and exit")
    p.add_argument("--no-resume", action="store_true", help="delete the run folder's checkpoints and start over")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a checkpoint or a Hugging Face model once (magnitude, Wanda, SparseGPT, MaskLLM; any score)",
        description=(
            "One-shot pruning. With --method (magnitude, wanda, sparsegpt, maskllm), or when MODEL is a Hugging Face "
            "model folder, the layers are pruned block by block on calibration text (--calibration: a text file "
            "or a folder of them, '%%'-separated fortune files or blank-line-separated paragraphs; default: "
            "Debian's fortunes), and the report gives the quality on held-out text: perplexity for a causal LM, "
            "mean cosine of sentence embeddings to the dense model for an encoder. Without --method a "
            "sparseforge checkpoint is pruned by --score (gradient scores use batches of --dataset). With "
            "--recipe FILE the options come from a YAML recipe (sparseforge.pipelines.PruneRecipe: keys as the "
            "flags, model and out included); flags given as well override it."
        ),
    )
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face model folder (with config.json) or a sparseforge checkpoint")
    p.add_argument("--recipe", default=None, metavar="YAML", help="a YAML prune recipe; other flags override its values")
    p.add_argument("--out", default=None,
                   help="where to write: a folder (save_pretrained, for a Hugging Face model), or a file: "
                        ".sfz (compressed) or .safetensors (checkpoint)")
    p.add_argument("--method", default=None, choices=PRUNE_METHODS,
                   help="one-shot method with calibration data (default for a Hugging Face folder: wanda)")
    from sparseforge.allocation import ALLOCATIONS
    from sparseforge.patterns import PATTERNS
    from sparseforge.scores import SCORES

    p.add_argument("--score", default=None, help=f"without --method: {_names(SCORES)} (default magnitude)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of the targeted weights to prune, in [0, 1); optional for N:M (default 0.5 with --method)")
    p.add_argument("--pattern", default=None,
                   help=", ".join(cls.spelling or name for name, cls in PATTERNS.items()) + " (default unstructured)")
    p.add_argument("--allocation", default=None, help=f"{_names(ALLOCATIONS)} (default uniform)")
    p.add_argument("--include", nargs="+", default=None, metavar="GLOB",
                   help="module name globs to prune (default: the Linear layers of a transformer's blocks; all Linear/Conv otherwise)")
    p.add_argument("--exclude", nargs="+", default=None, metavar="GLOB", help="module name globs to leave dense")
    _add_text_calibration(p, 128)
    p.add_argument("--maskllm-steps", type=int, default=None, help="MaskLLM training steps (default 300, as prune_maskllm)")
    p.add_argument("--calibration-batches", type=int, default=None,
                   help="batches of 128 labelled examples for a zoo model's calibration (default 8)")
    p.add_argument("--data-dir", default=None, help="the dataset's folder, for a zoo model's calibration")
    p.add_argument("--seed", type=int, default=None, help="seed of random scores and calibration samples (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_quiet(p)


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
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="a YAML compact recipe (sparseforge.pipelines.CompactRecipe); other flags override its values")
    p.add_argument("--out", default=None, help="where to write the compacted checkpoint (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the compaction report as JSON")
    _add_quiet(p)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a compressed .sfz file (bitmask + packed values) or plain safetensors",
        description=(
            "Convert a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder to --format sfz "
            "(Linear/Conv weights as a bitmask plus the packed nonzero values, see sparseforge.save), safetensors "
            "(plain, dense) or hf (a transformers save_pretrained folder, dense with exact zeros). With --recipe "
            "FILE the options come from a YAML recipe (sparseforge.pipelines.ExportRecipe); flags override it."
        ),
    )
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder")
    p.add_argument("--recipe", default=None, metavar="YAML", help="a YAML export recipe; other flags override its values")
    p.add_argument("--out", default=None,
                   help="where to write: a .sfz or .safetensors file (as --format), or a folder for --format hf")
    p.add_argument("--format", default=None, choices=export_formats(),
                   help="(default sfz); hf: a save_pretrained folder (transformers models)")
    p.add_argument("--values", default=None, choices=SFZ_VALUES,
                   help="sfz weight values: fp16 (default), fp32 (exact), int8/int4 (codes + per-channel scales)")
    _add_quiet(p)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="weight quantization (int8/int4 round-to-nearest, or GPTQ) that keeps zeros zero",
        description=(
            "Quantize every Linear/Conv weight of a checkpoint (symmetric, scales over the kept weights, zeros "
            "stay zero; see sparseforge.quant): int8/int4 round to nearest, gptq-int8/gptq-int4 correct each "
            "column's rounding error with the Hessian of the layer inputs on calibration data (--dataset: text "
            "for a transformers model, Fashion-MNIST images for a zoo model by default). "
            "An --out ending in .sfz stores the codes (int4 packed two per byte); one ending in .safetensors a "
            "plain checkpoint of the dequantized weights. With --recipe FILE the options come from a YAML recipe "
            "(sparseforge.pipelines.QuantizeRecipe); flags override it."
        ),
    )
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder")
    p.add_argument("--recipe", default=None, metavar="YAML", help="a YAML quantize recipe; other flags override its values")
    p.add_argument("--out", default=None, help="where to write: .sfz (compressed codes) or .safetensors (dequantized weights)")
    p.add_argument("--scheme", default=None, choices=QUANT_SCHEMES, help="(default int8)")
    p.add_argument("--group-size", type=int, nargs="?", const=128, default=None, metavar="G",
                   help="inputs per scale along the input dimension (bare flag: 128; default: one scale per output channel)")
    p.add_argument("--act-order", action="store_true", default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--calibration-batches", type=int, default=None,
                   help="GPTQ on a zoo model: batches of 128 labelled training examples (default 4)")
    _add_text_calibration(p, 128)
    p.add_argument("--data-dir", default=None, help="the dataset's folder, for GPTQ calibration of a zoo model")
    p.add_argument("--seed", type=int, default=None, help="GPTQ: which calibration images (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_quiet(p)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models stored as safetensors files, one tensor at a time (average, task arithmetic, TIES, DARE)",
        description=(
            "Merge models of one architecture, stored as .safetensors files (sparseforge checkpoints or any state "
            "dict), tensor by tensor: memory stays near one model plus one tensor per input (see "
            "sparseforge.merge.merge_files). Methods: average (weighted average, a model soup) and the task-vector "
            "methods task_arithmetic, ties, dare, dare_ties, which need --base. Fisher, RegMean and TALL need data "
            "or masks and are Python API only (sparseforge.merge). With --recipe FILE the merge comes from a YAML "
            "recipe (keys method, base, models, weights, density, lambda, seed, out; relative paths are relative "
            "to the recipe file); flags given as well override the recipe's values."
        ),
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="the models' .safetensors files (fine-tuned models, for task-vector methods)")
    p.add_argument("--recipe", default=None, metavar="YAML", help="a YAML merge recipe; other flags override its values")
    from sparseforge.merge.streaming import file_methods

    p.add_argument("--method", default=None, help=f"{', '.join(file_methods())} (default average)")
    p.add_argument("--base", default=None, help="the base (pre-trained) model's file, for the task-vector methods")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per model (average: normalized to sum 1; task vectors: multiply each)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of each task vector kept (ties: default 0.2; dare, dare_ties: default 0.1)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="LAMBDA",
                   help="scaling coefficient of the merged task vector (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed of DARE's random drops (default 0)")
    p.add_argument("--out", default=None, help="the merged .safetensors file (written atomically)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress bar, no report)")


def _int_list(text: str) -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)`` for argparse (positive integers)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _add_speed(sub: argparse._SubParsersAction) -> None:
    from sparseforge.kernels.choose import PRECISIONS
    from sparseforge.speed import Workload, path_names

    w = Workload()
    p = sub.add_parser(
        "speed",
        help="time a model on every path you could deploy it on: dense fp32, bf16, int8 weight-only, packed sparse",
        description=(
            "Build each path of the model that --precision allows (dense: as loaded; dense-bf16: the whole model in "
            "bf16; dense-int8: Linear layers int8 weight-only, the rest bf16; packed-*: the Linear layers of its "
            "repeated blocks packed as bitmask + values, its own zeros skipped; to_sparse: sparseforge.to_sparse's "
            "choice per layer), time them interleaved on this machine (medians), and print per path the time "
            "per forward pass at each --batch, tokens/s of generation (a causal LM), the ratio to the best dense "
            "path, the bytes of its weights and its memory. See sparseforge.speed."
        ),
    )
    p.add_argument("model", help="a Hugging Face model folder, a sparseforge checkpoint (.safetensors) or a .sfz file")
    p.add_argument("--batch", type=_int_list, default=w.batch_sizes, metavar="B[,B...]",
                   help="batch sizes of the forward passes; a transformers model gets sequences of --seq-len "
                        "tokens (default 1,8,64)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="new tokens to generate (greedy, KV cache, batch 1); causal LMs only (default 32 for a "
                        "causal LM, else none; 0: no generation)")
    p.add_argument("--prompt", type=int, default=w.prompt_len, metavar="N",
                   help=f"prompt length of the generation, random token ids (default {w.prompt_len})")
    p.add_argument("--seq-len", type=int, default=w.seq_len,
                   help=f"tokens per sequence of a transformers model's forward passes (default {w.seq_len})")
    p.add_argument("--input-shape", type=_int_list, default=None, metavar="D[,D...]",
                   help="input shape of one example of a model that does not start with a Linear (e.g. 1,28,28)")
    p.add_argument("--precision", default="int8", choices=tuple(PRECISIONS),
                   help="which paths: exact = float32 results only, bf16 adds bf16 paths, int8 (default) adds int8 "
                        "ones; also to_sparse's policy")
    p.add_argument("--paths", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=None,
                   metavar="P[,P...]", help=f"only these paths, of {', '.join(path_names('int8'))} (default: all "
                                            "that --precision allows)")
    p.add_argument("--rounds", type=int, default=w.rounds, help=f"timed rounds (default {w.rounds})")
    p.add_argument("--memory", choices=("estimate", "rss"), default="estimate",
                   help="estimate: weights + KV cache, computed (default); rss: the peak resident memory of a fresh "
                        "process running each path (loads the model once per path)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    _add_quiet(p)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one line, ``sparseforge: error: ...``, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("sparseforge").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"sparseforge: error: {where}{' '.join(message.split())} (see {self.prog} --help)\n")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (default: a bar on a terminal, plain lines in a log)")


def _with_progress(command: Callable[[argparse.Namespace, Progress], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command(args, progress)`` with the CPU threads chosen and a progress reporter on stderr.

    Threads: ``OMP_NUM_THREADS`` when set, else the idle cores (:func:`sparseforge.threads.set_threads`);
    progress (:mod:`sparseforge.progress`) is off with ``--quiet`` and closed before an error is printed.
    """
    import functools

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from sparseforge.threads import set_threads

        threads = set_threads()
        with Progress(not args.quiet, header=f"sparseforge {args.command}: {threads.describe()}") as shown:
            return command(args, shown)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparseforge",
        description="Make neural networks sparse and small: prune, train sparse, inspect.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sparseforge.version import __version__

    parser.add_argument("--version", action="version", version=f"sparseforge {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE before the command: a plug-in that registers its own scores, "
                             "allocations, methods, merge methods or model architectures (repeatable; "
                             "found on sys.path or in the current folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_train(sub)
    _add_prune(sub)
    _add_inspect(sub)
    _add_compact(sub)
    _add_export(sub)
    _add_quantize(sub)
    _add_merge(sub)
    _add_speed(sub)
    return parser


def _print_report(rep, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep, end="")


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparseforge.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model=args.model, dataset=args.dataset or DemoConfig.dataset, sparsity=args.sparsity,
        dense_epochs=args.dense_epochs, sparse_epochs=args.sparse_epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, data_dir=args.data_dir, runs_dir=args.runs_dir,
        name=args.name, limit_train=args.limit_train, limit_test=args.limit_test,
    )
    from sparseforge.oserrors import check_writable

    # Before minutes of training, not after: the run folder goes into --runs-dir.
    check_writable(Path(args.runs_dir) / args.name if args.name else args.runs_dir, "folder")
    run_demo(cfg, quiet=args.quiet)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from sparseforge.distributed.launch import launch

    return launch(args.recipe, nproc=args.nproc, out=args.out, resume=not args.no_resume, quiet=args.quiet,
                  print_command=args.print_command, plugins=args.plugin)


def _recipe(cls: type, args: argparse.Namespace, flags: dict, usage: str,
            load: Callable[[str], typing.Any] | None = None):
    """The command's recipe: ``--recipe FILE`` (read by ``load``, default :func:`~sparseforge.pipelines.load_recipe`)
    with the flags given overriding its values, or the flags alone."""
    given = {k: v for k, v in flags.items() if v is not None}
    if args.recipe is not None:
        recipe = load(args.recipe) if load is not None else load_recipe(cls, args.recipe)
        return dataclasses.replace(recipe, **given)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if any(name not in given for name in required):
        raise SparseforgeError(f"give {usage}, or --recipe FILE")
    return cls(**given)


def _text_flags(args: argparse.Namespace) -> dict:
    return {"dataset": args.dataset, "calibration": args.calibration, "tokenizer": args.tokenizer,
            "samples": args.samples, "seq_len": args.seq_len, "eval_texts": args.eval_texts, "data_dir": args.data_dir,
            "seed": args.seed, "calibration_batches": args.calibration_batches}


@_with_progress
def _cmd_prune(args: argparse.Namespace, shown: Progress) -> int:
    flags = {"model": args.model, "out": args.out, "method": args.method, "score": args.score,
             "sparsity": args.sparsity, "pattern": args.pattern, "allocation": args.allocation,
             "include": args.include, "exclude": args.exclude, "maskllm_steps": args.maskllm_steps} | _text_flags(args)
    recipe = _recipe(PruneRecipe, args, flags, "the model and --out (sparseforge prune MODEL --out OUT)")
    rep = recipe.run(progress=shown)
    if not recipe.layer_by_layer:
        _print_report(rep, args.json)
    elif args.json:
        print(json.dumps(rep.summary(), indent=2))
    else:
        print(_calibrated_table(rep.summary()))
    if not args.json:
        print(f"wrote {recipe.out}")
    return 0


def _add_text_calibration(p: argparse.ArgumentParser, samples: int) -> None:
    from sparseforge.datasets import IMAGES, TEXT

    _add_dataset(p, f"{TEXT} for a transformers model, {IMAGES} otherwise")
    p.add_argument("--calibration", default=None, metavar="PATH",
                   help="transformers models: calibration text, a file or a folder of text files, read by the "
                        "text dataset (default: /usr/share/games/fortunes); a tenth is held out for the quality report")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder, for a transformers model stored in a sparseforge checkpoint")
    # None: not given, so that a --recipe's value (or the recipe's default) stands
    p.add_argument("--samples", type=int, default=None, help=f"calibration sequences (default {samples})")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 128)")
    p.add_argument("--eval-texts", type=int, default=None, help="held-out texts for the quality report (default 256)")


def _calibrated_table(result: dict) -> str:
    import io

    from rich.console import Console
    from rich.table import Table

    from sparseforge.report import table_width

    t = Table(title=f"{result['method']} {result['pattern']}: {result['achieved']:.2%} of "
                    f"{len(result['layers'])} layers' weights pruned in {result['seconds']:.1f} s")
    for col in ("layer", "sparsity", "weights"):  # names wrap, never truncate (q/k/v must stay apart)
        t.add_column(col, justify="left" if col == "layer" else "right",
                     overflow="fold" if col == "layer" else "ellipsis")
    for name, v in result["layers"].items():
        t.add_row(name, f"{v['zeros'] / v['numel']:.2%}", f"{int(v['numel']):,}")
    buf = io.StringIO()
    console = Console(file=buf, width=table_width(), force_terminal=False, color_system=None)
    console.print(t)
    q = result.get("quality")
    if q:
        for key in q["pruned"]:
            if key in q["dense"] and key != "texts":
                console.print(f"{key}: dense {q['dense'][key]:.4g} -> pruned {q['pruned'][key]:.4g}")
            elif key not in q["dense"]:
                console.print(f"{key}: {q['pruned'][key]:.4g}")
    return buf.getvalue().rstrip()


def _cmd_inspect(args: argparse.Namespace) -> int:
    inspection = inspect_file(args.checkpoint)
    if args.json:
        print(json.dumps(inspection.to_dict(), indent=2))
    else:
        print(inspection, end="")
    return 0


@_with_progress
def _cmd_export(args: argparse.Namespace, shown: Progress) -> int:
    flags = {"checkpoint": args.checkpoint, "out": args.out, "format": args.format, "values": args.values}
    recipe = _recipe(ExportRecipe, args, flags, "the checkpoint and --out (sparseforge export CHECKPOINT --out OUT)")
    done = recipe.run(progress=shown)
    values = f", {done['values']} values" if done["format"] == "sfz" else ""
    print(f"wrote {done['out']} ({done['format']}{values}, {done['bytes']:,} bytes; {recipe.checkpoint}: "
          f"{done['source_bytes']:,} bytes)")
    return 0


@_with_progress
def _cmd_quantize(args: argparse.Namespace, shown: Progress) -> int:
    flags = {"checkpoint": args.checkpoint, "out": args.out, "scheme": args.scheme, "group_size": args.group_size,
             "act_order": args.act_order} | _text_flags(args)
    recipe = _recipe(QuantizeRecipe, args, flags, "the checkpoint and --out (sparseforge quantize CHECKPOINT --out "
                     "OUT)")
    done = recipe.run(progress=shown)
    rep, zeroed, q = done["report"], done["rounded_to_zero"], done["quality"]
    if args.json:
        print(json.dumps(rep.to_dict() | {"scheme": done["scheme"], "rounded_to_zero": zeroed}, indent=2))
        return 0
    _print_report(rep, False)
    print(f"{zeroed:,} kept weights rounded to exactly zero (smaller than half a quantization step; zeros stay zero)")
    if q is not None:
        print(f"quality on {q['quantized']['texts']} held-out texts: " + ", ".join(
            f"{k} dense {q['dense'][k]:.4g} -> quantized {v:.4g}" if k in q["dense"] else f"{k} {v:.4g}"
            for k, v in q["quantized"].items() if k != "texts"))
    elif done["hf"]:
        print(f"no quality report: {recipe.checkpoint} has no tokenizer (pass --tokenizer DIR to measure it)")
    grouping = "per channel" if recipe.group_size is None else f"groups of {recipe.group_size}"
    print(f"wrote {done['out']} ({done['scheme']}, {grouping}, {done['format']})")
    return 0


@_with_progress
def _cmd_compact(args: argparse.Namespace, shown: Progress) -> int:
    flags = {"checkpoint": args.checkpoint, "out": args.out}
    recipe = _recipe(CompactRecipe, args, flags, "the checkpoint and --out (sparseforge compact CHECKPOINT --out "
                     "OUT.safetensors)")
    rep = recipe.run(progress=shown)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep)
        print(f"wrote {recipe.out}")
    return 0


@_with_progress
def _cmd_merge(args: argparse.Namespace, shown: Progress) -> int:
    from sparseforge.merge.recipe import MergeRecipe
    from sparseforge.merge.recipe import load_recipe as load_merge_recipe

    flags = {"models": args.models or None, "method": args.method, "base": args.base, "weights": args.weights,
             "density": args.density, "lam": args.lam, "seed": args.seed, "out": args.out}
    recipe = _recipe(MergeRecipe, args, flags, "the model files and --out (sparseforge merge A B --out M.safetensors)",
                     load=load_merge_recipe)
    recipe.validate()  # options first, then the output: both before any file is read
    check_out(recipe.out, (".safetensors",), "merge writes a .safetensors file")
    rep = recipe.run(progress=shown)
    if not args.quiet:
        base = f", base {rep['base']}" if rep["base"] else ""
        print(f"merged {len(rep['inputs'])} models with {rep['method']}{base}: {', '.join(rep['inputs'])}")
        print(f"{rep['tensors']} tensors, {rep['bytes']:,} bytes, {rep['seconds']:.2f} s, "
              f"peak memory {rep['peak_rss_bytes'] / 2**20:,.0f} MiB")
        print(f"wrote {rep['out']}")
    return 0


@_with_progress
def _cmd_speed(args: argparse.Namespace, shown: Progress) -> int:
    from sparseforge.files import write_json_atomic
    from sparseforge.speed import Workload, is_causal_lm, measure_speed

    if args.json is not None:
        from sparseforge.oserrors import check_writable

        check_writable(Path(args.json), "file", f"--json {args.json}")
    with shown.phase(f"loading {args.model}"):
        model, _ = load_any(args.model)
    tokens = args.tokens if args.tokens is not None else (32 if is_causal_lm(model) else 0)
    workload = Workload(batch_sizes=tuple(args.batch), tokens=tokens, prompt_len=args.prompt, seq_len=args.seq_len,
                        input_shape=tuple(args.input_shape) if args.input_shape else None, rounds=args.rounds)
    loader = ("sparseforge.speed:load_model", {"path": str(args.model)}) if args.memory == "rss" else None
    with shown.phase("building and timing the paths"):
        rep = measure_speed(model, precision=args.precision, workload=workload, paths=args.paths, loader=loader,
                            name=str(args.model))
    print(rep, end="")
    if args.json is not None:
        write_json_atomic(args.json, rep.to_dict())
        print(f"wrote {args.json}")
    return 0


COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "prune": _cmd_prune, "inspect": _cmd_inspect, "compact": _cmd_compact,
            "export": _cmd_export, "quantize": _cmd_quantize,
            "merge": _cmd_merge, "speed": _cmd_speed}


def plugin_modules(argv: Sequence[str]) -> list[str]:
    """The modules named by ``--plugin MODULE`` (or ``--plugin=MODULE``) before the command in ``argv``."""
    modules, i = [], 0
    while i < len(argv) and str(argv[i]).startswith("-"):
        if argv[i] == "--plugin" and i + 1 < len(argv):
            modules.append(str(argv[i + 1]))
            i += 2
            continue
        if str(argv[i]).startswith("--plugin="):
            modules.append(str(argv[i]).split("=", 1)[1])
        i += 1
    return modules


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparseforge`` command; returns the exit status."""
    from sparseforge.registry import import_plugins

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Before the parser is built: the choices and help texts then list what the plug-ins register.
        import_plugins(plugin_modules(argv))
    except SparseforgeError as e:
        print(f"sparseforge: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (its line already printed)
        return e.code if isinstance(e.code, int) else 0
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
