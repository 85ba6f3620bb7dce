"""N:M sparse training from scratch: SR-STE and progressive gradient flow (MDGF, SDGF).

Every preset here is a *straight-through* method: the Sparsifier keeps a dense
shadow of each targeted weight, the forward pass sees it through an N:M mask
recomputed from its magnitudes at every update, and the optimizer updates the
dense shadow (see :class:`~sparseforge.updates.Update`). They therefore need
the optimizer: ``Sparsifier(model, method, total_steps, optimizer=opt)``.
N:M groups run along the input dimension, so a layer whose input dimension M
does not divide (a first convolution on 1 or 3 channels) must be left out of
the target, e.g. ``target=Target(exclude=["conv1"])``.
"""

from __future__ import annotations

from collections.abc import Sequence

from sparseforge.errors import SparseforgeError
from sparseforge.method import METHODS, Method
from sparseforge.patterns import NM
from sparseforge.schedules import Constant
from sparseforge.targets import TargetSpec
from sparseforge.updates import MaskDecay, SparseRefinedSTE, StructureDecay


#: The schemes of :func:`ProgressiveNM`.
SCHEMES = ("mdgf-linear", "mdgf-exponential", "sdgf-stepwise", "sdgf-geometric")


def _pattern(n: int, m: int) -> NM:
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)):
        raise SparseforgeError(f"N and M must be integers, got n={n!r}, m={m!r}")
    return NM(n, m)


@METHODS.register("sr-ste")
def SRSTE(n: int = 2, m: int = 4, decay: float = 2e-4, frequency: int = 1, target: TargetSpec = None, *,
          end: int | float = 1.0) -> Method:
    """SR-STE N:M training from scratch ("Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch", Zhou et al., ICLR 2021).

    Rule: every ``frequency`` steps (every step in the paper) the N:M mask E
    keeps the N largest-magnitude dense weights of every M consecutive inputs;
    the forward pass uses ``W * E``; the dense weights are updated with
    ``W <- W - lr * (g(W * E) + decay * (1 - E) * W)``: the straight-through
    gradient plus the sparse-refined term that decays the pruned weights
    (:class:`~sparseforge.updates.SparseRefinedSTE`). Masks are updated from
    step 0 to ``end``; after ``end`` the last mask stays.

    Args:
        n, m: keep N of every M consecutive inputs. Default 2:4.
        decay: lambda_W. Default 2e-4 (the paper's); 0 gives plain STE.
        frequency: steps between mask recomputations. Default 1.
        target: which layers (default every Linear/Conv weight; each needs its
            input dimension divisible by M).
        end: last mask update, a step or a fraction of the run. Default 1.0 (the whole run).

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sp = sf.Sparsifier(model, SRSTE(2, 4), total_steps=3, optimizer=opt)
        >>> for _ in range(3):
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     opt.step(); opt.zero_grad(); sp.step()
        >>> (model.weight != 0).reshape(2, 2, 4).sum(-1).tolist()
        [[2, 2], [2, 2]]
    """
    pattern = _pattern(n, m)
    return Method(
        schedule=Constant(final=pattern.sparsity, start=0, end=end, frequency=frequency),
        score="magnitude",
        pattern=pattern,
        allocation="uniform",
        update=SparseRefinedSTE(decay=decay),
        target=target,
        name=f"sr-ste-{n}:{m}",
    )


def structure_frames(n: int, m: int, scheme: str) -> list[tuple[int, int]]:
    """The (N, M) frames of an SDGF scheme ending at N:M, as in the reference code.

    ``sdgf-stepwise``: ``(M-1):M``, then M halved (``M/2:M``, ``M/4:M``, ...)
    while above N, then ``N:M``. ``sdgf-geometric``: four frames of the same
    density, ``8N:8M, 4N:4M, 2N:2M, N:M``.

    >>> structure_frames(1, 8, "sdgf-stepwise")
    [(7, 8), (4, 8), (2, 8), (1, 8)]
    >>> structure_frames(1, 8, "sdgf-geometric")
    [(8, 64), (4, 32), (2, 16), (1, 8)]
    """
    if scheme == "sdgf-geometric":
        return [(n * 2**k, m * 2**k) for k in (3, 2, 1, 0)]
    if scheme != "sdgf-stepwise":
        raise SparseforgeError(f"unknown structure-decay scheme {scheme!r}; use sdgf-stepwise or sdgf-geometric")
    frames = [(m - 1, m)] if m - 1 > n else []
    k = m // 2
    while k > n:
        if not frames or k < frames[-1][0]:
            frames.append((k, m))
        k //= 2
    frames.append((n, m))
    return frames


