"""PaCA against LoRA and full fine-tuning on MiniLM: topic accuracy, step time, activation memory.

Model: all-MiniLM-L6-v2 (:func:`sparseforge.zoo.minilm.load_minilm`) with
a mean-pooled sentence embedding (attention-mask-weighted mean of the last
hidden states) and a linear classification head. Task: the topic (6
classes) of a fortune (:func:`sparseforge.zoo.text.labelled_fortunes`,
2,933 training and 706 held-out texts, truncated at ``--max-length`` 128
tokens). Adapters go on every Linear of the encoder blocks (``encoder.*``:
query, key, value, attention output, FFN in and out); the head always trains.

1. Fine-tuning: full fine-tuning, LoRA and PaCA at ranks ``--ranks`` (8 and
   16), each over ``--seeds`` seeds (3): AdamW, batch 32, ``--epochs`` 3,
   learning rate decayed linearly to 0 (full 1e-4, LoRA 1e-3, PaCA 3e-4,
   head 1e-3; not tuned), no weight decay, batches grouped by length
   (:func:`length_grouped_batches`). Held-out accuracy after
   ``sf.peft.merge`` (and the largest logit change the merge caused).
2. Training step of PaCA and LoRA at equal rank (``--timing-rank`` 8),
   batch ``--timing-batch`` 32, sequences of exactly ``--seq-lens`` (128,
   256) tokens: the step time (forward, backward, AdamW), both methods timed
   in alternating blocks within one run (:func:`sparseforge.timing.time_interleaved`,
   medians over ``--rounds`` 5); the activation memory of a step, the bytes
   of the distinct tensors autograd saves for backward (counted with
   ``torch.autograd.graph.saved_tensors_hooks``; parameters and buffers
   not counted), for full fine-tuning too; and each method's process peak
   resident memory, each in a fresh process (model, optimizer state and the
   step at each length in ascending order; ``ru_maxrss``).
3. Sequence length in a fixed activation budget (``--budget-mib`` 1024 at
   the timing batch): the longest length (up to MiniLM's 512 positions)
   whose saved activations fit, found by bisection on the saved bytes of one
   sequence (measured with a forward pass; saved activations are per
   sequence, so one sequence's bytes times the batch: the JSON's
   ``batch_scaling`` checks this against part 2's whole-batch measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sparseforge.bench.common import print_table, summarize
from sparseforge.timing import median_ms, time_interleaved
from sparseforge.training import TrainingRun

TARGETS = ("encoder.*",)
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "paca": 3e-4}
HEAD_LR = 1e-3
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3, quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 3, quick 1)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16], help="adapter ranks (default 8 16)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training texts (default all, quick 48)")
    parser.add_argument("--limit-eval", type=int, default=None, help="first N held-out texts (default all, quick 48)")
    parser.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch (default 32, quick 8)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default 128, quick 32)")
    for method, lr in LEARNING_RATES.items():
        parser.add_argument(f"--lr-{method}", type=float, default=lr, help=f"{method} learning rate (default {lr:g})")
    parser.add_argument("--timing-rank", type=int, default=8, help="rank of the step-time comparison (default 8)")
    parser.add_argument("--timing-batch", type=int, default=None, help="sequences per timed step (default 32, quick 4)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="timed lengths (default 128 256, quick 32 64)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 2)")
    parser.add_argument("--budget-mib", type=float, default=None,
                        help="saved-activation budget at the timing batch (default 1024, quick 16)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="longest length searched (default 512, quick 128)")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-memory runs")


class Classifier(nn.Module):
    """An encoder, its attention-mask-weighted mean of the last hidden states, and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))


def build(base: nn.Module, method: str, rank: int | None, seed: int, classes: int) -> tuple[Classifier, list, int]:
    """A classifier on a copy of ``base`` set up for ``method``: (model, optimizer groups, trainable count)."""
    import sparseforge as sf

    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(base), classes).train()
    if method == "full":
        body = list(model.encoder.parameters())
    else:
        config = (sf.peft.PaCA if method == "paca" else sf.peft.LoRA)(rank=rank, targets=TARGETS, seed=seed)
        sf.peft.apply(model.encoder, config)
        body = sf.peft.trainable_parameters(model.encoder)
    head = list(model.head.parameters())
    return model, [body, head], sum(p.numel() for p in body + head)


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters and buffers excluded)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(batch), labels)
    total = sum(seen.values())
    del loss
    return total


