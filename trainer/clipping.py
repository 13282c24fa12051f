"""Gradient clipping by parameter group, shared by offline training (evaluate) and the online trainer."""

from __future__ import annotations

import torch


def clip_groups(model) -> list[list[torch.nn.Parameter]]:
    """Parameter groups clipped separately: the ranker (Step 3 / the cascade's MLP) and the rest.
    One shared norm would let the ranking losses' gradients eat the generator's step size."""
    from trainer.model.baselines import Cascade

    ranker = getattr(model, "ranker", None) or (model.mlp if isinstance(model, Cascade) else None)
    if ranker is None:
        return [list(model.parameters())]
    rid = {id(p) for p in ranker.parameters()}
    if isinstance(model, Cascade):
        rid |= {id(p) for p in model.device_emb.parameters()}
    return [[p for p in model.parameters() if id(p) in rid], [p for p in model.parameters() if id(p) not in rid]]


def clip_by_group(model, max_norm: float) -> None:
    """Clip each group of ``clip_groups(model)`` to ``max_norm`` on its own."""
    for group in clip_groups(model):
        torch.nn.utils.clip_grad_norm_(group, max_norm, foreach=True)


def clipped_step(loss: torch.Tensor, opt, sched, groups, max_norm: float) -> None:
    """One optimizer step of offline training: backward, clip each group on its own, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group, max_norm)
    opt.step()
    sched.step()
