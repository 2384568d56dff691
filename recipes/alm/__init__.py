"""ALM's recipe: ``alm.py`` (the Hydra script), ``utils.py`` (its factories), ``config.yaml``."""
