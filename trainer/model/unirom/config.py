"""UniROM configuration: one dataclass. Sizes default to a small CPU preset; the paper's values
(where the extracted text still has them) are noted next to each field. See README.md for every
choice the paper leaves open."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass
class UniROMConfig:
    # --- vocabulary (set from the data's id maps; index 0 = padding, 1 = unknown) ---
    num_items: int = 1024  # ads
    num_users: int = 1024
    num_advertisers: int = 256
    num_categories: int = 64
    num_actions: int = 4  # features.tokens.Action
    num_devices: int = 4
    # --- sizes ---
    d_model: int = 64  # paper: d (value lost in extraction)
    n_heads: int = 2
    n_clusters: int = 16  # C: learnable clusters of cluster attention (paper: "adaptive clusters")
    n_layers: int = 4  # RecFormer GCF blocks per stream (behaviours, candidates)
    mif_every: int = 2  # Mid-fusion Interest-Former after every k-th block (blocks k, 2k, ...)
    ffn_mult: int = 2
    head_hidden: tuple[int, ...] = (128, 32)  # pCTR/pCVR/payment MLPs (paper: 128 and 32)
    max_len: int = 50  # behaviour tokens (the user token comes on top)
    dropout: float = 0.0
    # --- AucFormer ---
    n_slots: int = 3  # K: slots the generator fills
    n_exposed_slots: int = 10  # positions the evaluator knows (the ad layer shows 10 ads)
    n_gen_layers: int = 2  # GCF layers over the slot tokens
    n_eval_layers: int = 1  # evaluator's cluster-attention blocks
    # --- ablation switches ---
    set_aware: bool = True  # False = "w/o GCF": candidates never see each other (point-wise pCTR)
    use_mif: bool = True  # False = late fusion: one target attention after the last block
    # The one explicit user×ad feature: the candidate occurs in the behaviour window (the flag the
    # cascade's ranker and OneRanker's Step 3 also get, so every model sees the same features).
    seen_feature: bool = True
    # --- training ---
    n_unexposed: int = 20  # popularity-sampled unexposed ads per pre-training request
    session_s: float = 3600.0  # unexposed label: the user clicks the ad in (ts, ts + session_s]
    lr: float = 2e-3
    batch_size: int = 128
    pay_rho: float = 1.0  # augmented-Lagrangian penalty ρ of the payment loss
    rl_entropy: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "UniROMConfig":
        return replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "UniROMConfig":
        d = dict(d)
        d["head_hidden"] = tuple(d.get("head_hidden", cls.head_hidden))
        return cls(**d)


# Variants in the offline harness (name → config switches); "no-aucformer" is RecFormer + GSP.
VARIANTS = {"unirom": {}, "unirom-no-gcf": {"set_aware": False}, "unirom-no-aucformer": {}}
