"""Training the acceptance head with Lightning: the module, its validation metrics, its callbacks."""

from .module import AcceptanceHeadModule

__all__ = ["AcceptanceHeadModule"]
