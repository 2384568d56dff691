"""The training recipes (Hydra scripts); importable as a package only so that tests and benchmarks can reuse
the factories in ``recipes/alm/utils.py``."""
