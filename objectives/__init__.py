"""ALM's loss, importable as ``alm_torchrl.objectives`` (this folder is mapped into the package)."""
from .alm import ALMLoss

__all__ = ["ALMLoss"]
