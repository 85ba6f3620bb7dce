"""The prune, quantize and export commands as recipes: :class:`PruneRecipe`, :class:`QuantizeRecipe`, :class:`ExportRecipe`.

Each is a dataclass whose fields are the command's options (a YAML recipe
maps one to one onto it, read with :func:`load_recipe`, as
:class:`~sparseforge.merge.recipe.MergeRecipe` and
:class:`~sparseforge.distributed.train.TrainRecipe` are), with ``validate()``
(options alone, no file opened) and ``run(progress=...)``, which does the
whole job: check ``out`` before any work, load the model (a Hugging Face
model folder or a sparseforge checkpoint), read calibration data, measure
quality before and after (transformers models), prune or quantize, write the
result in the format ``out`` names, and return the report. The ``sparseforge``
command line maps its flags onto these and prints the report; the same runs
from Python::

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

from sparseforge.errors import SparseforgeError
from sparseforge.oneshot.calibrated import METHODS as ONESHOT_BY_NAME
from sparseforge.io.sfz import VALUES
from sparseforge.quant.rtn import SCHEMES
from sparseforge.progress import Progress, using
from sparseforge.recipes import from_mapping, read_yaml
from sparseforge.report import PruneReport, SparsityReport, report

__all__ = [
    "ExportRecipe", "PruneRecipe", "QuantizeRecipe", "check_out", "export_formats", "load_any", "load_recipe",
    "write_model",
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
                     samples: int, seq_len: int, eval_texts: int, seed: int, why: str = "") -> tuple[Any, list, list]:
    """(tokenizer, calibration batches, held-out texts) for a transformers model, from calibration text
    (a file or folder; default Debian's fortunes). ``tokenizer`` (a folder) replaces the loaded one."""
    from sparseforge.zoo.text import calibration_batches, read_texts, split_texts

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
    split = split_texts(read_texts(calibration))
    batches = calibration_batches(tok, split.calibration, samples, seq_len, seed=seed)
    return tok, batches, split.evaluation[:eval_texts]


def fashion_calibration(data_dir: str | None, seed: int, batches: int) -> list:
    """``batches`` shuffled batches of 128 Fashion-MNIST training images with their labels."""
    from sparseforge.zoo.data import fashion_mnist

    train, _ = fashion_mnist(batch_size=128, data_dir=data_dir, seed=seed, limit_train=128 * int(batches),
                             limit_test=1)
    return list(train)


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
    Face model folder (then Wanda by default), the layers are pruned layer by layer on calibration data:
    ``calibration`` text for a transformers model (with quality on held-out text before and after),
    Fashion-MNIST batches for a zoo model. Without, a sparseforge checkpoint is pruned by ``score``
    (gradient scores average over Fashion-MNIST batches). Both go through :func:`sparseforge.prune`.

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
        calibration, tokenizer, samples, seq_len, eval_texts: text calibration of a transformers model.
        maskllm_steps: MaskLLM training steps. Default 300.
        calibration_batches, data_dir: Fashion-MNIST batches of 128 for a zoo model. Default 8.
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
        calibration = None
        if score.needs_grad:
            if int(self.calibration_batches) < 1:
                raise SparseforgeError("--calibration-batches must be >= 1 for gradient scores")
            with shown.phase("reading Fashion-MNIST calibration batches"):
                calibration = fashion_calibration(self.data_dir, self.seed, self.calibration_batches)
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
        from sparseforge.quality import quality
        from sparseforge.oneshot.prune import prune

        method = self.method or "wanda"
        with shown.phase(f"loading {self.model}"):
            model, meta = load_any(self.model)
        self._check_out(meta["arch"])
        tokenizer = meta.get("tokenizer")
        hf = meta["arch"] == ARCH
        if hf:
            with shown.phase("reading and tokenizing the calibration text"):
                tokenizer, batches, held_out = text_calibration(
                    meta, source=self.model, tokenizer=self.tokenizer, calibration=self.calibration,
                    samples=self.samples, seq_len=self.seq_len, eval_texts=self.eval_texts, seed=self.seed)
        else:
            with shown.phase("reading Fashion-MNIST calibration batches"):
                batches = fashion_calibration(self.data_dir, self.seed, self.calibration_batches)
            tokenizer, held_out = None, []
        before = None
        if hf:
            with shown.phase(f"quality of the dense model on {len(held_out)} held-out texts"):
                before = quality(model, tokenizer, held_out, seq_len=self.seq_len)
        torch.manual_seed(self.seed)
        if method == "maskllm":
            from sparseforge.oneshot.maskllm import prune_maskllm

            rep = prune_maskllm(model, batches, pattern=self.pattern, steps=self.maskllm_steps,
                                target=self._target(False), seed=self.seed, progress=shown)
        else:
            rep = prune(model, method, 0.5 if self.sparsity is None and ":" not in self.pattern else self.sparsity,
                        self.pattern, self.allocation, self._target(False), calibration=batches, progress=shown)
        if hf:
            with shown.phase(f"quality of the pruned model on {len(held_out)} held-out texts"):
                after = quality(model, tokenizer, held_out, seq_len=self.seq_len, reference=before)
            rep.quality = {"dense": before.to_dict(), "pruned": after.to_dict()}
        rep.source = {"source": str(self.model), "calibration": str(self.calibration or "fortunes"),
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
    with the Hessian of the layer inputs on calibration data (text for a transformers model, Fashion-MNIST
    images for a zoo model). A ``.sfz`` ``out`` stores the codes; a ``.safetensors`` one the dequantized
    weights. A transformers model with a tokenizer gets its quality on held-out text before and after.

    Args:
        checkpoint: a sparseforge checkpoint (.safetensors or .sfz) or a Hugging Face model folder. Required.
        out: a ``.sfz`` or ``.safetensors`` file. Required.
        scheme: ``int8`` (default), ``int4``, ``gptq-int8``, ``gptq-int4``.
        group_size: inputs per scale; None (default): one scale per output channel.
        act_order: GPTQ: quantize columns by decreasing Hessian diagonal.
        calibration_batches, data_dir, seed: GPTQ on a zoo model: batches of 128 Fashion-MNIST images.
        calibration, tokenizer, samples, seq_len, eval_texts: text calibration of a transformers model.
    """

    checkpoint: str
    out: str
    scheme: str = "int8"
    group_size: int | None = None
    act_order: bool = False
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

    def run(self, progress: bool | Progress = False) -> dict[str, Any]:
        """Validate, check ``out``, load, quantize, write. Returns ``report`` (the model's
        :class:`~sparseforge.report.SparsityReport`), ``scheme``, ``rounded_to_zero`` (kept weights that
        became 0), ``format``, ``quality`` (``{"dense", "quantized"}``, or None when not measured) and
        ``hf`` (a transformers model)."""
        from sparseforge.io.hf import ARCH
        from sparseforge.quality import quality
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
            if measure:
                with shown.phase("reading and tokenizing the calibration text"):
                    tokenizer, batches, held_out = text_calibration(
                        meta, source=self.checkpoint, tokenizer=self.tokenizer, calibration=self.calibration,
                        samples=self.samples, seq_len=self.seq_len, eval_texts=self.eval_texts, seed=self.seed,
                        why=" (GPTQ calibrates on text; int8/int4 round to nearest and need none)")
                with shown.phase(f"quality of the dense model on {len(held_out)} held-out texts"):
                    before = quality(model, tokenizer, held_out, seq_len=self.seq_len)
            if scheme.startswith("gptq"):
                from sparseforge.quant.gptq import gptq_

                if hf:
                    calibration = batches
                else:
                    if int(self.calibration_batches) < 1:
                        raise SparseforgeError("--calibration-batches must be >= 1")
                    with shown.phase("reading Fashion-MNIST calibration batches"):
                        calibration = fashion_calibration(self.data_dir, self.seed, self.calibration_batches)
                gptq_(model, calibration, scheme, self.group_size, act_order=self.act_order, progress=shown)
            else:
                with shown.phase(f"quantizing to {scheme}"):
                    quantize_(model, scheme, group_size=self.group_size)
            zeroed = rounded_to_zero(model)
            measured = None
            if measure:
                with shown.phase(f"quality of the quantized model on {len(held_out)} held-out texts"):
                    after = quality(model, tokenizer, held_out, seq_len=self.seq_len, reference=before)
                measured = {"dense": before.to_dict(), "quantized": after.to_dict()}
                meta["extra"] = dict(meta["extra"]) | {"quality": measured}
            extra = dict(meta["extra"]) | {"quantized": {"scheme": scheme, "group_size": self.group_size,
                                                         "source": str(self.checkpoint), "rounded_to_zero": zeroed}}
            with shown.phase(f"writing {self.out}"):
                write_model(model, self.out, meta, fmt, scheme.removeprefix("gptq-"), extra)
        rep: SparsityReport = report(model)
        return {"report": rep, "scheme": scheme, "rounded_to_zero": zeroed, "format": fmt, "quality": measured,
                "hf": hf, "out": self.out}


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


# -- reading recipe files ----------------------------------------------------------------------

_PATH_FIELDS = {"model", "checkpoint", "out", "calibration", "tokenizer", "data_dir"}


def load_recipe(cls: type[R], path: str | os.PathLike[str]) -> R:
    """Read a YAML recipe file into a validated ``cls`` (:class:`PruneRecipe`, :class:`QuantizeRecipe`,
    :class:`ExportRecipe`); relative paths in it are relative to the recipe's folder.

    Raises :class:`SparseforgeError` for a missing or invalid file, an unknown key (the closest known key
    suggested), a value of the wrong type or a missing required key, naming the key.
    """
    p = Path(path)
    recipe = from_mapping(cls, read_yaml(p), where=f"recipe {p}")

    def rel(value: Any) -> Any:
        return str(p.parent / value) if isinstance(value, str) and not Path(value).is_absolute() else value

    return dataclasses.replace(recipe, **{f.name: rel(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)  # type: ignore[type-var]
                                          if f.name in _PATH_FIELDS and getattr(recipe, f.name) is not None})
