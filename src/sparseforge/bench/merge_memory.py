"""Merging K models streams tensors from safetensors files: peak memory near one model plus one tensor per input, not K models.

Writes K synthetic sparseforge checkpoints (a stack of ``--layers`` Linear
layers of ``--dim`` x ``--dim`` float32, default 8 x 2048 x 2048, 134 MB
each; for ``ties`` also a base they are "fine-tuned" from), then merges them
in fresh subprocesses, one per measurement, so each peak is clean: (a) the
streaming merge ``sparseforge.merge.merge_files``, and (b) load-all-then-merge:
``read_checkpoint`` of every file, ``weighted_average`` /
``merge_task_arithmetic`` on the loaded state dicts, ``save_file``. Both
verify the checkpoints' SHA-256 digests. The peak is the process's VmHWM
(peak resident set, /proc/self/status) after the merge minus its resident
set after importing torch and sparseforge, reported in MB and as a multiple
of one model's size, with the wall time. Resident memory counts file pages
read through a memory map for as long as they stay mapped (``read_checkpoint``
maps each file and its tensors are views of the map), as well as the merge's
own buffers; the streaming merge reads with ``pread`` into buffers it frees
after each tensor, and ``rss_file_end_mb`` shows how much mapped file it still
holds at the end. Each pair of outputs is compared tensor by tensor
(``same_as_load_all``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from sparseforge.formats import tensor_digest
from sparseforge.io.checkpoint import save_checkpoint

MB = 1e6

# Runs in a fresh interpreter: imports first, then the baseline, then one merge.
_WORKER = r"""
import json, sys, time
job = json.loads(sys.argv[1])
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from sparseforge.io.checkpoint import read_checkpoint
from sparseforge.merge import merge_files, merge_task_arithmetic, preset, weighted_average

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out

before = status()
start = time.perf_counter()
options = {} if job["method"] == "average" else {"density": job["density"]}
if job["mode"] == "streaming":
    merge_files(job["inputs"], job["out"], method=job["method"], base=job["base"], **options)
else:
    states = [read_checkpoint(p)[0] for p in job["inputs"]]
    if job["method"] == "average":
        merged = weighted_average(states)
    else:
        merged = merge_task_arithmetic(read_checkpoint(job["base"])[0], states, preset(job["method"], **options))
    save_file(merged, job["out"])
seconds = time.perf_counter() - start
after = status()
print(json.dumps({"before": before, "after": after, "seconds": seconds}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=int, nargs="+", default=None, metavar="K",
                        help="how many models to merge (default 2 4 8; quick 2)")
    parser.add_argument("--layers", type=int, default=None, help="Linear layers per model (default 8; quick 4)")
    parser.add_argument("--dim", type=int, default=None, help="width of each square layer (default 2048; quick 128)")
    parser.add_argument("--methods", nargs="+", default=["average", "ties"], help="merge methods (default average ties)")
    parser.add_argument("--density", type=float, default=0.2, help="TIES density (default 0.2)")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: the system temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (default: glibc's dynamic one)")


def _write_models(folder: Path, count: int, layers: int, dim: int, seed: int) -> tuple[Path, list[Path], int, int]:
    """A base checkpoint and ``count`` perturbed copies; returns (base, models, model bytes, largest tensor bytes)."""
    torch.manual_seed(seed)
    base = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)])
    base_path = folder / "base.safetensors"
    save_checkpoint(base, base_path)
    paths = []
    tuned = copy.deepcopy(base)
    for i in range(count):
        with torch.no_grad():
            for p_tuned, p_base in zip(tuned.parameters(), base.parameters()):
                p_tuned.copy_(p_base + 0.01 * torch.randn_like(p_base))
        paths.append(folder / f"model{i}.safetensors")
        save_checkpoint(tuned, paths[-1])
    sizes = [t.numel() * t.element_size() for t in base.state_dict().values()]
    return base_path, paths, sum(sizes), max(sizes)


def _measure(job: dict[str, Any], mmap_threshold: int | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if mmap_threshold is not None:  # glibc: allocations this large and larger get their own mmap, freed at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(job)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"merge worker failed ({job['mode']}, {job['method']}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors (names, dtypes, bytes), read one at a time."""
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if ta.dtype != tb.dtype or ta.shape != tb.shape or tensor_digest(ta) != tensor_digest(tb):
                return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    counts = args.models or ([2] if quick else [2, 4, 8])
    layers = args.layers or (4 if quick else 8)
    dim = args.dim or (128 if quick else 2048)
    rows = []
    with tempfile.TemporaryDirectory(prefix="merge-memory-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        base, paths, model_bytes, tensor_bytes = _write_models(folder, max(counts), layers, dim, args.seed)
        for k in counts:
            for method in args.methods:
                outs = {}
                for mode in ("streaming", "load_all"):
                    outs[mode] = folder / f"merged-{method}-{k}-{mode}.safetensors"
                    job = {"mode": mode, "method": method, "inputs": [str(p) for p in paths[:k]],
                           "base": None if method == "average" else str(base), "out": str(outs[mode]),
                           "density": args.density}
                    m = _measure(job, args.malloc_mmap_threshold)
                    peak = m["after"]["VmHWM"] - m["before"]["VmRSS"]
                    rows.append({
                        "models": k, "method": method, "mode": mode,
                        "files_read": k + (method != "average"),
                        "peak_rss_mb": round(peak / MB, 1),
                        "peak_over_model": round(peak / model_bytes, 3),
                        "seconds": round(m["seconds"], 3),
                        "rss_file_end_mb": round((m["after"]["RssFile"] - m["before"]["RssFile"]) / MB, 1),
                        "baseline_rss_mb": round(m["before"]["VmRSS"] / MB, 1),
                        "baseline_hwm_mb": round(m["before"]["VmHWM"] / MB, 1),
                    })
                same = _same_tensors(outs["streaming"], outs["load_all"])
                for r in rows[-2:]:
                    r["same_as_load_all"] = same
                for out in outs.values():
                    out.unlink()
    model_mb = model_bytes / MB
    from sparseforge.bench.common import print_table

    print_table(
        f"merge peak memory above the import baseline (one model: {model_mb:.1f} MB, largest tensor "
        f"{tensor_bytes / MB:.1f} MB)",
        ["K", "method", "mode", "files", "peak MB", "x model", "seconds", "mapped at end MB", "same"],
        [[r["models"], r["method"], r["mode"], r["files_read"], r["peak_rss_mb"], r["peak_over_model"],
          r["seconds"], r["rss_file_end_mb"], r["same_as_load_all"]] for r in rows],
    )
    return {
        "benchmark": "merge-memory", "quick": quick, "torch": torch.__version__,
        "layers": layers, "dim": dim, "dtype": "float32", "model_mb": round(model_mb, 2),
        "largest_tensor_mb": round(tensor_bytes / MB, 2), "density": args.density, "seed": args.seed,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "rows": rows,
    }
