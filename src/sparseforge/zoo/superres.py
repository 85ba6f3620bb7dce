"""Single-image super-resolution on natural images that ship with scikit-image.

A small benchmark for sparsity on a regression task, built from data that
needs no download:

- Images: the natural photographs in ``skimage.data`` (scikit-image, in the
  ``bench`` extra: ``pip install 'sparseforge[bench]'``), converted to luminance (BT.601 luma
  ``Y = 0.299 R + 0.587 G + 0.114 B``) in [0, 1], as super-resolution papers
  evaluate on the Y channel. They are split *by image* into
  :data:`TRAIN_IMAGES` and :data:`TEST_IMAGES`, so no held-out pixel is ever
  seen in training (``cat`` is left out: it is the same photograph as
  ``chelsea``).
- Degradation: the low-resolution (LR) image is the high-resolution (HR) one,
  cropped to a multiple of ``scale``, downscaled with antialiased bicubic
  interpolation (:func:`downscale`), the usual "bicubic" SR setting.
- Training: random aligned HR/LR patch pairs cut from the whole training
  images, with random flips and transposes (:class:`PatchSampler`).
- Model: :class:`ESPCN` ("Real-Time Single Image and Video Super-Resolution
  Using an Efficient Sub-Pixel Convolutional Neural Network", Shi et al.,
  CVPR 2016): conv 5x5 (64) -> tanh -> conv 3x3 (32) -> tanh -> conv 3x3
  (scale^2) -> pixel shuffle, on the LR luminance.
- Metric: PSNR in dB on the held-out images, ``10 log10(1 / MSE)`` with a
  border of ``scale`` pixels cropped (:func:`psnr`, :func:`evaluate_sr`),
  averaged over images; :func:`bicubic_psnr` is the no-learning reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.extras import require
from sparseforge.training import Callback, FitState, LambdaCallback, fit

__all__ = [
    "ESPCN",
    "PatchSampler",
    "SRData",
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "bicubic_psnr",
    "downscale",
    "evaluate_sr",
    "load_luminance",
    "luminance",
    "psnr",
    "superres_data",
    "train_sr",
    "upscale_bicubic",
]

TRAIN_IMAGES: tuple[str, ...] = (
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "brick",
    "grass",
    "gravel",
    "moon",
    "cell",
    "clock",
    "page",
)
"""``skimage.data`` images used for training (all shipped with the wheel, no download)."""

TEST_IMAGES: tuple[str, ...] = ("camera", "astronaut", "chelsea", "coins")
"""``skimage.data`` images held out for evaluation (never cut into training patches)."""


def luminance(image: np.ndarray) -> torch.Tensor:
    """An image as a float32 ``[H, W]`` luminance tensor in [0, 1].

    Integer images are divided by their dtype's maximum, booleans become 0/1,
    floats are clipped to [0, 1]; RGB(A) images become BT.601 luma
    ``0.299 R + 0.587 G + 0.114 B`` (alpha ignored).

    >>> luminance(np.full((2, 2, 3), 255, dtype=np.uint8)).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    a = np.asarray(image)
    if a.dtype == np.bool_:
        x = a.astype(np.float64)
    elif np.issubdtype(a.dtype, np.integer):
        x = a.astype(np.float64) / float(np.iinfo(a.dtype).max)
    elif np.issubdtype(a.dtype, np.floating):
        x = np.clip(a.astype(np.float64), 0.0, 1.0)
    else:
        raise SparseforgeError(f"cannot read an image of dtype {a.dtype}; give an integer, bool or float array")
    if x.ndim == 3 and x.shape[2] in (3, 4):
        x = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    elif x.ndim != 2:
        raise SparseforgeError(f"an image must be [H, W] or [H, W, 3|4], got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)


def load_luminance(name: str) -> torch.Tensor:
    """The ``skimage.data`` image ``name`` as luminance in [0, 1] (see :func:`luminance`)."""
    skimage_data = require("skimage.data", "the super-resolution images (skimage.data)")
    loader = getattr(skimage_data, name, None)
    if loader is None or not callable(loader):
        raise SparseforgeError(f"skimage.data has no image {name!r}; use e.g. one of {', '.join(TRAIN_IMAGES)}")
    try:
        image = loader()
    except Exception as e:  # some images need an optional download (pooch)
        raise SparseforgeError(
            f"skimage.data.{name}() failed ({type(e).__name__}: {e}); use an image shipped with "
            f"scikit-image, e.g. one of {', '.join(TRAIN_IMAGES + TEST_IMAGES)}"
        ) from e
    return luminance(image)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise SparseforgeError(f"scale must be an integer >= 2, got {scale!r}")
    return scale


def _crop_to_multiple(hr: torch.Tensor, scale: int) -> torch.Tensor:
    h, w = hr.shape[-2:]
    if h < scale or w < scale:
        raise SparseforgeError(f"image of size {h}x{w} is smaller than the scale {scale}")
    return hr[..., : h - h % scale, : w - w % scale]


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic downscale by ``scale`` with antialiasing, clamped to [0, 1].

    ``hr`` is ``[H, W]``, ``[C, H, W]`` or ``[N, C, H, W]`` with H and W multiples
    of ``scale``; the result has the same number of dimensions.

    >>> downscale(torch.ones(4, 6), 2).shape
    torch.Size([2, 3])
    """
    _check_scale(scale)
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise SparseforgeError(f"image size {h}x{w} is not a multiple of the scale {scale}; crop it first")
    x = hr.reshape(-1, 1, h, w)
    lr = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp_(0.0, 1.0).reshape(*hr.shape[:-2], h // scale, w // scale)


def upscale_bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upscale by ``scale`` (``[N, C, h, w]``), clamped to [0, 1]: the classic baseline."""
    _check_scale(scale)
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0.0, 1.0)


