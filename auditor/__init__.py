"""clip-audit: find, show and repair backdoors in CLIP checkpoints."""

__version__ = "0.1.0"
