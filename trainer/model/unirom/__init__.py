"""UniROM ("One Model to Rank Them All"), the project's second model family. See README.md."""

from trainer.model.unirom.aucformer import Evaluator, Generator, PaymentNet, greedy_allocate, sample_allocate
from trainer.model.unirom.cluster_attention import ClusterAttention, GCFLayer
from trainer.model.unirom.config import VARIANTS, UniROMConfig
from trainer.model.unirom.model import UniROM
from trainer.model.unirom.recformer import RecFormer

__all__ = ["ClusterAttention", "Evaluator", "GCFLayer", "Generator", "PaymentNet", "RecFormer", "UniROM",
           "UniROMConfig", "VARIANTS", "greedy_allocate", "sample_allocate"]
