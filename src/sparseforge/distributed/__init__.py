"""sparseforge under torch.distributed.

- :mod:`~sparseforge.distributed.masks`: identical masks on every rank under
  DDP: :func:`mask_digest`, :func:`check_masks_identical`,
  :func:`broadcast_masks` (a :class:`~sparseforge.Sparsifier` syncs its masks
  by itself after every update; see its ``sync_masks`` argument).
"""

from sparseforge.distributed.masks import broadcast_masks, check_masks_identical, mask_digest

__all__ = ["broadcast_masks", "check_masks_identical", "mask_digest"]
