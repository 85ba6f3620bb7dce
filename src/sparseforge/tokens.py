"""Texts as tokens: one token stream of many texts, and random windows of it for calibration.

Works with any Hugging Face tokenizer (byte-level BPE or BERT WordPiece);
``transformers`` itself is not imported. Where the texts come from (the
fortune files, a user's folder) is :mod:`sparseforge.zoo.text`'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sparseforge.errors import DataError

__all__ = ["calibration_batches", "token_stream"]


def _separator_id(tokenizer: Any) -> int:
    for name in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise DataError(f"{type(tokenizer).__name__} has neither an eos nor a sep token to separate texts with")


def _is_encoder_tokenizer(tokenizer: Any) -> bool:
    """BERT-style: has [CLS] and [SEP] and no end-of-sequence token."""
    return (getattr(tokenizer, "cls_token_id", None) is not None
            and getattr(tokenizer, "sep_token_id", None) is not None
            and getattr(tokenizer, "eos_token_id", None) is None)


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All ``texts`` as one 1-D int64 token tensor: ``[S] t0 [S] t1 [S] ... tn [S]``.

    Each text is encoded alone without special tokens; ``[S]`` is the
    tokenizer's end-of-sequence token, or its ``[SEP]`` when it has none
    (BERT WordPiece). Works with any Hugging Face tokenizer.
    """
    if isinstance(texts, str):
        raise DataError("texts must be a sequence of strings, not one string")
    sep = _separator_id(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    ids = [sep]
    for piece in encoded:
        ids.extend(piece)
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer: Any,
    texts: Sequence[str],
    samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Random token windows of ``texts`` for one-shot pruning calibration, as model-input dicts.

    The rule: ``texts`` become one :func:`token_stream`, cut into
    non-overlapping windows of ``seq_len`` tokens after a random shift of
    less than one window; ``samples`` of those windows are drawn without
    replacement (``torch.Generator`` seeded with ``seed``, so the batches
    depend only on the arguments) and grouped into batches of
    ``batch_size`` (the last one smaller when ``samples`` is not a
    multiple). No window repeats text, so the stream must hold at least
    ``samples * seq_len`` tokens, else a :class:`DataError` says how many
    there are.

    Each batch is ``{"input_ids": LongTensor[b, seq_len]}``. For an encoder
    tokenizer (BERT WordPiece, as MiniLM's: ``[CLS]`` and ``[SEP]``, no
    end-of-sequence token) each window is ``[CLS]``, ``seq_len - 2`` text
    tokens, ``[SEP]``, and the batch also holds ``attention_mask`` (all ones).

    Defaults: 128 samples of 128 tokens in batches of 8, seed 0.
    """
    if samples < 1 or batch_size < 1:
        raise DataError(f"samples and batch_size must be positive, got {samples} and {batch_size}")
    encoder = _is_encoder_tokenizer(tokenizer)
    body = seq_len - 2 if encoder else seq_len
    if body < 1 or seq_len < 2:
        raise DataError(f"seq_len {seq_len} is too short for {type(tokenizer).__name__}")
    stream = token_stream(tokenizer, texts)
    available = stream.numel() // body
    if available < samples:
        raise DataError(
            f"calibration text too short: {len(texts)} texts give {stream.numel()} tokens, but {samples} "
            f"non-overlapping windows of {body} tokens need {samples * body}; pass more texts or fewer samples")
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, stream.numel() - available * body + 1, (1,), generator=gen))
    windows = stream[shift:shift + available * body].view(available, body)
    windows = windows[torch.randperm(available, generator=gen)[:samples]]
    if encoder:
        n = windows.shape[0]
        windows = torch.cat([torch.full((n, 1), int(tokenizer.cls_token_id)), windows,
                             torch.full((n, 1), int(tokenizer.sep_token_id))], dim=1)
    batches = []
    for i in range(0, samples, batch_size):
        input_ids = windows[i:i + batch_size].contiguous()
        batch = {"input_ids": input_ids}
        if encoder:
            batch["attention_mask"] = torch.ones_like(input_ids)
        batches.append(batch)
    return batches
