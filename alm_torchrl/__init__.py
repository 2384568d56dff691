"""Aligned Latent Models (ALM, Ghugare et al., ICLR 2023) on TorchRL."""
from alm_torchrl.modules import ALMModules, make_alm_modules

__all__ = ["ALMModules", "make_alm_modules"]
