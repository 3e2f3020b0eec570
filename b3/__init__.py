"""B3: smart batch mining for contrastive embedding training."""

__version__ = "0.1.0"