def _fixed_batch(tokenizer: Any, texts: list[str], batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch`` sequences of exactly ``seq_len`` tokens (long texts truncated, short ones padded)."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    return dict(tokenizer(chosen, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"))


def length_grouped_batches(lengths: list[int], batch: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch's batches: shuffled, sorted by length within windows of 8 batches, batch order shuffled.

    Like HF transformers' ``group_by_length`` (which sorts windows of 50 batches): batches of
    similar lengths pad little (the fortunes' median is 30 tokens, but almost every random batch
    of 32 holds one of 128).
    """
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = 8 * batch
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


class GroupedTexts:
    """Training data for :func:`sparseforge.fit`: each pass is one epoch of :func:`length_grouped_batches`, tokenized.

    The generator ``gen`` advances with every pass, so pass ``e`` is the ``e``-th epoch's order.
    """

    def __init__(self, texts: list[str], labels: torch.Tensor, tokenize: Any, lengths: list[int], batch: int,
                 gen: torch.Generator) -> None:
        self.texts, self.labels, self.tokenize = texts, labels, tokenize
        self.lengths, self.batch, self.gen = lengths, batch, gen

    def __len__(self) -> int:
        # Windows of 8 batches each split into ceil(window / batch) batches: ceil(n / batch) in all.
        return math.ceil(len(self.texts) / self.batch)

    def __iter__(self) -> Any:
        for idx in length_grouped_batches(self.lengths, self.batch, self.gen):
            yield self.tokenize([self.texts[j] for j in idx]), self.labels[idx]


def _finetune(base, tokenizer, data, method: str, rank: int | None, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning run (through :func:`sparseforge.fit`); the held-out accuracy after merging."""
    import sparseforge as sf

    train_x, train_y, eval_x, eval_y = data
    model, (body, head), trainable = build(base, method, rank, seed, s["classes"])
    opt = torch.optim.AdamW([{"params": body, "lr": s["lr"][method]}, {"params": head, "lr": HEAD_LR}],
                            weight_decay=0.0)
    per_epoch = math.ceil(len(train_x) / s["batch_size"])
    steps = s["epochs"] * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    gen = torch.Generator().manual_seed(seed)
    tok = lambda texts: dict(tokenizer(texts, padding=True, truncation=True, max_length=s["max_length"],
                                       return_tensors="pt"))
    lengths = [len(ids) for ids in tokenizer(train_x, truncation=True, max_length=s["max_length"])["input_ids"]]
    start = time.perf_counter()
    losses: list[float] = []
    sf.fit(model, GroupedTexts(train_x, train_y, tok, lengths, s["batch_size"], gen), opt, F.cross_entropy,
           epochs=s["epochs"], scheduler=sched,
           callbacks=[sf.training.LambdaCallback(on_step_end=lambda state: losses.append(state.loss.item()))])
    seconds = time.perf_counter() - start
    model.eval()
    batches = [tok(eval_x[i:i + 64]) for i in range(0, len(eval_x), 64)]
    with torch.no_grad():
        merge_diff = 0.0
        if method != "full":
            before = model(batches[0])
            sf.peft.merge(model.encoder)
            merge_diff = float((model(batches[0]) - before).abs().max())
        predicted = torch.cat([model(b).argmax(-1) for b in batches])
    accuracy = float((predicted == eval_y).float().mean() * 100)
    row = {"method": method, "rank": rank, "seed": seed, "accuracy": accuracy, "trainable": trainable, "steps": steps,
           "seconds": seconds, "seconds_per_step": seconds / steps, "first_loss": losses[0],
           "final_loss": sum(losses[-per_epoch:]) / len(losses[-per_epoch:]), "merge_max_abs_diff": merge_diff}
    print(f"finetune {method} r={rank} seed {seed}: accuracy {accuracy:.2f}% ({trainable:,} trainable, "
          f"{steps} steps, {seconds:.0f} s)", flush=True)
    return row


def _max_seq_len(model, tokenizer, texts, labels, budget: float, batch: int, longest: int) -> dict[str, Any]:
    """Bisection for the longest length whose saved activations (one sequence's times ``batch``) fit ``budget``."""
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = saved_bytes(model, _fixed_batch(tokenizer, texts, 1, n), labels[:1])
        return cache[n] * batch <= budget

    lo, hi = 0, longest  # invariant: lo fits (0 trivially), everything above hi does not
    if fits(longest):
        lo = longest
    else:
        hi = longest - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return {"max_seq_len": lo, "saved_mib_at_max": cache.get(lo, 0) * batch / MIB, "probes": len(cache)}


def _peak_rss_mib() -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_child(method: str, rank: int, batch: int, seq_lens: list[int], threads: int) -> dict[str, Any]:
    """Run in a fresh process: peak resident MiB after loading, and after training steps at each length."""
    # A child starts with its parent's high-water mark (seen: 1.19 GiB before anything ran here): reset it.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if threads:
        torch.set_num_threads(threads)
    from sparseforge.zoo.minilm import load_minilm
    from sparseforge.zoo.text import labelled_fortunes

    peak = _peak_rss_mib
    m = load_minilm()
    data = labelled_fortunes()
    model, groups, _ = build(m.model, method, rank, 0, len(data.topics))
    opt = torch.optim.AdamW([p for g in groups for p in g], lr=1e-5)
    labels = torch.tensor(data.train_labels[:batch])
    out = {"method": method, "loaded_mib": peak(), "peak_mib": {}}
    run = TrainingRun(model, None, opt, F.cross_entropy)  # fit's step, on batches of our choosing
    run.start()
    for n in sorted(seq_lens):
        inputs = _fixed_batch(m.tokenizer, data.train_texts, batch, n)
        for _ in range(2):
            run.step(inputs, labels)
        out["peak_mib"][str(n)] = peak()
    return out


def _rss(rank: int, batch: int, seq_lens: list[int], threads: int | None) -> list[dict[str, Any]]:
    code = "import json, sys\nfrom sparseforge.bench.peft import rss_child\nprint(json.dumps(rss_child(*json.loads(sys.argv[1]))))"
    rows = []
    for method in ("paca", "lora"):
        args = json.dumps([method, rank, batch, seq_lens, threads or 0])
        out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sparseforge.zoo.minilm import load_minilm
    from sparseforge.zoo.text import labelled_fortunes

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    pick = lambda value, full, short: value if value is not None else (short if quick else full)
    s = {"seeds": pick(args.seeds, 3, 1), "epochs": pick(args.epochs, 3, 1), "ranks": list(args.ranks),
         "batch_size": pick(args.batch_size, 32, 8), "max_length": pick(args.max_length, 128, 32),
         "limit_train": pick(args.limit_train, None, 48), "limit_eval": pick(args.limit_eval, None, 48),
         "lr": {m: getattr(args, f"lr_{m}") for m in LEARNING_RATES}, "head_lr": HEAD_LR, "targets": list(TARGETS),
         "timing_rank": args.timing_rank, "timing_batch": pick(args.timing_batch, 32, 4),
         "seq_lens": sorted(pick(args.seq_lens, [128, 256], [32, 64])), "rounds": pick(args.rounds, 5, 2),
         "budget_mib": pick(args.budget_mib, 1024.0, 16.0), "max_seq_len": pick(args.max_seq_len, 512, 128)}
    start = time.perf_counter()
    m = load_minilm()
    base, tokenizer = m.model, m.tokenizer
    labelled = labelled_fortunes()
    s["classes"] = len(labelled.topics)
    g = torch.Generator().manual_seed(0)  # class-mixed subsets when limited (the lists are ordered by topic)
    train_idx = torch.randperm(len(labelled.train_texts), generator=g)[:s["limit_train"]].tolist()
    eval_idx = torch.randperm(len(labelled.eval_texts), generator=g)[:s["limit_eval"]].tolist()
    data = ([labelled.train_texts[i] for i in train_idx], torch.tensor([labelled.train_labels[i] for i in train_idx]),
            [labelled.eval_texts[i] for i in eval_idx], torch.tensor([labelled.eval_labels[i] for i in eval_idx]))

    # 1. fine-tuning accuracy
    configs = [("full", None)] + [(method, r) for r in s["ranks"] for method in ("lora", "paca")]
    rows = [_finetune(base, tokenizer, data, method, r, seed, s) for method, r in configs for seed in range(s["seeds"])]
    summary = []
    for method, r in configs:
        mine = [row for row in rows if row["method"] == method and row["rank"] == r]
        summary.append({"method": method, "rank": r, "accuracy": summarize([row["accuracy"] for row in mine]),
                        "trainable": mine[0]["trainable"],
                        "seconds_per_step": summarize([row["seconds_per_step"] for row in mine])["mean"]})
    print_table(f"MiniLM topic classification ({len(data[0])} train / {len(data[2])} held-out texts, "
                f"{s['epochs']} epochs, {s['seeds']} seeds)",
                ["method", "rank", "accuracy % (mean)", "std", "min", "max", "trainable", "s/step"],
                [[r["method"], r["rank"] or "-", r["accuracy"]["mean"], r["accuracy"]["std"], r["accuracy"]["min"],
                  r["accuracy"]["max"], f"{r['trainable']:,}", f"{r['seconds_per_step']:.3f}"] for r in summary])

    # 2. step time and activation memory at equal rank
    rank, batch = s["timing_rank"], s["timing_batch"]
    labels = data[1].repeat(math.ceil(batch / len(data[1])))[:batch]
    models = {method: build(base, method, rank, 0, s["classes"]) for method in ("paca", "lora", "full")}
    steps = []
    for n in s["seq_lens"]:
        inputs = _fixed_batch(tokenizer, data[0], batch, n)
        fns = {}
        for method in ("paca", "lora"):
            model, groups, _ = models[method]
            opt = torch.optim.AdamW([p for grp in groups for p in grp], lr=1e-5)
            run = TrainingRun(model, None, opt, F.cross_entropy)  # the step fit takes, timed alone
            run.start()
            fns[method] = lambda run=run, inputs=inputs: run.step(inputs, labels)
        times, _ = time_interleaved(fns, s["rounds"], block_seconds=0.0, warmup_blocks=1)
        for method in ("paca", "lora", "full"):
            steps.append({"method": method, "rank": None if method == "full" else rank, "seq_len": n, "batch": batch,
                          "median_ms": median_ms(times[method]) if method in times else None,
                          "saved_mib": saved_bytes(models[method][0], inputs, labels) / MIB})
        timed = lambda r: "" if r["median_ms"] is None else f" {r['median_ms']:.0f} ms,"
        print(f"step at {batch} x {n}: " + ", ".join(f"{r['method']}{timed(r)} saved {r['saved_mib']:.1f} MiB"
                                                    for r in steps[-3:]), flush=True)
    rss = [] if args.no_rss else _rss(rank, batch, s["seq_lens"], args.threads)
    for row in steps:
        found = [r for r in rss if r["method"] == row["method"]]
        row["peak_rss_mib"] = found[0]["peak_mib"][str(row["seq_len"])] if found else None
    print_table(f"training step, rank {rank}, batch {batch} (medians of {s['rounds']} interleaved rounds)",
                ["method", "tokens", "step ms", "saved activations MiB", "process peak RSS MiB"],
                [[r["method"], r["seq_len"], "-" if r["median_ms"] is None else f"{r['median_ms']:.0f}",
                  f"{r['saved_mib']:.1f}", "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"]
                 for r in steps])

    # 3. longest sequence in a fixed saved-activation budget
    budget = []
    for method in ("paca", "lora", "full"):
        model = models[method][0]
        row = {"method": method, **_max_seq_len(model, tokenizer, data[0], labels, s["budget_mib"] * MIB, batch,
                                                 s["max_seq_len"])}
        per_seq = {n: saved_bytes(model, _fixed_batch(tokenizer, data[0], 1, n), labels[:1]) for n in s["seq_lens"]}
        row["batch_scaling"] = {str(n): next(r["saved_mib"] for r in steps if r["method"] == method and r["seq_len"] == n)
                                / (per_seq[n] * batch / MIB) for n in s["seq_lens"]}
        budget.append(row)
    print_table(f"longest sequence whose saved activations fit {s['budget_mib']:g} MiB at batch {batch}",
                ["method", "max tokens", "saved MiB there"],
                [[r["method"], r["max_seq_len"], f"{r['saved_mib_at_max']:.1f}"] for r in budget])
    return {"benchmark": "peft", "quick": quick, "threads": torch.get_num_threads(), "settings": s,
            "finetune": {"rows": rows, "summary": summary}, "steps": steps, "peak_rss": rss,
            "budget": {"budget_mib": s["budget_mib"], "batch": batch, "rows": budget},
            "seconds": time.perf_counter() - start}
