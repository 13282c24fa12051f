"""UniROM: RecFormer + AucFormer (generator, evaluator, payment network) in one module."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.model.unirom.aucformer import Evaluator, Generator, PaymentNet, gather_rows, greedy_allocate
from trainer.model.unirom.config import UniROMConfig
from trainer.model.unirom.recformer import RecFormer


class UniROM(nn.Module):
    def __init__(self, cfg: UniROMConfig):
        super().__init__()
        self.cfg = cfg
        self.recformer = RecFormer(cfg)
        self.generator = Generator(cfg)
        self.evaluator = Evaluator(cfg)
        self.payment = PaymentNet(cfg)

    @torch.no_grad()
    def auction(self, rec: dict, mask: torch.Tensor, bids: torch.Tensor) -> dict:
        """The deployed path (generator + payment network) on RecFormer's output for a request's
        candidates: → slots [B, K] (candidate index), payment [B, K] (per click), pctr [B, K]."""
        z = self.generator(rec["h"], rec["ctr_logit"], mask, bids)
        slots = greedy_allocate(z)
        ctr = rec["ctr_logit"].gather(1, slots)
        b = bids.gather(1, slots)
        rate = self.payment(gather_rows(rec["h"], slots), ctr, b)
        return {"slots": slots, "payment": rate * b, "pctr": torch.sigmoid(ctr), "z": z}
