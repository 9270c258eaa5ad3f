"""A researcher's own pieces for difflab, kept outside it: each is one file here plus one config in ``configs/``."""
