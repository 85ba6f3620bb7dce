"""Token generation and prefill against the best dense path: packed sparse weights vs dense fp32 / bf16 / int8.

Decode (the issue's headline): a LLaMA-style ``transformers.LlamaForCausalLM``
with random weights (``torch.manual_seed(0)``; speed does not depend on the
values): hidden 2048, FFN 5632, 12 layers, 16 heads (no grouped KV), vocab
32000, input and output embeddings tied: 0.68B parameters, 2.7 GB in fp32 and
1.36 GB in bf16, far over the 504 MiB L3. Batch 1, 128 new tokens (greedy,
KV cache, ``model.generate``) after a 32-token random prompt. Rows: dense
fp32, dense bf16 (``model.to(torch.bfloat16)``, the baseline), dense int8
weight-only (every Linear, the LM head included, PyTorch's
``_weight_int8pack_mm``; rest bf16); the decoder Linears magnitude-pruned
(``sf.prune(model, "magnitude", sparsity=s, target=<decoder Linears>)``) to
50 / 70 / 90% and 2:4, packed with bf16 values (rest bf16, LM head dense
bf16), and 50 / 70 / 90% packed with int8 values (rest bf16, LM head int8
weight-only): :mod:`sparseforge.speed`'s paths. All rows are timed
interleaved in one run (medians of the rounds); tokens/s and ms/token are of
the decode steps (the prompt's prefill is timed apart). Per row: the ratio
against dense bf16, fp32 and int8; the bytes one token reads (Linear weights
and norms; packed layers by mask + values + row starts + scales) and the
achieved bytes/s against a STREAM-style read bandwidth measured in the same
run (the native ``read_sum`` over a 2 GiB float32 buffer, else ``torch.sum``);
and the row's time against the bandwidth-bound time of dense bf16 (its bytes
at the measured bandwidth), so that a gain that only comes from PyTorch's
slow bf16 GEMV shows. Peak memory: a fresh process per row that builds the
model and the row's path and runs one generation (peak RSS reset after the
path is built; ``--no-rss`` skips it, and quick mode does), beside the
computed weights + KV cache. Targets (issue 16), against dense bf16: bf16
values >= 1.6x at 50%, >= 2.5x at 70%, >= 4x at 90%; int8 values >= 2.5x at
50%.

Prefill / encoder shapes: all-MiniLM-L6-v2 (``zoo.minilm``, offline) at 1 and
32 sentences of 128 tokens, and one 4096-wide LLaMA FFN (``LlamaMLP``, 4096
-> 11008 -> 4096) at 128 tokens, each magnitude-pruned to 50% and 90%:
dense fp32 / bf16 / int8 vs the packed formats vs ``to_sparse(precision=
"bf16")``, asserting in the JSON that to_sparse is never slower than the
best dense path its policy allows (ratio >= 0.95, for noise).

Activation sparsity (TEAL, :mod:`sparseforge.kernels.activation`): rows
``dense-bf16+actA%`` (dense weights in column blocks, bf16 values) and
``packed-bf16 50%+actA%`` (the 50% packed weights), the decoder Linears'
inputs zeroed under per-layer thresholds calibrated on random prompts
(``--activation``, default 50%); and the zoo LM's perplexity at 25 / 40 / 50%
activation sparsity, dense and 50%-pruned.

Quality: greedy tokens of the 50%-pruned decode model run on packed fp32
values equal the masked dense fp32 model's (``tokens_identical``); the zoo's
fortunes causal LM (:func:`sparseforge.zoo.causal_lm.load_causal_lm`),
pruned 50%: held-out perplexity dense, masked, and on each packed format.

``--quick``: a 2-layer model of hidden 128, 8 tokens after an 8-token
prompt, 2 rounds, one thread, small prefill shapes, a 10-step tiny causal LM, no RSS:
it checks the code path, not the claims.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import time
from typing import Any

import torch
from torch import nn

from sparseforge.kernels.packed import PackedLinear
from sparseforge.oneshot import prune
from sparseforge.speed import (
    BuiltPath, Workload, build_path, generate, kv_cache_bytes, linear_layers, measure_peak_rss, measure_speed,
    time_paths,
)
from sparseforge.speed import _bytes as _path_bytes
from sparseforge.timing import median_ms, time_interleaved

FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 32000}
QUICK = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 1024}

BASELINE = "dense-bf16"
TARGETS = (("packed-bf16", "50%", 1.6), ("packed-bf16", "70%", 2.5), ("packed-bf16", "90%", 4.0),
           ("packed-int8", "50%", 2.5))
"""(values, sparsity, minimum ratio against dense bf16) from issue 16."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 2)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 12, quick 2)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (default 128, quick 8)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32, quick 8)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--parts", nargs="+", default=["decode", "prefill", "quality"],
                        choices=["decode", "prefill", "quality"], help="which parts to run (default all)")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-memory runs")
    parser.add_argument("--activation", type=float, nargs="*", default=[0.5],
                        help="activation sparsities (TEAL) for the extra decode rows (default 0.5; none: no rows)")
    parser.add_argument("--bandwidth-mib", type=int, default=None, help="read-bandwidth buffer (default 2048, quick 256)")


