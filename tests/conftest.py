"""Shared fixtures for the sparsity-core tests: small seeded models and data.

The models are tiny on purpose: the invariants under test (exact zeros, exact
counts, identical resumes) do not depend on size, and the whole suite has to
stay fast on a two-core machine.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from sparseforge.zoo.data import TensorLoader


def build_mlp(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """A 16-32-32-4 MLP (Linear layers "0", "2", "5"), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, 4),
    )


def build_convnet(seed: int = 0) -> nn.Sequential:
    """A small conv net for [B, 3, 8, 8] inputs (Conv2d "0", "2"; Linear "5"), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )


def random_loader(input_shape: tuple[int, ...], n: int = 64, batch_size: int = 16, seed: int = 0) -> TensorLoader:
    """Random inputs with 4 classes, as (inputs, int64 targets) batches."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorLoader(x, y, batch_size=batch_size)


@pytest.fixture
def mlp() -> Callable[..., nn.Sequential]:
    return build_mlp


@pytest.fixture
def convnet() -> Callable[..., nn.Sequential]:
    return build_convnet


@pytest.fixture
def loader() -> Callable[..., TensorLoader]:
    return random_loader


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test: these models are far too small to gain from
    more, and on a busy two-core machine a contended thread pool makes tiny ops many
    times slower (seen: 0.3 s -> 16 s for 200 Adam steps on the conv net)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernel_isas() -> list[str]:
    from sparseforge.kernels.native import native

    m = native()
    names = ["scalar", "avx2", "avx512", "avx512bf16"]
    return names[: names.index(m.best_isa()) + 1] if m is not None else ["fallback"]


@pytest.fixture(params=_kernel_isas())
def isa(request):
    """Each instruction set this CPU has, forced in turn (the native kernels dispatch at run time; forcing a
    lower one runs its code here); ``"fallback"`` when the kernels are not built."""
    from sparseforge.kernels.native import native

    m = native()
    if m is None:
        yield "fallback"
        return
    before = m.isa()
    m.set_isa(request.param)
    try:
        yield request.param
    finally:
        m.set_isa(before)
