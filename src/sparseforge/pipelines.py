"""The commands as recipes: :class:`PruneRecipe`, :class:`QuantizeRecipe`, :class:`CompactRecipe`,
:class:`ExportRecipe`, and :func:`inspect_file`.

Each is a dataclass whose fields are the command's options (a YAML recipe
maps one to one onto it, read with :func:`load_recipe`, as
:class:`~sparseforge.merge.recipe.MergeRecipe` and
:class:`~sparseforge.distributed.train.TrainRecipe` are), with ``validate()``
(options alone, no file opened) and ``run(progress=...)``, which does the
whole job: check ``out`` before any work, load the model (a Hugging Face
model folder or a sparseforge checkpoint), read calibration data (a dataset
of :data:`sparseforge.datasets.DATASETS` by name: ``dataset``), measure
quality before and after (transformers models), prune, quantize or compact,
write the result in the format ``out`` names, and return the report. The
``sparseforge`` command line maps its flags onto these and prints the report
(``sparseforge inspect`` prints :func:`inspect_file`'s :class:`Inspection`);
the same runs from Python::

    PruneRecipe(model="./hf-model", out="pruned.sfz", method="sparsegpt", pattern="2:4").run(progress=True)

The helpers they share (reading any model, writing it, the calibration data,
checking an output path) are here too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from sparseforge import datasets
from sparseforge.errors import SparseforgeError
from sparseforge.oneshot.calibrated import METHODS as ONESHOT_BY_NAME
from sparseforge.io.sfz import VALUES
from sparseforge.quant.rtn import SCHEMES
from sparseforge.progress import Progress, using
from sparseforge.recipes import from_mapping, read_yaml
from sparseforge.report import PruneReport, SparsityReport, report

__all__ = [
    "CompactRecipe", "ExportRecipe", "Inspection", "PruneRecipe", "QuantizeRecipe", "check_out", "export_formats",
    "inspect_file", "load_any", "load_recipe", "write_model",
]

R = TypeVar("R")

# The choices of the recipes' options, which the command line offers too: read from where each is defined.
PRUNE_METHODS = (*ONESHOT_BY_NAME, "maskllm")
"""Methods of :attr:`PruneRecipe.method`: pruned layer by layer on calibration data."""
QUANT_SCHEMES = tuple(SCHEMES.names())
SFZ_VALUES = VALUES


def export_formats() -> tuple[str, ...]:
    """The formats :attr:`ExportRecipe.format` (``sparseforge export --format``) can write: the names and aliases
    of :data:`~sparseforge.formats.FORMATS` whose files hold a whole model (not adapters), plug-ins' included."""
    from sparseforge.formats import FORMATS, get_format

    return tuple(spelling for name in FORMATS.names() if not get_format(name)[1].partial
                 for spelling in (name, *FORMATS.aliases(name)))

# Names that are files, not folders: an out like these is a mistake where a folder would be written.
_FILE_LIKE = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npz", ".npy", ".h5", ".onnx", ".gguf", ".json",
              ".yaml", ".yml", ".txt", ".csv", ".log", ".md", ".zip", ".tar", ".gz", ".tgz", ".safetensor"}


# -- shared steps ------------------------------------------------------------------------------


def check_out(out: str, suffixes: tuple[str, ...], what: str, folder: bool = False) -> str:
    """Check an output path before any work: its name (one of ``suffixes``, or a folder when ``folder``) and
    that it can be written. Returns ``"file"`` or ``"folder"``; ``what`` says what is written there."""
    from sparseforge.io.hf import check_output_folder
    from sparseforge.oserrors import check_writable

    p = Path(out)
    if any(p.name.endswith(x) and len(p.name) > len(x) for x in suffixes):
        check_writable(p, "file", f"--out {out}")
        return "file"
    if folder and (p.is_dir() or p.suffix.lower() not in _FILE_LIKE):
        check_output_folder(p)  # not a folder of other files, which replacing it would delete
        check_writable(p, "folder", f"--out {out}")
        check_writable(p.parent, "folder", f"--out {out}")  # the folder is replaced by a rename there
        return "folder"
    names = " or ".join(f"'NAME{x}'" for x in suffixes)
    wanted = " or a ".join(w for w in ("folder name" if folder else "", f"file name like {names}" if names else "") if w)
    raise SparseforgeError(f"--out {out}: {what}; give a {wanted}")


