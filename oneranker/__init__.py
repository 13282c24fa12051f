"""OneRanker Stream: streaming online learning for generative ad recommendation."""

__version__ = "0.1.0"
