"""Dice activation (Zhou et al., 2018, DIN): a data-adaptive PReLU.

    Dice(s) = p(s) * s + (1 - p(s)) * alpha * s,   p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))

E and Var are per-feature batch statistics in training and running averages in eval (a
BatchNorm without affine parameters), alpha is learned per feature.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Dice(nn.Module):
    """x [..., d] → [..., d]. Statistics over every leading position of the batch."""

    def __init__(self, d: int, eps: float = 1e-8):
        super().__init__()
        self.bn = nn.BatchNorm1d(d, eps=eps, affine=False, momentum=0.01)
        self.alpha = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.training and flat.shape[0] < 2:  # BatchNorm needs ≥ 2 rows to estimate Var
            p = torch.sigmoid(flat)
        else:
            p = torch.sigmoid(self.bn(flat))
        return (p * flat + (1 - p) * self.alpha * flat).reshape(shape)


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    """Linear → Dice → … → Linear (d_in → hidden… → d_out)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), Dice(h)]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)