def load_any(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """(model, metadata) of a model file or folder of any format (a sparseforge checkpoint, an ``.sfz`` file, a
    Hugging Face model folder, ...), told by its content: :func:`sparseforge.io.load_with_metadata`. A file that
    no format recognises gets the error of the format its suffix names. A model folder's metadata also holds its
    ``tokenizer`` (or None)."""
    from sparseforge.io import load_with_metadata

    return load_with_metadata(path)


def write_model(model: nn.Module, out: str, meta: dict[str, Any], fmt: str | None, values: str,
                extra: dict[str, Any], tokenizer: Any = None) -> None:
    """Write ``model`` to ``out`` in the format ``fmt`` (a name of :data:`~sparseforge.formats.FORMATS`: ``sfz``,
    ``safetensors``/``checkpoint``, ``hf``, ...; None: as ``out``'s name says). The format's writer gets those
    of these options it takes: ``values`` (sfz), the loaded ``arch`` and ``arch_kwargs``, ``extra`` (the
    metadata to store) and ``tokenizer`` (default the loaded one)."""
    from sparseforge.formats import format_for_saving, options_of
    from sparseforge.io import save

    name, writer = format_for_saving(out, model, fmt)
    given = {"values": values, "arch": meta.get("arch"), "arch_kwargs": meta.get("arch_kwargs"), "extra": extra,
             "tokenizer": tokenizer if tokenizer is not None else meta.get("tokenizer")}
    takes = options_of(writer.save)
    save(model, out, name, **{k: v for k, v in given.items() if takes is None or k in takes})


def text_calibration(meta: dict[str, Any], *, source: str, tokenizer: str | None, calibration: str | None,
                     samples: int, seq_len: int, eval_texts: int, seed: int, why: str = "",
                     dataset: str | None = None) -> tuple[Any, list, list]:
    """(tokenizer, calibration batches, held-out texts) for a transformers model, from the text ``dataset``
    of :data:`~sparseforge.datasets.DATASETS` (default ``fortunes``) read from ``calibration`` (a file or
    folder; default the dataset's own). ``tokenizer`` (a folder) replaces the loaded one."""
    from sparseforge.tokens import calibration_batches

    tok = meta.get("tokenizer")
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SparseforgeError(f"cannot load a tokenizer from {tokenizer}: {e}") from None
    if tok is None:
        raise SparseforgeError(f"{source} has no tokenizer{why}: pass --tokenizer <folder of the model's tokenizer>")
    for name, value in (("--samples", samples), ("--seq-len", seq_len), ("--eval-texts", eval_texts)):
        if int(value) < 1:
            raise SparseforgeError(f"{name} must be >= 1, got {value}")
    texts = datasets.load(dataset or datasets.TEXT, calibration, kind=datasets.Texts,
                          what=f"calibrating the transformers model {source}")
    split = datasets.split_texts(texts.texts)  # type: ignore[union-attr]
    batches = calibration_batches(tok, split.calibration, samples, seq_len, seed=seed)
    return tok, batches, split.evaluation[:eval_texts]


def image_calibration(data_dir: str | None, seed: int, batches: int, dataset: str | None = None) -> list:
    """``batches`` shuffled batches of 128 training examples with their labels, from the classification
    ``dataset`` of :data:`~sparseforge.datasets.DATASETS` (default ``fashion-mnist``) in ``data_dir``."""
    if int(batches) < 1:
        raise SparseforgeError(f"--calibration-batches must be >= 1, got {batches}")
    examples = datasets.load(dataset or datasets.IMAGES, data_dir, limit_train=128 * int(batches), limit_test=1,
                             kind=datasets.Classification, what="calibrating a sparseforge checkpoint")
    return examples.calibration(batches, 128, seed)  # type: ignore[union-attr]


def _calibration(recipe: PruneRecipe | QuantizeRecipe, meta: dict[str, Any], source: str, shown: Progress,
                 why: str = "") -> tuple[Any, list, list[str]]:
    """(tokenizer, calibration batches, held-out texts) of a prune or quantize recipe: its text ``dataset``
    tokenized for a transformers model, its classification ``dataset`` batched for any other (no
    tokenizer, no held-out texts)."""
    if meta["arch"] == "hf":
        with shown.phase("reading and tokenizing the calibration text"):
            return text_calibration(meta, source=source, tokenizer=recipe.tokenizer, calibration=recipe.calibration,
                                    samples=recipe.samples, seq_len=recipe.seq_len, eval_texts=recipe.eval_texts,
                                    seed=recipe.seed, why=why, dataset=recipe.dataset)
    with shown.phase(f"reading {recipe.dataset or datasets.IMAGES} calibration batches"):
        return None, image_calibration(recipe.data_dir, recipe.seed, recipe.calibration_batches, recipe.dataset), []


def _quality(shown: Progress, label: str, model: nn.Module, tokenizer: Any, texts: list[str], seq_len: int,
             reference: Any = None) -> Any:
    """The :class:`~sparseforge.quality.Quality` of the ``label`` (dense, pruned, ...) model on held-out texts."""
    from sparseforge.quality import quality

    with shown.phase(f"quality of the {label} model on {len(texts)} held-out texts"):
        return quality(model, tokenizer, texts, seq_len=seq_len, reference=reference)


def _check_dataset(dataset: str | None) -> None:
    if dataset is not None and dataset not in datasets.DATASETS:
        raise SparseforgeError(f"dataset: {datasets.DATASETS.error(dataset)}")


def _size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SparseforgeError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# -- prune -------------------------------------------------------------------------------------


@dataclass
class PruneRecipe:
    """One-shot pruning of a model file (``sparseforge prune``): keys one to one with the command's flags.

    With ``method`` (``magnitude``, ``wanda``, ``sparsegpt``, ``maskllm``), or when ``model`` is a Hugging
    Face model folder (then Wanda by default), the layers are pruned layer by layer on calibration data
    (the ``dataset``): text for a transformers model (with quality on held-out text before and after),
    labelled batches (Fashion-MNIST) for a zoo model. Without, a sparseforge checkpoint is pruned by
    ``score`` (gradient scores average over the dataset's batches). Both go through :func:`sparseforge.prune`.

    Args:
        model: a Hugging Face model folder (with config.json) or a sparseforge checkpoint. Required.
        out: a folder (transformers models), a ``.sfz`` or a ``.safetensors`` file. Required.
        method: see above. Default None.
        score: without ``method``: ``magnitude`` (default), ``random``, ``gradient``, ``snip``, ``taylor``, ...
        sparsity: fraction of the targeted weights to prune; optional for N:M (0.5 with a method).
        pattern: ``unstructured`` (default), ``N:M``, ``block:B``, ``channel``.
        allocation: ``uniform`` (default), ``owl`` (with a method), ``global``, ``erk``, ``er``, ``lamp``.
        include, exclude: module name globs (default: a method's layers inside the repeated blocks, or
            every Linear/Conv).
        dataset: the calibration data, a name of :data:`sparseforge.datasets.DATASETS`. Default: ``fortunes``
            (text) for a transformers model, ``fashion-mnist`` for any other.
        calibration, tokenizer, samples, seq_len, eval_texts: text calibration of a transformers model
            (``calibration``: the text file or folder the text dataset reads; default its own).
        maskllm_steps: MaskLLM training steps. Default 300.
        calibration_batches, data_dir: batches of 128 labelled examples for a zoo model (8), and the folder
            the dataset reads (default its own).
        seed: of random scores and calibration samples. Default 0.
    """

    model: str
    out: str
    method: str | None = None
    score: str = "magnitude"
    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: str = "uniform"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    dataset: str | None = None
    calibration: str | None = None
    tokenizer: str | None = None
    samples: int = 128
    seq_len: int = 128
    eval_texts: int = 256
    maskllm_steps: int = 300
    calibration_batches: int = 8
    data_dir: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` on options :meth:`run` would refuse (no file is opened)."""
        if not self.model:
            raise SparseforgeError("model: give the model folder or checkpoint to prune")
        if not self.out:
            raise SparseforgeError("out: give where to write the pruned model")
        if self.method is not None:
            _check_choice("method", self.method, PRUNE_METHODS)
        _check_dataset(self.dataset)
        if self.method == "maskllm" and ":" not in str(self.pattern):
            raise SparseforgeError(f"--method maskllm learns N:M masks, not {self.pattern}: pass --pattern 2:4 "
                                   "(or 4:8)")

    @property
    def layer_by_layer(self) -> bool:
        """Whether the model is pruned layer by layer on calibration data (a method, or a model folder)."""
        from sparseforge.io.hf import is_pretrained_dir

        return self.method is not None or is_pretrained_dir(self.model)

    def _target(self, default_all: bool) -> Any:
        from sparseforge.targets import Target

        if not default_all and not self.include and not self.exclude:
            return None  # the method's default: the layers inside the repeated blocks
        return Target(include=tuple(self.include) if self.include else ("*",), exclude=tuple(self.exclude))

    def _check_out(self, arch: str | None) -> None:
        if arch == "hf":
            check_out(self.out, (".safetensors", ".sfz"), "prune writes a Hugging Face model to a folder, a "
                      ".safetensors checkpoint or a compressed .sfz file", folder=True)
        else:
            check_out(self.out, (".safetensors", ".sfz"), "prune writes a .safetensors checkpoint or a compressed "
                      ".sfz file")

    def run(self, progress: bool | Progress = False) -> PruneReport:
        """Validate, load, prune, write; returns the :class:`~sparseforge.report.PruneReport` (``quality``
        and ``source`` filled in for the layer-by-layer methods)."""
        from sparseforge.io.hf import is_pretrained_dir

        self.validate()
        if not Path(self.model).exists():
            raise SparseforgeError(f"{self.model} does not exist: pass a Hugging Face model folder (with "
                                   "config.json) or a sparseforge checkpoint")
        if is_pretrained_dir(self.model):
            self._check_out("hf")  # before loading and pruning: a bad out fails in a second, not after
        with using(progress) as shown:
            if self.layer_by_layer:
                return self._run_calibrated(shown)
            return self._run_scored(shown)

    def _run_scored(self, shown: Progress) -> PruneReport:
        from sparseforge.oneshot.prune import prune
        from sparseforge.scores import Random, as_score

        if str(self.allocation).strip().lower() == "owl":
            raise SparseforgeError("--allocation owl weighs blocks by Wanda's activation-aware scores on calibration "
                                   "data: add --method wanda (or sparsegpt, magnitude), or use another allocation")
        with shown.phase(f"loading {self.model}"):
            model, meta = load_any(self.model)
        self._check_out(meta["arch"])
        score = Random(seed=self.seed) if str(self.score).lower() == "random" else as_score(self.score)
        if score.needs_stats:
            raise SparseforgeError(f"--score {score} reads the layers' inputs on calibration data: use --method "
                                   f"{score} (pruned layer by layer on calibration batches)")
        calibration = _calibration(self, meta, self.model, shown)[1] if score.needs_grad else None
        torch.manual_seed(self.seed)
        with shown.phase(f"pruning by {score}"):
            rep = prune(model, score, sparsity=self.sparsity, pattern=self.pattern, allocation=self.allocation,
                        target=self._target(True), calibration=calibration)
        extra = dict(meta["extra"]) | {
            "pruned": {"score": str(score), "sparsity": rep.sparsity, "pattern": self.pattern,
                       "allocation": self.allocation, "source": str(self.model)}
        }
        with shown.phase(f"writing {self.out}"):
            self._write(model, None, meta, extra, metadata={})
        return rep

    def _run_calibrated(self, shown: Progress) -> PruneReport:
        from sparseforge.io.hf import ARCH
        from sparseforge.oneshot.prune import prune

        method = self.method or "wanda"
        with shown.phase(f"loading {self.model}"):
            model, meta = load_any(self.model)
        self._check_out(meta["arch"])
        hf = meta["arch"] == ARCH
        tokenizer, batches, held_out = _calibration(self, meta, self.model, shown)
        before = _quality(shown, "dense", model, tokenizer, held_out, self.seq_len) if hf else None
        torch.manual_seed(self.seed)
        if method == "maskllm":
            from sparseforge.oneshot.maskllm import prune_maskllm

            rep = prune_maskllm(model, batches, pattern=self.pattern, steps=self.maskllm_steps,
                                target=self._target(False), seed=self.seed, progress=shown)
        else:
            rep = prune(model, method, 0.5 if self.sparsity is None and ":" not in self.pattern else self.sparsity,
                        self.pattern, self.allocation, self._target(False), calibration=batches, progress=shown)
        if hf:
            after = _quality(shown, "pruned", model, tokenizer, held_out, self.seq_len, reference=before)
            rep.quality = {"dense": before.to_dict(), "pruned": after.to_dict()}
        dataset = datasets.DATASETS.canonical(self.dataset or (datasets.TEXT if hf else datasets.IMAGES))
        rep.source = {"source": str(self.model), "dataset": dataset, "calibration": str(self.calibration or dataset),
                      "samples": self.samples, "seq_len": self.seq_len}
        result = rep.summary()
        extra = dict(meta.get("extra") or {}) | {"pruned": {k: v for k, v in result.items() if k != "layers"}}
        with shown.phase(f"writing {self.out}"):
            self._write(model, tokenizer, meta, extra, metadata=result)
        return rep

    def _write(self, model: nn.Module, tokenizer: Any, meta: dict[str, Any], extra: dict[str, Any],
               metadata: dict[str, Any]) -> None:
        """A file as its suffix says (a .sfz keeps fp32 values: pruning changes no value), else a model folder."""
        if self.out.endswith(".sfz"):
            write_model(model, self.out, meta, "sfz", "fp32", extra)
        elif self.out.endswith(".safetensors"):
            write_model(model, self.out, meta, "safetensors", "fp32", extra)
        elif meta["arch"] != "hf":
            raise SparseforgeError(f"--out {self.out}: a zoo model is written to a .safetensors or .sfz file")
        else:
            write_model(model, self.out, meta, "hf", "fp32", metadata, tokenizer=tokenizer)


# -- quantize ----------------------------------------------------------------------------------


@dataclass
class QuantizeRecipe:
    """Weight quantization of a model file that keeps zeros zero (``sparseforge quantize``).

    ``int8``/``int4`` round to nearest; ``gptq-int8``/``gptq-int4`` correct each column's rounding error
    with the Hessian of the layer inputs on calibration data (the ``dataset``: text for a transformers
    model, labelled images for a zoo model). A ``.sfz`` ``out`` stores the codes; a ``.safetensors`` one the
    dequantized weights. A transformers model with a tokenizer gets its quality on held-out text before and after.

    Args:
        checkpoint: a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder. Required.
        out: a ``.sfz`` or ``.safetensors`` file. Required.
        scheme: ``int8`` (default), ``int4``, ``gptq-int8``, ``gptq-int4``.
        group_size: inputs per scale; None (default): one scale per output channel.
        act_order: GPTQ: quantize columns by decreasing Hessian diagonal.
        dataset: the calibration data, a name of :data:`sparseforge.datasets.DATASETS`. Default: ``fortunes``
            (text) for a transformers model, ``fashion-mnist`` for any other.
        calibration_batches, data_dir, seed: GPTQ on a zoo model: batches of 128 labelled examples (4), the
            folder the dataset reads (default its own), which examples (0).
        calibration, tokenizer, samples, seq_len, eval_texts: text calibration of a transformers model
            (``calibration``: the text file or folder the text dataset reads).
    """

    checkpoint: str
    out: str
    scheme: str = "int8"
    group_size: int | None = None
    act_order: bool = False
    dataset: str | None = None
    calibration_batches: int = 4
    calibration: str | None = None
    tokenizer: str | None = None
    samples: int = 128
    seq_len: int = 128
    eval_texts: int = 256
    data_dir: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` on options :meth:`run` would refuse (no file is opened)."""
        if not self.checkpoint:
            raise SparseforgeError("checkpoint: give the model folder or checkpoint to quantize")
        if not self.out:
            raise SparseforgeError("out: give the .sfz or .safetensors file to write")
        _check_choice("scheme", str(self.scheme).lower(), QUANT_SCHEMES)
        _check_dataset(self.dataset)

    def run(self, progress: bool | Progress = False) -> dict[str, Any]:
        """Validate, check ``out``, load, quantize, write. Returns ``report`` (the model's
        :class:`~sparseforge.report.SparsityReport`), ``scheme``, ``rounded_to_zero`` (kept weights that
        became 0), ``format``, ``quality`` (``{"dense", "quantized"}``, or None when not measured) and
        ``hf`` (a transformers model)."""
        from sparseforge.io.hf import ARCH
        from sparseforge.quant.rtn import quantize_, rounded_to_zero

        self.validate()
        scheme = str(self.scheme).lower()
        check_out(self.out, (".sfz", ".safetensors"), "quantize writes a compressed .sfz file (the codes) or a "
                  ".safetensors checkpoint (the dequantized weights)")
        fmt = "sfz" if self.out.endswith(".sfz") else "safetensors"
        with using(progress) as shown:
            with shown.phase(f"loading {self.checkpoint}"):
                model, meta = load_any(self.checkpoint)
            hf = meta["arch"] == ARCH
            held_out: list[str] = []
            # Text is needed for GPTQ's calibration and for the quality report; round-to-nearest itself needs
            # none, so a model without a tokenizer (an .sfz written by prune) is quantized without the report.
            measure = hf and (scheme.startswith("gptq") or meta.get("tokenizer") is not None or bool(self.tokenizer))
            if measure or (scheme.startswith("gptq") and not hf):
                tokenizer, batches, held_out = _calibration(
                    self, meta, self.checkpoint, shown,
                    why=" (GPTQ calibrates on text; int8/int4 round to nearest and need none)")
            if measure:
                before = _quality(shown, "dense", model, tokenizer, held_out, self.seq_len)
            if scheme.startswith("gptq"):
                from sparseforge.quant.gptq import gptq_

                gptq_(model, batches, scheme, self.group_size, act_order=self.act_order, progress=shown)
            else:
                with shown.phase(f"quantizing to {scheme}"):
                    quantize_(model, scheme, group_size=self.group_size)
            zeroed = rounded_to_zero(model)
            measured = None
            if measure:
                after = _quality(shown, "quantized", model, tokenizer, held_out, self.seq_len, reference=before)
                measured = {"dense": before.to_dict(), "quantized": after.to_dict()}
                meta["extra"] = dict(meta["extra"]) | {"quality": measured}
            extra = dict(meta["extra"]) | {"quantized": {"scheme": scheme, "group_size": self.group_size,
                                                         "source": str(self.checkpoint), "rounded_to_zero": zeroed}}
            with shown.phase(f"writing {self.out}"):
                write_model(model, self.out, meta, fmt, scheme.removeprefix("gptq-"), extra)
        rep: SparsityReport = report(model)
        return {"report": rep, "scheme": scheme, "rounded_to_zero": zeroed, "format": fmt, "quality": measured,
                "hf": hf, "out": self.out}


# -- compact -----------------------------------------------------------------------------------


@dataclass
class CompactRecipe:
    """Physically remove pruned channels and attention heads (``sparseforge compact``): a smaller dense model.

    Every channel (and head) that is pruned in all the slices tied to it is removed (see
    :func:`sparseforge.compact.compact`), the outputs are checked unchanged, and a checkpoint is written
    that stores the new layer sizes (``sparseforge inspect`` and :func:`sparseforge.load` rebuild them).

    Args:
        checkpoint: a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder. Required.
        out: the ``.safetensors`` checkpoint to write. Required.
    """

    checkpoint: str
    out: str

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` on options :meth:`run` would refuse (no file is opened)."""
        if not self.checkpoint:
            raise SparseforgeError("checkpoint: give the model folder or checkpoint to compact")
        if not self.out:
            raise SparseforgeError("out: give the .safetensors file to write")

    def run(self, progress: bool | Progress = False) -> Any:
        """Validate, check ``out``, load, compact, write. Returns the
        :class:`~sparseforge.compact.CompactReport`; the checkpoint's metadata records the source and the
        parameters before and after (``extra["compacted"]``)."""
        from sparseforge.compact import compact

        self.validate()
        check_out(self.out, (".safetensors",), "compact writes a .safetensors checkpoint (the new layer sizes "
                  "travel in its metadata)")
        with using(progress) as shown:
            with shown.phase(f"loading {self.checkpoint}"):
                model, meta = load_any(self.checkpoint)
            with shown.phase("compacting"):
                rep = compact(model)
            extra = dict(meta["extra"]) | {"compacted": {"source": str(self.checkpoint),
                                                         "params_before": rep.params_before,
                                                         "params_after": rep.params_after}}
            with shown.phase(f"writing {self.out}"):
                write_model(model, self.out, meta, "safetensors", "fp32", extra)
        return rep


# -- export ------------------------------------------------------------------------------------


@dataclass
class ExportRecipe:
    """Convert a model file to another format (``sparseforge export``).

    Args:
        checkpoint: a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder. Required.
        out: a ``.sfz`` or ``.safetensors`` file (as ``format``), or a folder for ``hf``. Required.
        format: ``sfz`` (default: Linear/Conv weights as a bitmask plus packed values), ``safetensors``
            (plain, dense) or ``hf`` (a transformers ``save_pretrained`` folder).
        values: sfz weight values: ``fp16`` (default), ``fp32`` (exact), ``int8``/``int4`` (codes + scales).
    """

    checkpoint: str
    out: str
    format: str = "sfz"
    values: str = "fp16"

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` on options :meth:`run` would refuse (no file is opened)."""
        if not self.checkpoint:
            raise SparseforgeError("checkpoint: give the model folder or checkpoint to export")
        if not self.out:
            raise SparseforgeError("out: give where to write")
        _check_choice("format", self.format, export_formats())
        _check_choice("values", self.values, SFZ_VALUES)

    def run(self, progress: bool | Progress = False) -> dict[str, Any]:
        """Validate, check ``out``, load, write. Returns ``out``, ``format``, ``values``, ``bytes`` (of what was
        written) and ``source_bytes``."""
        from sparseforge.formats import get_format

        self.validate()
        fmt = get_format(self.format)[1]
        what = f"export --format {self.format} writes {fmt.noun}"
        if fmt.suffixes or fmt.folder:
            check_out(self.out, fmt.suffixes, what, folder=fmt.folder)
        else:  # a plug-in format that names no suffix: any name
            from sparseforge.oserrors import check_writable

            check_writable(Path(self.out), "file", f"--out {self.out}")
        with using(progress) as shown:
            with shown.phase(f"loading {self.checkpoint}"):
                model, meta = load_any(self.checkpoint)
            with shown.phase(f"writing {self.out}"):
                write_model(model, self.out, meta, self.format, self.values, dict(meta["extra"]))
        return {"out": self.out, "format": self.format, "values": self.values, "bytes": _size(self.out),
                "source_bytes": _size(self.checkpoint)}


# -- inspect -----------------------------------------------------------------------------------


@dataclass
class Inspection:
    """What :func:`inspect_file` finds in a model file (``sparseforge inspect``).

    Attributes:
        checkpoint: the path inspected.
        arch: the architecture the file records (None: a model of no registered architecture).
        arch_kwargs: the architecture's arguments.
        extra: the file's free-form metadata (what pruning, quantization or compaction recorded).
        report: the :class:`~sparseforge.report.SparsityReport` of the loaded model.
        sfz: for a ``.sfz`` file, ``format_version``, ``file_bytes`` and ``tensors`` (per tensor: shape,
            encoding, values, pattern, nonzeros, bytes); None for other files.
    """

    checkpoint: str
    arch: str | None
    arch_kwargs: dict[str, Any]
    extra: dict[str, Any]
    report: SparsityReport
    sfz: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``sparseforge inspect --json``): the report's fields, the metadata, and the sfz layout."""
        out = {"checkpoint": self.checkpoint, "arch": self.arch, "extra": self.extra} | self.report.to_dict()
        if self.sfz is not None:
            out |= {"format": "sfz"} | self.sfz
        return out

    def __str__(self) -> str:
        arch = self.arch or "custom model"
        if arch == "hf":
            arch = f"transformers {self.arch_kwargs.get('class', 'model')}"
        return f"{self.checkpoint}: {arch}\n{self.report}" + (_sfz_table(self.sfz) if self.sfz is not None else "")


def inspect_file(path: str | os.PathLike[str]) -> Inspection:
    """Load a sparseforge checkpoint, ``.sfz`` file or Hugging Face model folder and describe it: its
    architecture, metadata, sparsity report and (``.sfz``) storage layout.

    Raises:
        SparseforgeError: the file does not exist or is not a model file (the readers' errors).
    """
    model, meta = load_any(str(path))
    tensors = meta.get("tensors")
    sfz = None
    if tensors is not None:
        sfz = {"format_version": meta["format_version"], "file_bytes": meta["file_bytes"],
               "tensors": {k: {f: v for f, v in info.items() if f != "sha256"} for k, info in tensors.items()}}
    return Inspection(checkpoint=str(path), arch=meta["arch"], arch_kwargs=dict(meta.get("arch_kwargs") or {}),
                      extra=meta["extra"], report=report(model), sfz=sfz)


def _sfz_table(sfz: dict[str, Any]) -> str:
    """The storage of every tensor of an ``.sfz`` file, as a text table."""
    import io

    from rich.console import Console
    from rich.table import Table

    from sparseforge.report import table_width

    t = Table(title=f"sfz format version {sfz['format_version']}: {sfz['file_bytes']:,} bytes on disk")
    for col in ("tensor", "shape", "encoding", "values", "pattern", "nonzeros", "bytes"):
        t.add_column(col, justify="right" if col in ("nonzeros", "bytes") else "left",
                     overflow="fold" if col == "tensor" else "ellipsis")
    for name, info in sfz["tensors"].items():
        q = info.get("quant")
        values = info.get("values", info["dtype"]) + (f" g{q['group_size']}" if q and q.get("group_size") else "")
        t.add_row(name, "x".join(map(str, info["shape"])), info["encoding"], values, info.get("pattern", "-"),
                  f"{info['nnz']:,}" if "nnz" in info else "-", f"{info['bytes']:,}")
    buf = io.StringIO()
    Console(file=buf, width=table_width(), force_terminal=False, color_system=None).print(t)
    return buf.getvalue()


# -- reading recipe files ----------------------------------------------------------------------

_PATH_FIELDS = {"model", "checkpoint", "out", "calibration", "tokenizer", "data_dir"}


def load_recipe(cls: type[R], path: str | os.PathLike[str]) -> R:
    """Read a YAML recipe file into a validated ``cls`` (:class:`PruneRecipe`, :class:`QuantizeRecipe`,
    :class:`CompactRecipe`, :class:`ExportRecipe`); relative paths in it are relative to the recipe's folder.

    Raises :class:`SparseforgeError` for a missing or invalid file, an unknown key (the closest known key
    suggested), a value of the wrong type or a missing required key, naming the key.
    """
    p = Path(path)
    recipe = from_mapping(cls, read_yaml(p), where=f"recipe {p}")

    def rel(value: Any) -> Any:
        return str(p.parent / value) if isinstance(value, str) and not Path(value).is_absolute() else value

    return dataclasses.replace(recipe, **{f.name: rel(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)  # type: ignore[type-var]
                                          if f.name in _PATH_FIELDS and getattr(recipe, f.name) is not None})