@METHODS.register("progressive-nm")
def ProgressiveNM(n: int = 1, m: int = 8, scheme: str = "mdgf-exponential", *, rate: float | None = None,
                  scale_grad: bool = False, frames: Sequence[tuple[int, int]] | None = None,
                  decay: float = 0.0, start: int | float = 0, end: int | float = 1.0, fine_tune: float = 0.0,
                  frequency: int = 1, target: TargetSpec = None) -> Method:
    """Progressive gradient flow for N:M training ("Progressive Gradient Flow for Robust
    N:M Sparsity Training in Transformers", Bambhaniya et al., 2024).

    Rule: dense training until ``start`` (the paper's dense phase; 0 by
    default, as in its configurations), then straight-through N:M training
    whose mask is recomputed from the dense weights every ``frequency`` steps,
    with the gradient flow to the pruned weights restricted progressively:

    - ``mdgf-exponential`` / ``mdgf-linear`` (mask decay): the forward pass
      uses ``W * (E + beta (1 - E))`` with ``beta = exp(-rate p)`` or
      ``max(0, 1 - rate p)`` at progress p from ``start`` (0) to ``end`` (1);
      ``rate`` defaults to 20 (exponential) and 4 (linear). See
      :class:`~sparseforge.updates.MaskDecay`, also for ``scale_grad``.
    - ``sdgf-stepwise`` / ``sdgf-geometric`` (structure decay): binary masks
      whose N:M tightens in equal parts of the sparse phase: 7:8, 4:8, 2:8, 1:8
      (stepwise, for 1:8) or 8:64, 4:32, 2:16, 1:8 (geometric); ``frames``
      overrides them (:class:`~sparseforge.updates.StructureDecay`).

    In every scheme the last ``fine_tune`` fraction of the sparse phase trains
    with the final binary N:M mask, and ``finalize`` leaves exact N:M zeros.

    Args:
        n, m: the final N:M. Default 1:8 (87.5% sparse, where the paper's gains are).
        scheme: one of ``mdgf-exponential`` (default, the paper's best),
            ``mdgf-linear``, ``sdgf-stepwise``, ``sdgf-geometric``.
        rate: MDGF's decay per unit of progress (None: 20 exponential, 4 linear).
        scale_grad: MDGF: scale the pruned weights' gradient by beta too. Default False
            (the reference code passes it straight through).
        frames: SDGF: the (N, M) frames, loosest first (default: the scheme's).
        decay: SR-STE's lambda_W on the pruned weights. Default 0 (as in the paper).
        start: end of the dense phase, a step or a fraction of the run. Default 0.
        end: last mask update, a step or a fraction of the run. Default 1.0.
        fine_tune: last fraction of the sparse phase with the final binary mask. Default 0.
        frequency: steps between mask recomputations. Default 1 (every step, as in the paper).
        target: which layers (each needs its input dimension divisible by every M used).

    Example:
        >>> method = ProgressiveNM(1, 8, "sdgf-stepwise")
        >>> str(method.pattern), str(method.update)
        ('1:8', 'structure-decay(7:8->4:8->2:8->1:8)')
    """
    pattern = _pattern(n, m)
    key = str(scheme).strip().lower().replace("_", "-")
    if key not in SCHEMES:
        raise SparseforgeError(f"unknown progressive scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if key.startswith("mdgf"):
        if frames is not None:
            raise SparseforgeError(f"frames apply to the sdgf schemes, not {key}")
        update = MaskDecay(curve=key.split("-")[1], rate=rate, scale_grad=scale_grad, fine_tune=fine_tune,
                           decay=decay)
    else:
        if rate is not None or scale_grad:
            raise SparseforgeError(f"rate and scale_grad apply to the mdgf schemes, not {key}")
        chosen = list(frames) if frames is not None else structure_frames(n, m, key)
        if chosen and tuple(chosen[-1]) != (n, m):
            raise SparseforgeError(f"the last frame must be the target {n}:{m}, got {chosen[-1]}")
        update = StructureDecay(frames=chosen, fine_tune=fine_tune, decay=decay)
    return Method(
        schedule=Constant(final=pattern.sparsity, start=start, end=end, frequency=frequency),
        score="magnitude",
        pattern=pattern,
        allocation="uniform",
        update=update,
        target=target,
        name=f"{key}-{n}:{m}",
    )
