"""The incremental (online) trainer, ``oneranker train``: ``oneranker.samples`` → a continuously
updated OneRanker. This module is its entry point; the pieces live by concern, each usable without
Kafka, so the online-vs-frozen comparison, ``oneranker bench train`` and the unit tests run exactly
the code the streaming trainer runs. Imports go one way, down this list:

* trainer/stream_loop.py — the Kafka loop (``StreamTrainer``, ``TrainerOptions``), Prometheus
  metrics, checkpoints and offset commits;
* trainer/learned_log.py — the test-mode log of the samples the durable model has learned;
* trainer/learner.py — ``OnlineLearner``: test-then-train on one micro-batch, checkpoint state;
* trainer/prequential.py — sliding windows of the predictions made before learning;
* trainer/batching.py — samples → batch, the same ``assemble`` the offline harness uses;
* trainer/metrics.py — every metric, shared with trainer/evaluate.py;
* trainer/vocab.py — id maps and the embedding tables that grow with them.
"""

from trainer.stream_loop import TrainerOptions, run_trainer

__all__ = ["TrainerOptions", "run_trainer"]
