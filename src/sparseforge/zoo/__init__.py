"""Datasets, reference models and a training loop for demos, tests and benchmarks.

- :mod:`~sparseforge.zoo.data`: Fashion-MNIST from the standard IDX gzip files,
  verified, plus :class:`TensorLoader`, a fast in-memory batch iterator.
- :mod:`~sparseforge.zoo.models`: LeNet-300-100, Conv-4 and ResNet-20 for
  28x28 inputs, and :func:`build_model` by name.
- :mod:`~sparseforge.zoo.training`: :func:`train_epoch` and :func:`evaluate`.
- :mod:`~sparseforge.zoo.superres`: x2 super-resolution on the natural images
  of ``skimage.data`` (split by image), :class:`ESPCN`, PSNR.
- :mod:`~sparseforge.zoo.text`: English texts from Debian's ``fortunes``,
  split by hash into calibration and evaluation sets; topic-labelled entries
  (:func:`~sparseforge.zoo.text.labelled_fortunes`) and token windows for
  calibration with any Hugging Face tokenizer.
- :mod:`~sparseforge.zoo.minilm`: the pretrained all-MiniLM-L6-v2 sentence
  encoder, offline (the ``hf`` extra), and sentence embeddings.
- :mod:`~sparseforge.zoo.causal_lm`: a small LLaMA-style causal language
  model (3.4M parameters, byte-level BPE) trained on the fortunes and cached
  on first use, and :func:`~sparseforge.zoo.causal_lm.perplexity`.
"""

from __future__ import annotations

from sparseforge.zoo.data import (
    DATA_ENV_VAR,
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_SHA256,
    FASHION_MNIST_STD,
    TensorLoader,
    fashion_mnist,
    load_fashion_mnist,
    resolve_data_dir,
    write_idx_gz,
)
from sparseforge.zoo.models import BasicBlock, Conv4, LeNet300100, ResNet20, build_model, classifier_names
from sparseforge.zoo.superres import (
    ESPCN,
    PatchSampler,
    SRData,
    bicubic_psnr,
    evaluate_sr,
    superres_data,
    train_sr,
)
from sparseforge.zoo.training import evaluate, train_epoch

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_DATA_DIR",
    "ESPCN",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_STD",
    "PatchSampler",
    "SRData",
    "BasicBlock",
    "Conv4",
    "LeNet300100",
    "ResNet20",
    "TensorLoader",
    "bicubic_psnr",
    "build_model",
    "classifier_names",
    "evaluate",
    "evaluate_sr",
    "fashion_mnist",
    "load_fashion_mnist",
    "resolve_data_dir",
    "superres_data",
    "train_epoch",
    "train_sr",
    "write_idx_gz",
]
