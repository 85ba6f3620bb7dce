"""One-shot pruning: prune a trained model once, without retraining."""

from sparseforge.oneshot.prune import prune

__all__ = ["prune"]