def model_config(quick: bool, layers: int | None = None) -> dict[str, Any]:
    """The decode model's LlamaConfig arguments (``layers`` overrides the depth)."""
    cfg = dict(QUICK if quick else FULL)
    if layers is not None:
        cfg["num_hidden_layers"] = int(layers)
    return cfg


def build_decode_model(config: dict[str, Any], seed: int = 0, sparsity: float | None = None,
                       pattern: str = "unstructured") -> nn.Module:
    """The decode model: ``LlamaForCausalLM(LlamaConfig(**config))`` seeded, float32, eval; pruned by magnitude
    (its decoder Linears) to ``sparsity`` or ``pattern`` N:M when given. Also the loader of the RSS processes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(**config, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    model = LlamaForCausalLM(llama).float().eval()
    if sparsity is not None or pattern != "unstructured":
        prune(model, "magnitude", sparsity=0.5 if sparsity is None else sparsity, pattern=pattern,
              target=linear_layers(model))
    return model


def _with_activation_sparsity(path: BuiltPath, sparsity: float, cfg: dict[str, Any], prompt: int) -> BuiltPath:
    """``path`` with its decoder Linears (dense or packed) as ActivationSparseLinear at ``sparsity`` (TEAL).

    Thresholds: the ``sparsity`` quantile of each layer's inputs over two random prompts (the weights are
    random too: only the fraction of inputs skipped matters for speed). Bytes per token count each such
    layer's column blocks times the fraction of columns read, ``1 - sparsity``.
    """
    from sparseforge.kernels.activation import ActivationSparseLinear, activation_sparsity

    module = copy.deepcopy(path.module)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg["vocab_size"], (1, prompt), generator=gen) for _ in range(2)]
    layers = [n for n, m in module.named_modules() if n.startswith("model.layers.")
              and isinstance(m, (nn.Linear, PackedLinear))]
    with torch.no_grad():
        activation_sparsity(module, calib, sparsity=sparsity, layers=layers, values="bf16")
    total, per_token = _path_bytes(module)
    for m in module.modules():
        if isinstance(m, ActivationSparseLinear):
            full = sum(t.numel() * t.element_size() for t in (m.cmask, m.values, m.cptr))
            per_token -= round(full * sparsity)
    what = f"{path.description}; decoder Linear inputs {round(100 * sparsity)}% sparse (TEAL thresholds)"
    return BuiltPath(f"{path.name}+act", module.eval(), what, path.input_dtype, total, per_token)


def _label(sparsity: float | None, pattern: str) -> str:
    return pattern if pattern != "unstructured" else f"{round(100 * sparsity)}%"


def read_bandwidth(mib: int, rounds: int) -> dict[str, Any]:
    """A STREAM-style read: bytes/s of summing a ``mib`` MiB float32 buffer (native ``read_sum`` or ``torch.sum``)."""
    from sparseforge.kernels.native import native

    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    m = native(build=False)
    fn = (lambda: m.read_sum(buf)) if m is not None and hasattr(m, "read_sum") else (lambda: torch.sum(buf))
    raw, _ = time_interleaved({"read": fn}, rounds, block_seconds=0.0, warmup_blocks=1)
    secs = median_ms(raw["read"]) / 1e3
    return {"bytes": buf.numel() * 4, "seconds": round(secs, 5), "bytes_per_s": round(buf.numel() * 4 / secs),
            "how": "native read_sum" if m is not None and hasattr(m, "read_sum") else "torch.sum"}


def _decode(args: argparse.Namespace, quick: bool, rounds: int, log) -> dict[str, Any]:
    cfg = model_config(quick, args.layers)
    tokens = args.tokens or (8 if quick else 128)
    prompt = args.prompt or (8 if quick else 32)
    workload = Workload(batch_sizes=(), tokens=tokens, prompt_len=prompt, rounds=rounds)
    log(f"decode: building the model {cfg}")
    dense = build_decode_model(cfg)
    params = sum(p.numel() for p in dense.parameters())
    paths: dict[str, BuiltPath] = {}
    for name in (BASELINE, "dense", "dense-int8"):  # the baseline first: time_interleaved probes the first
        paths[name] = build_path(dense, name)
    for a in args.activation:  # activation sparsity alone: dense weights in column blocks, bf16 values
        paths[f"dense-bf16+act{round(100 * a)}%"] = _with_activation_sparsity(paths[BASELINE], a, cfg, prompt)
    identical: dict[str, Any] = {}
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0))
    sparse: dict[str, BuiltPath] = {}
    # one masked model at a time (2.7 GB in fp32 at full size): its rows are packed, then it is freed
    for s, pattern in [*((s, "unstructured") for s in args.sparsities), (None, "2:4")]:
        label = _label(s, pattern)
        log(f"decode: pruning to {label} and packing")
        pruned = copy.deepcopy(dense)
        prune(pruned, "magnitude", sparsity=0.5 if s is None else s, pattern=pattern, target=linear_layers(pruned))
        for values in ("packed-bf16",) if s is None else ("packed-bf16", "packed-int8"):
            sparse[f"{values} {label}"] = build_path(pruned, values)
        if s is not None and round(s, 2) == 0.5 and args.activation:
            # activation sparsity (TEAL) on top: the 50% packed-bf16 layers, thresholds calibrated on random prompts
            for a in args.activation:
                sparse[f"packed-bf16 {label}+act{round(100 * a)}%"] = _with_activation_sparsity(
                    sparse[f"packed-bf16 {label}"], a, cfg, prompt)
        if not identical:  # exactness: packed fp32 values against the masked dense fp32 model, greedy
            exact = build_path(pruned, "packed-fp32")
            a, b = generate(pruned, ids, tokens)[0, prompt:], generate(exact.module, ids, tokens)[0, prompt:]
            same = bool(torch.equal(a, b))
            identical = {"sparsity": label, "tokens": tokens, "tokens_identical": same,
                         "first_difference": None if same else int((a != b).nonzero()[0])}
            del exact
        del pruned
        gc.collect()
    # rows in the order: bf16 values (unstructured, then 2:4), then int8 values
    for values in ("packed-bf16", "packed-int8"):
        paths |= {k: v for k, v in sparse.items() if k.startswith(values + " ")}
    del sparse
    log(f"decode: timing {len(paths)} rows, {rounds} rounds of {tokens} tokens")
    bw = read_bandwidth(args.bandwidth_mib or (256 if quick else 2048), max(3, rounds))
    timings = time_paths(paths, dense, workload, log)
    bw_after = read_bandwidth(args.bandwidth_mib or (256 if quick else 2048), max(3, rounds))
    bandwidth = max(bw["bytes_per_s"], bw_after["bytes_per_s"])
    base = timings[BASELINE].ms_per_token
    bf16_bound_ms = paths[BASELINE].bytes_per_token / bandwidth * 1e3
    rows = []
    for name, p in paths.items():
        t = timings[name]
        row = {"row": name, "description": p.description, "bytes_per_token": p.bytes_per_token,
               "weight_bytes": p.weight_bytes, "tokens_per_s": t.tokens_per_s, "ms_per_token": t.ms_per_token,
               "prefill_ms": t.prefill_ms,
               "vs_dense_bf16": round(base / t.ms_per_token, 3),
               "vs_dense_fp32": round(timings["dense"].ms_per_token / t.ms_per_token, 3),
               "vs_dense_int8": round(timings["dense-int8"].ms_per_token / t.ms_per_token, 3),
               "achieved_bytes_per_s": round(p.bytes_per_token / (t.ms_per_token / 1e3)),
               "fraction_of_bandwidth": round(p.bytes_per_token / (t.ms_per_token / 1e3) / bandwidth, 3),
               "vs_bf16_bandwidth_bound": round(bf16_bound_ms / t.ms_per_token, 3)}
        kv = kv_cache_bytes(dense, prompt + tokens, torch.float32 if name == "dense" else torch.bfloat16)
        row["memory"] = {"estimate_bytes": p.weight_bytes + kv, "kv_cache_bytes": kv,
                         "estimate": "weights + KV cache (computed)"}
        rows.append(row)
    del paths
    gc.collect()
    if not (args.no_rss or quick):
        for row in rows:
            values, _, label = row["row"].partition(" ")
            kwargs: dict[str, Any] = {"config": cfg}
            if label:
                kwargs |= {"pattern": label} if ":" in label else {"sparsity": int(label.rstrip("%")) / 100}
            log(f"decode: peak memory of {row['row']} (a fresh process)")
            row["memory"] |= measure_peak_rss("sparseforge.bench.decode:build_decode_model", values, workload,
                                              loader_kwargs=kwargs)
    by_name = {r["row"]: r for r in rows}
    targets = []
    for values, label, need in TARGETS:
        r = by_name.get(f"{values} {label}")
        targets.append({"row": f"{values} {label}", "vs": BASELINE, "min_ratio": need,
                        "ratio": None if r is None else r["vs_dense_bf16"],
                        "holds": None if r is None else r["vs_dense_bf16"] >= need})
    return {"model": {"class": "LlamaForCausalLM", "config": cfg, "tied_embeddings": True, "parameters": params,
                      "seed": 0, "weights": "random (speed does not depend on the values)"},
            "tokens": tokens, "prompt": prompt, "rounds": rounds, "baseline": BASELINE,
            "bandwidth": {"before": bw, "after": bw_after, "bytes_per_s": bandwidth},
            "dense_bf16_bandwidth_bound_ms_per_token": round(bf16_bound_ms, 4),
            "rows": rows, "targets": targets, "exactness": identical}


def _never_slower(rep: dict[str, Any], policy: str = "bf16", tolerance: float = 0.95) -> dict[str, Any]:
    from sparseforge.kernels.choose import PRECISIONS

    allowed = PRECISIONS[policy][0]
    rows = {r["path"]: r for r in rep["paths"]}
    out = {}
    for b in map(str, rep["workload"]["batch_sizes"]):
        best = min((rows[d]["forward"][b]["ms"], d) for d in allowed if d in rows)
        ratio = best[0] / rows["to_sparse"]["forward"][b]["ms"]
        overall = min((r["forward"][b]["ms"], n) for n, r in rows.items() if n in PRECISIONS["int8"][0])
        out[b] = {"best_dense": best[1], "ratio": round(ratio, 3), "holds": ratio >= tolerance,
                  "best_dense_any_precision": overall[1],
                  "ratio_vs_best_dense_any_precision": round(overall[0] / rows["to_sparse"]["forward"][b]["ms"], 3)}
    return out


def _prefill(quick: bool, rounds: int, sparsities: list[float], log) -> list[dict[str, Any]]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from sparseforge.zoo.minilm import load_minilm

    shapes = []
    hidden, ffn = (128, 352) if quick else (4096, 11008)
    tokens = 16 if quick else 128
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=ffn, hidden_act="silu")).float().eval()
    shapes.append((f"llama-ffn-{hidden}", mlp, Workload(batch_sizes=(tokens,), rounds=rounds), f"{tokens} tokens"))
    bert = load_minilm().model
    seq = 8 if quick else 128
    shapes.append(("minilm", bert, Workload(batch_sizes=(1,) if quick else (1, 32), seq_len=seq, rounds=rounds),
                   f"sentences of {seq} tokens"))
    results = []
    for name, model, workload, what in shapes:
        for s in ([0.9] if quick else [x for x in sparsities if x in (0.5, 0.9)] or sparsities[:1]):
            pruned = copy.deepcopy(model)
            prune(pruned, "magnitude", sparsity=s, target=linear_layers(pruned))
            log(f"prefill: {name} at {round(100 * s)}%")
            rep = measure_speed(pruned, precision="int8", workload=workload, to_sparse_precision="bf16",
                                name=f"{name} {round(100 * s)}%").to_dict()
            rep["inputs_per_batch"] = what
            rep["sparsity"] = s
            rep["to_sparse_never_slower"] = _never_slower(rep)
            results.append(rep)
            log("  " + ", ".join(f"{r['path']} " + "/".join(f"{f['ms']:.3g}" for f in r["forward"].values())
                                  + " ms" for r in rep["paths"]))
            del pruned
            gc.collect()
    return results


def _quality(quick: bool, log) -> dict[str, Any]:
    import tempfile

    from sparseforge.quality import perplexity
    from sparseforge.zoo.causal_lm import LM_TOPICS, TINY_CONFIG, load_causal_lm, train_causal_lm
    from sparseforge.zoo.text import fortunes

    if quick:  # a tiny model trained for a few steps: checks the path, not the claim
        path = train_causal_lm(tempfile.mkdtemp(prefix="sf-bench-decode-lm-") + "/lm", steps=10, config=TINY_CONFIG,
                               seq_len=32, batch_size=4, progress=False, eval_windows=4)
        lm = load_causal_lm(path, train_if_missing=False)
    else:
        lm = load_causal_lm()
    texts = fortunes(LM_TOPICS).evaluation
    seq_len, windows = (32, 4) if quick else (128, 200)

    def ppl(m: nn.Module) -> float:
        with torch.inference_mode():
            return round(perplexity(m, lm.tokenizer, texts, seq_len, max_windows=windows), 4)

    out: dict[str, Any] = {"model": str(lm.path), "seq_len": seq_len, "windows": windows, "sparsity": 0.5}
    out["dense-fp32"] = ppl(lm.model)
    masked = copy.deepcopy(lm.model)
    prune(masked, "magnitude", sparsity=0.5, target=linear_layers(masked))
    out["masked-fp32"] = ppl(masked)
    for name in ("packed-fp32", "packed-bf16", "packed-int8"):
        log(f"quality: perplexity on {name}")
        out[name] = ppl(build_path(masked, name).module)
    for name in ("dense-bf16", "dense-int8"):
        out[f"masked {name}"] = ppl(build_path(masked, name).module)
    # activation sparsity (TEAL): thresholds from the calibration split, fp32 values (only the skipping counts)
    from sparseforge.kernels.activation import activation_sparsity
    from sparseforge.tokens import calibration_batches

    calib = calibration_batches(lm.tokenizer, fortunes(LM_TOPICS).calibration, samples=8 if quick else 64,
                                seq_len=seq_len, batch_size=8)
    out["activation_sparsity"] = {}
    for base_name, base in (("dense", lm.model), ("masked", masked)):
        for a in (0.25, 0.4, 0.5):
            log(f"quality: perplexity of {base_name} with {round(100 * a)}% activation sparsity")
            m = copy.deepcopy(base)
            with torch.no_grad():
                activation_sparsity(m, calib, sparsity=a, layers=linear_layers(m), values="fp32")
            out["activation_sparsity"][f"{base_name} +act{round(100 * a)}%"] = ppl(m)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    if args.threads or quick:
        torch.set_num_threads(args.threads or 1)  # quick: one thread, so a busy machine does not stall it
    rounds = args.rounds or (2 if quick else 5)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {line}", flush=True)

    from sparseforge.kernels.native import native_status

    result: dict[str, Any] = {"benchmark": "decode", "quick": quick, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "kernels": native_status(),
                              "load_average_before": [round(v, 2) for v in os.getloadavg()],
                              # PyTorch's 2 MiB pages for its own (dense) allocations; packed layers ask for them
                              # regardless (kernels.packed._huge_pages)
                              "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
    if "decode" in args.parts:
        result["decode"] = _decode(args, quick, rounds, log)
        d = result["decode"]
        print(f"decode, batch 1, {d['tokens']} tokens after {d['prompt']}; read bandwidth "
              f"{d['bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s; dense bf16 bound "
              f"{d['dense_bf16_bandwidth_bound_ms_per_token']:.2f} ms/token")
        print(f"{'row':18s} {'tok/s':>8s} {'ms/tok':>8s} {'x bf16':>7s} {'x fp32':>7s} {'x int8':>7s} "
              f"{'GB/s':>6s} {'of bw':>6s} {'x bound':>7s} {'MiB':>8s}")
        for r in d["rows"]:
            mem = r["memory"].get("peak_rss_bytes") or r["memory"]["estimate_bytes"]
            print(f"{r['row']:18s} {r['tokens_per_s']:8.2f} {r['ms_per_token']:8.3f} {r['vs_dense_bf16']:6.2f}x "
                  f"{r['vs_dense_fp32']:6.2f}x {r['vs_dense_int8']:6.2f}x {r['achieved_bytes_per_s'] / 1e9:6.2f} "
                  f"{r['fraction_of_bandwidth']:6.2f} {r['vs_bf16_bandwidth_bound']:6.2f}x {mem / 2**20:8.1f}")
        for t in d["targets"]:
            verdict = "not run" if t["holds"] is None else f"{t['ratio']}x {'holds' if t['holds'] else 'MISSES'}"
            print(f"  target {t['row']} >= {t['min_ratio']}x vs dense bf16: {verdict}")
        print(f"  greedy tokens, packed fp32 vs masked dense fp32: identical = {d['exactness']['tokens_identical']}")
    if "prefill" in args.parts:
        result["prefill"] = _prefill(quick, rounds, list(args.sparsities), log)
        for rep in result["prefill"]:
            for b, v in rep["to_sparse_never_slower"].items():
                print(f"  {rep['model']} batch {b}: to_sparse {v['ratio']:.2f}x of {v['best_dense']} "
                      f"({'never slower' if v['holds'] else 'SLOWER'})")
    if "quality" in args.parts:
        result["quality"] = _quality(quick, log)
        print("perplexity: " + ", ".join(f"{k} {v}" for k, v in result["quality"].items()
                                         if isinstance(v, float) and k != "sparsity"))
        print("perplexity with activation sparsity: "
              + ", ".join(f"{k} {v}" for k, v in result["quality"]["activation_sparsity"].items()))
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