def psnr(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB of ``sr`` against ``hr`` (values in [0, 1]).

    ``border`` pixels are cropped on every side first (SR convention: the scale).

    >>> round(psnr(torch.full((1, 1, 4, 4), 0.5), torch.full((1, 1, 4, 4), 0.6)), 2)
    20.0
    """
    if sr.shape != hr.shape:
        raise SparseforgeError(f"psnr needs equal shapes, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if border:
        sr = sr[..., border:-border, border:-border]
        hr = hr[..., border:-border, border:-border]
    mse = float(torch.mean((sr.double() - hr.double()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


class ESPCN(nn.Module):
    """ESPCN: a three-layer sub-pixel convolutional network for x``scale`` super-resolution.

    ("Real-Time Single Image and Video Super-Resolution Using an Efficient
    Sub-Pixel Convolutional Neural Network", Shi et al., CVPR 2016.)
    ``conv1`` 5x5 (1 -> ``features[0]``), tanh, ``conv2`` 3x3 (-> ``features[1]``),
    tanh, ``conv3`` 3x3 (-> scale^2), then a pixel shuffle to the HR grid; the
    input is the LR luminance ``[B, 1, h, w]``, the output ``[B, 1, h*scale, w*scale]``.

    Args:
        scale: upscaling factor. Default 2.
        features: widths of the two hidden layers. Default (64, 32), as in the paper.

    >>> ESPCN(2)(torch.zeros(1, 1, 8, 8)).shape
    torch.Size([1, 1, 16, 16])
    >>> sum(p.numel() for p in ESPCN(2).parameters())
    21284
    """

    def __init__(self, scale: int = 2, features: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.scale = _check_scale(scale)
        f1, f2 = (int(f) for f in features)
        if f1 < 1 or f2 < 1:
            raise SparseforgeError(f"features must be two positive widths, got {tuple(features)}")
        self.conv1 = nn.Conv2d(1, f1, 5, padding=2)
        self.conv2 = nn.Conv2d(f1, f2, 3, padding=1)
        self.conv3 = nn.Conv2d(f2, scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the super-resolved luminance for an LR batch ``[B, 1, h, w]``."""
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.shuffle(self.conv3(x))


class PatchSampler:
    """Random aligned (LR, HR) training patch pairs cut from whole images.

    Each HR image is cropped to a multiple of ``scale`` and downscaled once as
    a whole (:func:`downscale`), so patches see the same degradation as the
    test images. A batch picks, for each example, an image uniformly, an LR
    position uniformly, the matching HR patch, and one of the 8 flips and
    transposes, all from the sampler's own generator seeded with ``seed``.

    Args:
        images: HR luminance images ``[H, W]`` in [0, 1].
        scale: upscaling factor. Default 2.
        patch_size: HR patch side, a multiple of ``scale``. Default 64.
        batch_size: patches per batch. Default 16.
        seed: seed of the sampling. Default 0.
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        scale: int = 2,
        patch_size: int = 64,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        _check_scale(scale)
        if patch_size < scale or patch_size % scale:
            raise SparseforgeError(f"patch_size must be a positive multiple of the scale {scale}, got {patch_size}")
        if batch_size < 1:
            raise SparseforgeError(f"batch_size must be positive, got {batch_size}")
        if not images:
            raise SparseforgeError("PatchSampler needs at least one training image")
        self.scale, self.patch_size, self.batch_size = scale, patch_size, batch_size
        self.hr = [_crop_to_multiple(img, scale) for img in images]
        for img in self.hr:
            if min(img.shape[-2:]) < patch_size:
                raise SparseforgeError(f"an image of size {tuple(img.shape)} is smaller than patch_size {patch_size}")
        self.lr = [downscale(img, scale) for img in self.hr]
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: LR ``[B, 1, p/s, p/s]`` and HR ``[B, 1, p, p]``."""
        s, p = self.scale, self.patch_size // self.scale
        g = self.generator
        lrs, hrs = [], []
        for _ in range(self.batch_size):
            k = int(torch.randint(len(self.hr), (1,), generator=g))
            lr, hr = self.lr[k], self.hr[k]
            i = int(torch.randint(lr.shape[0] - p + 1, (1,), generator=g))
            j = int(torch.randint(lr.shape[1] - p + 1, (1,), generator=g))
            a, b = lr[i : i + p, j : j + p], hr[i * s : (i + p) * s, j * s : (j + p) * s]
            t = int(torch.randint(8, (1,), generator=g))
            if t & 1:
                a, b = a.flip(-1), b.flip(-1)
            if t & 2:
                a, b = a.flip(-2), b.flip(-2)
            if t & 4:
                a, b = a.transpose(-1, -2), b.transpose(-1, -2)
            lrs.append(a)
            hrs.append(b)
        return torch.stack(lrs).unsqueeze(1).contiguous(), torch.stack(hrs).unsqueeze(1).contiguous()

    def reseed(self, seed: int) -> None:
        """Restart the batch sequence from ``seed`` (a new run on the same images)."""
        self.generator.manual_seed(int(seed))

    def state_dict(self) -> dict[str, Any]:
        """The generator state: enough to continue the same batch sequence."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class SRData:
    """Training sampler and held-out (LR, HR) image pairs for one scale (see :func:`superres_data`)."""

    def __init__(self, sampler: PatchSampler, test: list[tuple[str, torch.Tensor, torch.Tensor]], scale: int) -> None:
        self.sampler = sampler
        self.test = test
        self.scale = scale


def superres_data(
    scale: int = 2,
    patch_size: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    train_images: Sequence[str] = TRAIN_IMAGES,
    test_images: Sequence[str] = TEST_IMAGES,
) -> SRData:
    """Load the images, split by image, and build the patch sampler and the test pairs.

    Args:
        scale: upscaling factor. Default 2.
        patch_size: HR training patch side. Default 64.
        batch_size: training patches per batch. Default 16.
        seed: seed of the patch sampling. Default 0.
        train_images, test_images: ``skimage.data`` names. Defaults
            :data:`TRAIN_IMAGES`, :data:`TEST_IMAGES`; they must not overlap.

    Returns an :class:`SRData` whose ``test`` holds ``(name, lr [1,1,h,w], hr [1,1,H,W])``.
    """
    _check_scale(scale)
    overlap = sorted(set(train_images) & set(test_images))
    if overlap:
        raise SparseforgeError(f"training and held-out images must differ, both have {overlap}")
    sampler = PatchSampler([load_luminance(n) for n in train_images], scale, patch_size, batch_size, seed)
    test = []
    for name in test_images:
        hr = _crop_to_multiple(load_luminance(name), scale)[None, None]
        test.append((name, downscale(hr, scale), hr))
    return SRData(sampler, test, scale)


def evaluate_sr(model: nn.Module, test: Sequence[tuple[str, torch.Tensor, torch.Tensor]], scale: int) -> dict[str, Any]:
    """PSNR (dB, border ``scale``) of ``model`` on each held-out image and their mean.

    The output is clamped to [0, 1] before measuring, as an image would be saved.
    """
    was_training = model.training
    model.eval()
    per_image = {}
    try:
        with torch.no_grad():
            for name, lr, hr in test:
                per_image[name] = psnr(model(lr).clamp(0.0, 1.0), hr, border=scale)
    finally:
        model.train(was_training)
    return {"psnr": float(np.mean(list(per_image.values()))), "per_image": per_image}


def bicubic_psnr(test: Sequence[tuple[str, torch.Tensor, torch.Tensor]], scale: int) -> dict[str, Any]:
    """The same measurement for plain bicubic upscaling (no learning): the reference floor."""
    per_image = {name: psnr(upscale_bicubic(lr, scale), hr, border=scale) for name, lr, hr in test}
    return {"psnr": float(np.mean(list(per_image.values()))), "per_image": per_image}


def train_sr(
    model: nn.Module,
    sampler: PatchSampler,
    optimizer: torch.optim.Optimizer,
    steps: int,
    on_step: Callable[[], None] | None = None,
    loss: str = "l1",
    scheduler: Any = None,
    callbacks: Sequence[Callback] = (),
) -> float:
    """Train ``model`` for ``steps`` batches of ``sampler`` with :func:`sparseforge.fit`; return the mean loss of the last 100.

    Each step: zero grads, forward, ``loss`` (``l1``, as SR papers train, or
    ``mse``), backward, ``optimizer.step()``, ``scheduler.step()``, then the
    ``callbacks`` (e.g. a :class:`~sparseforge.training.SparsifierCallback`) and ``on_step()``.
    """
    if loss not in ("l1", "mse"):
        raise SparseforgeError(f"loss must be 'l1' or 'mse', got {loss!r}")
    fn = F.l1_loss if loss == "l1" else F.mse_loss
    recent: list[float] = []

    def after_step(state: FitState) -> None:
        if on_step is not None:
            on_step()
        recent.append(float(state.loss.detach()))
        if len(recent) > 100:
            recent.pop(0)

    patches = iter(sampler.sample, None)  # endless: sample() never returns None
    fit(model, patches, optimizer, fn, steps=int(steps), scheduler=scheduler,
        callbacks=[*callbacks, LambdaCallback(on_step_end=after_step)])
    return float(np.mean(recent)) if recent else math.nan
