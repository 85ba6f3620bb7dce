"""A small GPT-style causal language model trained on English text, for measuring pruning damage.

The model is a ``transformers`` :class:`~transformers.LlamaForCausalLM`, so it
has the module names of real LLaMA checkpoints
(``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``)
and the one-shot methods that target LLMs run on it unchanged. The default
(:data:`DEFAULT_CONFIG`): hidden 256, 4 layers, 4 attention heads sharing 2
key/value heads (grouped-query attention), SwiGLU FFN 768, 256 positions,
tied input/output embeddings, a byte-level BPE vocabulary of 1,024: 3.41M
parameters. Every Linear's input dimension (256 or 768) is a multiple of 8,
so 2:4 and 4:8 patterns fit every layer.

Data: the calibration split of :func:`~sparseforge.zoo.text.fortunes` over
:data:`LM_TOPICS` (every topic file of Debian's ``fortunes`` package except
``ascii-art``, ``pratchett`` and ``translate-me``: about 2.0M characters,
0.86M tokens), each text followed by an end-of-text token, cut into
windows. The evaluation split is held out; since the split goes by a hash of
each text, no evaluation text of any :func:`fortunes` call (the default
topics included) is trained on.

Training (:func:`train_causal_lm`) is deterministic: seeded initialisation,
a seeded window order, AdamW with linear warm-up and cosine decay. The same
machine, torch version and thread count give the same weights. The result is
cached by :func:`load_causal_lm` (trained on first use: 800 steps of about
0.33 s on two idle CPU cores, 4-5 minutes; longer when the cores are shared)
under ``$SPARSEFORGE_CACHE`` or ``~/.cache/sparseforge``, in a folder whose
name carries a version (:data:`CACHE_NAME`) that changes when the recipe does.

Quality is :func:`perplexity`: the exponential of the mean next-token
negative log-likelihood over non-overlapping windows of held-out text.
Measured (torch 2.13 CPU, seed 0): final train loss 3.89, held-out
perplexity 50.0 (50.2 on the evaluation split of the default
:func:`fortunes` topics). Magnitude pruning of every Linear in
``model.layers`` raises the latter to 51.5 at 50%, 58.6 at 70%, 77.6 at 80%,
53.5 for 2:4 and 52.5 for 4:8; random 50% to 193.

Requires the ``hf`` extra (``transformers``, which brings ``tokenizers``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.io.hf import load_pretrained, save_pretrained
from sparseforge.quality import perplexity
from sparseforge.progress import Progress, using
from sparseforge.tokens import calibration_batches, token_stream
from sparseforge.training import FitState, LambdaCallback, ProgressCallback, fit
from sparseforge.zoo.text import fortunes

__all__ = [
    "CACHE_ENV_VAR",
    "CACHE_NAME",
    "DEFAULT_CONFIG",
    "EOS_TOKEN",
    "LM_TOPICS",
    "METADATA_FILE",
    "TINY_CONFIG",
    "CausalLM",
    "CausalLMConfig",
    "build_model",
    "calibration_batches",
    "default_cache_path",
    "load_causal_lm",
    "perplexity",
    "train_causal_lm",
    "train_tokenizer",
]

CACHE_ENV_VAR = "SPARSEFORGE_CACHE"
CACHE_NAME = "causal-lm-fortunes-v1"
METADATA_FILE = "sparseforge_training.json"
EOS_TOKEN = "<|endoftext|>"
# Every topic file of Debian's fortunes 1.99 except ascii-art (pictures),
# pratchett (one entry) and translate-me (seven, not English).
LM_TOPICS = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic",
    "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
    "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people",
    "perl", "pets", "platitudes", "politics", "riddles", "science", "songs-poems", "sports", "startrek",
    "tao", "wisdom", "work", "zippy",
)
HF_HINT = "install the Hugging Face extra: pip install 'sparseforge[hf]'"


@dataclass(frozen=True)
class CausalLMConfig:
    """The shape of the model and the size of its BPE vocabulary (special token included)."""

    vocab_size: int = 1024
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position: int = 256

    def __post_init__(self) -> None:
        if self.vocab_size < 257:
            raise SparseforgeError(
                f"vocab_size must hold the 256 bytes and the end-of-text token, got {self.vocab_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise SparseforgeError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size} "
                                   f"and be a multiple of num_kv_heads {self.num_kv_heads}")


DEFAULT_CONFIG = CausalLMConfig()
# For tests: trains a few steps in well under a second.
TINY_CONFIG = CausalLMConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position=64)


@dataclass
class CausalLM:
    """A trained model (``LlamaForCausalLM``, eval mode), its tokenizer, the folder they load from, and metadata."""

    model: nn.Module
    tokenizer: Any
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def _require_transformers() -> None:
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SparseforgeError(f"transformers is not installed: {HF_HINT}") from None


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024, max_length: int = 256) -> Any:
    r"""A byte-level BPE tokenizer trained on ``texts``, as a ``transformers`` fast tokenizer.

    GPT-2's scheme: text is split by the GPT-2 pre-tokenisation regex and
    mapped to the 256 byte symbols, so any text encodes (no unknown token)
    and decoding gives it back exactly; ``vocab_size - 257`` merges are
    learnt (fewer when the texts run out of pairs seen twice). One special
    token, ``<|endoftext|>``, is id 0 and serves as eos, bos and pad. BPE
    training counts pairs and breaks ties by a fixed order, so the same
    texts give the same tokenizer. ``save_pretrained`` writes a folder that
    ``AutoTokenizer.from_pretrained`` loads offline.

    >>> tok = train_tokenizer(["the cat sat on the mat", "the dog sat on the log"], vocab_size=270)
    >>> ids = tok("the cat sat\n on  the log!", add_special_tokens=False)["input_ids"]
    >>> tok.decode(ids), len(ids) < len("the cat sat\n on  the log!")
    ('the cat sat\n on  the log!', True)
    """
    _require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False)


def build_model(config: CausalLMConfig = DEFAULT_CONFIG, tokenizer: Any = None, seed: int = 0) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of ``config`` (seeded), float32, SDPA attention.

    The vocabulary is the tokenizer's when given (it can be smaller than
    ``config.vocab_size`` when BPE ran out of merges), else ``config.vocab_size``.
    """
    _require_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer) if tokenizer is not None else config.vocab_size
    eos = int(tokenizer.eos_token_id) if tokenizer is not None else 0
    llama = LlamaConfig(
        vocab_size=vocab, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama).float()


