"""OneRanker model family: config, Step 1 backbone, Step 2 generator, Step 3 ranker, baselines."""

from trainer.model.config import OneRankerConfig, preset

__all__ = ["OneRankerConfig", "preset"]
