"""How good a model is: a classifier's loss and accuracy, a causal LM's perplexity, an encoder's embeddings.

What ``sparseforge prune`` and ``quantize`` report before and after, and what
the benchmarks measure: :func:`evaluate` (mean cross-entropy and accuracy of a
classifier over a loader), :func:`perplexity` (next-token negative
log-likelihood over fixed windows of one token stream),
:func:`sentence_embeddings` (the mean pooling of sentence-transformers) and
:func:`quality`, which picks one by the model's kind. Works on any
``transformers`` model (``transformers`` itself is not imported here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.layers import is_hf_model
from sparseforge.tokens import token_stream

__all__ = ["Quality", "evaluate", "is_causal_lm", "perplexity", "quality", "sentence_embeddings"]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (a ``...ForCausalLM`` or ``...LMHeadModel`` class)."""
    name = type(model).__name__
    return is_hf_model(model) and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel"))


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer: Any, texts: list[str] | tuple[str, ...], batch_size: int = 32, max_length: int = 256,
) -> torch.Tensor:
    """L2-normalised, attention-mask-weighted mean of an encoder's last hidden states, one row per text.

    The pooling of sentence-transformers models such as all-MiniLM-L6-v2
    (measured: cosine 1.0000 to sentence-transformers' own encoding).
    Sequences are truncated at ``max_length`` (default 256) tokens.
    """
    out = []
    texts = list(texts)
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer_or_tokens: Any,
    texts: Sequence[str] | None = None,
    seq_len: int = 128,
    max_windows: int | None = None,
    batch_size: int = 16,
) -> float:
    """Perplexity of a causal LM on text: ``exp`` of the mean next-token negative log-likelihood.

    The rule: the text is one token stream (a 1-D token tensor given as
    ``tokenizer_or_tokens``, or ``texts`` joined by
    :func:`~sparseforge.tokens.token_stream` with the given tokenizer), cut
    from its start into non-overlapping windows of ``seq_len`` tokens (the
    tail shorter than a window is dropped; only the first ``max_windows``
    when given). Each window is scored alone: its first token is context
    only, so every window contributes ``seq_len - 1`` predictions, and the
    mean is over all of them (for one window: the ``loss`` a Hugging Face
    causal LM returns with ``labels=input_ids``). Deterministic; the model's
    train/eval mode is restored afterwards.

    Defaults: windows of 128 tokens, all of them, scored 16 at a time.

    >>> from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model
    >>> model = build_model(TINY_CONFIG)  # untrained: close to uniform over its 320 tokens
    >>> 300 < perplexity(model, torch.arange(256) % 320, seq_len=64) < 340
    True
    """
    if isinstance(tokenizer_or_tokens, torch.Tensor):
        if texts is not None:
            raise DataError("pass either a token tensor or a tokenizer with texts, not both")
        tokens = tokenizer_or_tokens.reshape(-1).long()
    else:
        if texts is None:
            raise DataError("perplexity with a tokenizer needs the texts to score")
        tokens = token_stream(tokenizer_or_tokens, texts)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    n_windows = tokens.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise DataError(f"text of {tokens.numel()} tokens is shorter than one window of {seq_len}")
    windows = tokens[:n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, n_windows, batch_size):
            x = windows[i:i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                              x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


@dataclass
class Quality:
    """A transformers model's quality on held-out texts: perplexity (causal LM) or embedding fidelity (encoder)."""

    texts: int
    perplexity: float | None = None
    mean_cosine: float | None = None
    min_cosine: float | None = None
    embeddings: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("texts", self.texts), ("perplexity", self.perplexity),
                                  ("mean_cosine", self.mean_cosine), ("min_cosine", self.min_cosine)) if v is not None}


def quality(
    model: nn.Module, tokenizer: Any, texts: list[str], seq_len: int = 128, reference: Quality | None = None,
    max_windows: int = 64,
) -> Quality:
    """Measure ``model`` on held-out ``texts``.

    A causal LM (:func:`is_causal_lm`): perplexity over the texts joined into
    one token stream, in windows of ``seq_len`` tokens (at most
    ``max_windows``, default 64). Any other model: its
    :func:`sentence_embeddings`, and, given the dense model's ``reference``,
    the mean and minimum cosine similarity to the reference embeddings.
    """
    if is_causal_lm(model):
        return Quality(len(texts), perplexity=perplexity(model, tokenizer, texts, seq_len, max_windows=max_windows))
    emb = sentence_embeddings(model, tokenizer, texts)
    q = Quality(len(texts), embeddings=emb)
    if reference is not None and reference.embeddings is not None:
        cos = (emb * reference.embeddings).sum(-1)
        q.mean_cosine, q.min_cosine = float(cos.mean()), float(cos.min())
    return q


def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Measure mean cross-entropy and accuracy of a classifier.

    Runs under ``torch.no_grad()`` with the model in eval mode (so BatchNorm
    uses its running statistics); the previous train/eval mode is restored
    afterwards.

    Args:
        model: maps a batch of inputs to logits ``[B, C]``.
        loader: iterable of ``(inputs, int64 targets)`` batches, e.g. a
            :class:`~sparseforge.zoo.data.TensorLoader`.

    Returns:
        ``{"loss": mean cross-entropy per example, "accuracy": percent correct,
        "examples": number of examples}``.

    Raises:
        SparseforgeError: the loader yielded no examples.

    >>> model = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    >>> evaluate(model, [(x, y)])["accuracy"]
    50.0
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    # Sums stay on the device so that a GPU run does not synchronize per batch.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for xb, yb in loader:
                xb = xb.to(device, non_blocking=True)
                yb = yb.to(device, non_blocking=True)
                logits = model(xb)
                total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(dim=1) == yb).sum()
                count += int(yb.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise SparseforgeError("cannot evaluate: the loader yielded no examples")
    return {
        "loss": total_loss.item() / count,
        "accuracy": 100.0 * correct.item() / count,
        "examples": count,
    }