def _lr_factor(step: int, steps: int, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final`` of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _log(progress: bool | Progress, message: str) -> None:
    if progress.enabled if isinstance(progress, Progress) else progress:
        print(f"[causal-lm] {message}", file=sys.stderr, flush=True)


def train_causal_lm(
    out_dir: str | os.PathLike[str],
    *,
    steps: int = 800,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    seed: int = 0,
    config: CausalLMConfig = DEFAULT_CONFIG,
    topics: Sequence[str] = LM_TOPICS,
    data_dir: str | os.PathLike[str] | None = None,
    eval_windows: int | None = None,
    progress: bool | Progress = True,
) -> Path:
    """Train the causal LM on the fortunes' calibration split and save it to ``out_dir``; returns the path.

    The recipe: a byte-level BPE tokenizer (:func:`train_tokenizer`,
    ``config.vocab_size``) learnt on the calibration texts of
    ``fortunes(topics)``; those texts as one token stream
    (:func:`~sparseforge.zoo.text.token_stream`, ``<|endoftext|>`` after each
    text); every epoch, the stream cut into non-overlapping windows of
    ``seq_len`` tokens after a random shift, in a random order
    (``torch.Generator`` seeded with ``seed``; the model is initialised
    from ``torch.manual_seed(seed)``), ``batch_size`` windows a step; AdamW
    (betas 0.9/0.95, ``weight_decay`` on matrices only, gradients clipped
    at norm 1) at ``lr`` with linear warm-up over ``warmup`` steps (default:
    5% of ``steps``) and cosine decay to 10% of ``lr``.

    Defaults: 800 steps of 16 x 128 tokens (1.6M tokens, two epochs of the
    0.86M training tokens), lr 2e-3, weight decay 0.1, seed 0, the
    :data:`DEFAULT_CONFIG` model, :data:`LM_TOPICS`.

    ``progress`` (default True, or a :class:`~sparseforge.progress.Progress`):
    a few lines on what is trained and the result, and the steps with the
    recent loss and the perplexity evaluation as :mod:`sparseforge.progress`
    shows them, all on stderr.

    ``out_dir`` gets the model (``config.json``, ``model.safetensors``), the
    tokenizer and :data:`METADATA_FILE` (the arguments, parameter count,
    final train loss = mean of the last 5% of steps, held-out perplexity on
    the evaluation split of ``fortunes(topics)`` in windows of ``seq_len``
    (the first ``eval_windows`` when given), seconds). It is written to a
    temporary folder beside ``out_dir`` and renamed into place, so a reader
    never sees half a model; an existing ``out_dir`` is replaced.
    """
    _require_transformers()
    if steps < 1 or batch_size < 1 or seq_len < 2 or seq_len > config.max_position:
        raise SparseforgeError(f"need steps >= 1, batch_size >= 1, 2 <= seq_len <= {config.max_position}; got "
                               f"steps={steps}, batch_size={batch_size}, seq_len={seq_len}")
    out = Path(out_dir)
    start = time.perf_counter()
    split = fortunes(tuple(topics), data_dir=data_dir)
    tokenizer = train_tokenizer(split.calibration, config.vocab_size, config.max_position)
    stream = token_stream(tokenizer, split.calibration)
    epoch_windows = stream.numel() // seq_len - 1  # room for a random shift of up to one window
    if epoch_windows < batch_size:
        raise DataError(f"training text of {stream.numel()} tokens gives {max(0, epoch_windows)} windows of "
                        f"{seq_len} an epoch, fewer than one batch of {batch_size}")
    model = build_model(config, tokenizer, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    _log(progress, f"training a {n_params / 1e6:.2f}M-parameter LLaMA-style model for {steps} steps on "
                   f"{stream.numel():,} tokens ({len(split.calibration):,} fortunes) -> {out}")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, round(0.05 * steps)) if warmup is None else max(1, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    windows = _ShiftedWindows(stream, seq_len, epoch_windows, batch_size, torch.Generator().manual_seed(seed))
    losses: list[float] = []

    def track(state: FitState) -> None:
        losses.append(float(state.loss.detach()))

    def recent_loss(state: FitState) -> str:
        recent = losses[-50:]
        return f"loss {sum(recent) / len(recent):.3f}"

    with using(progress) as shown:
        fit(model, windows, optimizer, lambda outputs, _: outputs.loss, steps=steps, scheduler=scheduler,
            forward=lambda net, x: net(input_ids=x, labels=x, use_cache=False),
            callbacks=[LambdaCallback(after_backward=lambda state: torch.nn.utils.clip_grad_norm_(
                           model.parameters(), 1.0), on_step_end=track),
                       ProgressCallback(shown, "training the causal LM: steps", info=recent_loss)])
        train_seconds = time.perf_counter() - start
        tail = losses[-max(1, steps // 20):]
        model.eval()
        with shown.phase("held-out perplexity"):
            eval_ppl = perplexity(model, tokenizer, split.evaluation, seq_len=seq_len, max_windows=eval_windows)
    _log(progress, f"held-out perplexity {eval_ppl:.2f} ({time.perf_counter() - start:.0f}s)")
    metadata = {
        "name": CACHE_NAME,
        "config": asdict(config),
        "vocab_size": len(tokenizer),
        "parameters": n_params,
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "seed": seed,
        "topics": list(topics),
        "train_texts": len(split.calibration),
        "train_tokens": int(stream.numel()),
        "eval_texts": len(split.evaluation),
        "final_train_loss": sum(tail) / len(tail),
        "eval_perplexity": eval_ppl,
        "eval_windows": eval_windows,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save_pretrained(model, out, tokenizer, metadata, metadata_file=METADATA_FILE)
    _log(progress, f"saved to {out}")
    return out


class _ShiftedWindows:
    """The training batches of :func:`train_causal_lm`, endless: ``(x, x)`` with ``x`` of ``batch_size`` windows.

    Every epoch the stream is cut into ``epoch_windows`` windows of ``seq_len`` tokens after a
    random shift, in a random order (both drawn from ``gen``); incomplete batches are dropped.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, epoch_windows: int, batch_size: int,
                 gen: torch.Generator) -> None:
        self.stream, self.seq_len, self.epoch_windows = stream, seq_len, epoch_windows
        self.batch_size, self.gen = batch_size, gen

    def __iter__(self) -> Any:
        order: list[torch.Tensor] = []
        while True:
            if len(order) < self.batch_size:
                shift = int(torch.randint(0, self.seq_len, (1,), generator=self.gen))
                windows = self.stream[shift:shift + self.epoch_windows * self.seq_len].view(self.epoch_windows,
                                                                                             self.seq_len)
                order = list(windows[torch.randperm(self.epoch_windows, generator=self.gen)].split(self.batch_size))
                order = [b for b in order if b.shape[0] == self.batch_size]
            x = order.pop(0)
            yield x, x


def default_cache_path() -> Path:
    """``$SPARSEFORGE_CACHE/causal-lm-fortunes-v1``, or ``~/.cache/sparseforge/causal-lm-fortunes-v1``."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "sparseforge"
    return Path(root) / CACHE_NAME


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json",
                                                     METADATA_FILE))


def load_causal_lm(
    path: str | os.PathLike[str] | None = None,
    *,
    train_if_missing: bool = True,
    progress: bool | Progress = True,
    data_dir: str | os.PathLike[str] | None = None,
) -> CausalLM:
    """The trained causal LM from ``path`` (default :func:`default_cache_path`), training it first if missing.

    Training uses :func:`train_causal_lm`'s defaults (about 5 minutes on two
    CPU cores, progress printed to stderr unless ``progress=False``) and
    needs the fortune files (``data_dir``, as in
    :func:`~sparseforge.zoo.text.fortunes`). With ``train_if_missing=False``
    a missing model is a :class:`SparseforgeError`. Loads offline
    (``local_files_only``), float32, in eval mode.
    """
    _require_transformers()

    target = Path(path) if path is not None else default_cache_path()
    if not _is_complete(target):
        if target.exists() and any(target.iterdir()):
            raise SparseforgeError(f"{target} exists but is not a complete causal LM folder; delete it to retrain")
        if not train_if_missing:
            raise SparseforgeError(f"no trained causal LM at {target}; call load_causal_lm() with "
                                   "train_if_missing=True or train_causal_lm()")
        _log(True, f"no cached model at {target}: training it once (about 5 minutes on two CPU cores)")
        train_causal_lm(target, progress=progress, data_dir=data_dir)
    model, tokenizer = load_pretrained(target)
    metadata = json.loads((target / METADATA_FILE).read_text())
    return CausalLM(model.eval(), tokenizer, target, metadata)
