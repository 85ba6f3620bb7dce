"""The torch.distributed collectives a Sparsifier runs itself, and DDP's list of buffers to leave alone.

Below the :class:`~sparseforge.Sparsifier` (which calls them when
``sync_masks`` is on) and :mod:`sparseforge.distributed` (whose public
:func:`~sparseforge.distributed.broadcast_masks` and
:func:`~sparseforge.distributed.check_masks_identical` build on them); they
know tensors and layer names, not the Sparsifier. Why masks are broadcast
and excluded from DDP's own buffer broadcast: see
:mod:`sparseforge.distributed.masks`. Every collective must be called by
every rank of ``group`` (default: the whole world).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from sparseforge.errors import SparseforgeError

__all__ = [
    "average_", "broadcast_masks_", "exclude_from_ddp_sync", "global_ranks", "is_distributed", "reject_wrapper",
    "restore_ddp_sync", "sync_enabled",
]

#: Module attribute that ``torch.nn.parallel.DistributedDataParallel`` reads at
#: construction: fully qualified names of parameters and buffers it must neither
#: broadcast nor cast (see ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``).
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether torch.distributed is initialised with more than one rank (in ``group``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def sync_enabled(sync_masks: bool | None) -> bool:
    """Whether a Sparsifier with this ``sync_masks`` setting broadcasts its masks now.

    ``None`` (auto) syncs when torch.distributed is initialised with more than
    one rank; ``True`` insists on it (an error when torch.distributed is not
    initialised, a no-op with one rank); ``False`` never syncs.
    """
    if sync_masks is None:
        return is_distributed()
    if not sync_masks:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise SparseforgeError(
            "sync_masks=True needs torch.distributed: call torch.distributed.init_process_group() "
            "before the Sparsifier's first mask update, or pass sync_masks=None (auto)"
        )
    return dist.get_world_size() > 1


@torch.no_grad()
def broadcast_masks_(
    masks: Sequence[torch.Tensor], names: Sequence[str], step: int, src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Overwrite ``masks`` (buffers, in place) with rank ``src``'s, after checking that every rank holds
    the same layers (``names`` and the masks' shapes) at the same ``step``; weights are not touched."""
    _check_same_layout(masks, names, step, group)
    device = _comm_device(group, masks[0])
    flat = torch.cat([m.detach().reshape(-1).to(device=device, dtype=torch.uint8) for m in masks])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for m in masks:
        n = m.numel()
        m.copy_(flat[offset:offset + n].view(m.shape))
        offset += n


@torch.no_grad()
def average_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace each tensor by its mean over the ranks, in place (one all-reduce per dtype)."""
    if not tensors or not is_distributed(group):
        return
    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, ts in by_dtype.items():
        device = _comm_device(group, ts[0])
        flat = torch.cat([t.reshape(-1).to(device) for t in ts])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view(t.shape))
            offset += n


def exclude_from_ddp_sync(model: nn.Module, names: Iterable[str]) -> None:
    """Tell a DistributedDataParallel built later around ``model`` to leave these buffers alone.

    DDP reads the list when it is constructed, so this only affects wrappers
    built after the call. The names are qualified relative to ``model``.
    """
    names = list(names)
    existing = list(getattr(model, _DDP_IGNORE, []))
    setattr(model, _DDP_IGNORE, existing + [n for n in names if n not in existing])
    buffers = dict(model.named_buffers())
    for n in names:
        if n in buffers:
            # Also what DDP's own helper does: keeps mixed-precision DDP from casting the masks.
            buffers[n]._ddp_ignored = True


def restore_ddp_sync(model: nn.Module, names: Iterable[str]) -> None:
    """Undo :func:`exclude_from_ddp_sync` for ``names`` (removing the attribute when nothing is left)."""
    if not hasattr(model, _DDP_IGNORE):
        return
    drop = set(names)
    kept = [n for n in getattr(model, _DDP_IGNORE) if n not in drop]
    if kept:
        setattr(model, _DDP_IGNORE, kept)
    else:
        delattr(model, _DDP_IGNORE)


def reject_wrapper(model: nn.Module) -> None:
    """Raise when ``model`` is a (Distributed)DataParallel wrapper instead of the module it wraps."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise SparseforgeError(
            f"attach the Sparsifier to the inner module, before wrapping it in {type(model).__name__}: "
            "sparsifier = Sparsifier(model, method, total_steps, optimizer=optimizer); "
            "ddp_model = DistributedDataParallel(model). On the wrapper, layer names would start with "
            "'module.' (checkpoints would not load into the plain model) and DDP would broadcast "
            "every mask before every forward"
        )


def global_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` (default: the whole world), in group order."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def _comm_device(group: dist.ProcessGroup | None, like: torch.Tensor) -> torch.device:
    """Where a collective's buffer must live: CUDA for NCCL, else the CPU (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout_hash(masks: Sequence[torch.Tensor], names: Sequence[str]) -> int:
    text = ";".join(f"{name}:{tuple(m.shape)}" for name, m in zip(names, masks))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def _check_same_layout(
    masks: Sequence[torch.Tensor], names: Sequence[str], step: int, group: dist.ProcessGroup | None
) -> None:
    """All ranks hold the same layers and are at the same step, or all raise the same error.

    Without this, ranks with different layers (not data parallelism) would
    broadcast buffers of different sizes: an obscure backend error or a hang.
    """
    world = dist.get_world_size(group)
    mine = torch.tensor([_layout_hash(masks, names), step], dtype=torch.int64,
                        device=_comm_device(group, masks[0]))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    ranks = global_ranks(group)
    layouts = [int(t[0]) for t in every]
    steps = [int(t[1]) for t in every]
    if len(set(layouts)) > 1:
        differ = [r for r, h in zip(ranks, layouts) if h != layouts[0]]
        raise SparseforgeError(
            f"rank(s) {differ} sparsify other layers (names or shapes) than rank {ranks[0]}: mask sync "
            "assumes data parallelism, every rank holding the same model; pass sync_masks=False otherwise"
        )
    if len(set(steps)) > 1:
        raise SparseforgeError(
            f"the ranks update their masks at different steps ({dict(zip(ranks, steps))}): "
            "call sparsifier.step() once per optimizer step on every rank"
        )
