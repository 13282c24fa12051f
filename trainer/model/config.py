"""Model configuration: one dataclass, sizes default to the paper's (DESIGN §5), a small CPU preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class OneRankerConfig:
    # --- vocabulary (set from the data's id maps; index 0 = padding, 1 = unknown/OOV) ---
    num_items: int = 1024
    num_users: int = 1024
    num_actions: int = 4  # features.tokens.Action: PAD, IMPRESSION, CLICK, CONVERSION
    num_devices: int = 4  # 0 = unknown
    # --- sizes (paper defaults) ---
    d_model: int = 128
    n_heads: int = 2
    n_layers: int = 4  # Step 1 HSTU blocks
    n_step2_layers: int = 2
    n_step3_layers: int = 1
    ffn_mult: int = 4
    n_interest_tasks: int = 6
    n_value_tasks: int = 2
    n_fake_items: int = 32
    max_len: int = 200  # history tokens fed to Step 1 (the user token comes on top)
    dropout: float = 0.1
    # LayerNorm on Step 1's summed input embeddings (then dropout), as RecBole's SASRec: the part of
    # its encoder that carried over to the HSTU backbone (ML-100K ad requests, seed 0: GAUC 0.688 →
    # 0.727, value-NDCG@10 0.566 → 0.605). Off in checkpoints written before it existed.
    embed_norm: bool = True
    time_buckets: int = 32  # log-spaced buckets of |Δt| for the HSTU relative time bias
    # Funnel stage of each interest task (a task with stage s is supervised by future tokens with
    # action ≥ s). Empty = spread impression → click → conversion over the interest tasks in order.
    interest_stages: tuple[int, ...] = ()
    # --- ablation switches ---
    use_step3: bool = True  # False = generation only: Step 2 scores rank everything
    use_fake_items: bool = True  # False = no fake item tokens, no target-aware channel
    decouple_tasks: bool = True  # False = one task head supervised by every stage
    kv_passthrough: bool = True  # Step 3 cross-attends to concat(H1, Step-2 outputs); False = H1 only
    use_dc_loss: bool = True
    # --- losses ---
    alpha: float = 1.0  # L_MTP
    beta: float = 1.0  # L_rank (+ the pCTR/pCVR BCE)
    gamma: float = 0.5  # L_DC
    tau: float = 1.0  # DC teacher temperature
    n_targets: int = 2  # multi-token prediction: future targets per position and stage
    num_negatives: int = 256  # sampled softmax negatives per step (0 = full softmax)
    # --- inference ---
    retrieve_n: int = 50  # Step-2 top-N per head
    top_k: int = 10
    # --- training ---
    # Step-3 training candidates = the exposed ads + this many of the generator's own top-scored
    # items among the step's sampled negatives (label 0): Step 3 then also learns to judge the kind
    # of list retrieval hands it at inference, not only popularity-sampled exposures.
    rank_hard_negatives: int = 0
    # Step-3 training on the generator's own top-N retrieval per query (listwise softmax toward
    # the request's clicked items, only where retrieval found them): the lists Step 3 reranks at
    # inference. 0 = off. The evaluate harness passes it to OneRanker.forward(retrieve=...).
    rank_retrieved: int = 0
    list_weight: float = 1.0
    rank_retrieved_covered_only: bool = True  # Step 3 on the lists holding a target only (cheaper)
    # Step 3's seen-before flag from the whole history the data has, not only the max_len tokens
    # Step 1 reads: evaluate takes the user's stream, the online trainer each sample's feature-store
    # history (200 tokens), serving the same (the graph's ``seen`` input). Off = the window only.
    # On movielens 12.7% of held-out slates' other ads were seen before, 5% in the last 50 tokens.
    full_history_seen: bool = True
    # Step 3 reads each candidate's log click share (OneRanker.item_log_pop; evaluate sets it from
    # the training clicks, the online trainer from the clicks learned so far, before each step).
    # On in the offline harness (GAUC 0.676 → 0.696, 3 seeds); off online, where early, sparse
    # click counts made it slightly worse (prequential AUC 0.665 vs 0.674, 3 seeds).
    popularity_feature: bool = False
    train_positions: int = 0  # Step-2/3 positions per sequence per step (0 = all requests)
    # Fake-item centroids in the offline harness: 0 = one full warm-started k-means refresh per
    # epoch; N = a damped Lloyd step (``centroid_rate`` of the way) every N optimizer steps, as the
    # online trainer does (trainer/learner.py).
    centroid_every: int = 0
    centroid_rate: float = 0.05
    # Step-1 next-item loss: H1 at each query position scores the next target by dot product with
    # the item table (dense, cheap supervision of the backbone, as SASRec/HSTU train), this weight
    # next to L_MTP. 0 = off.
    state_weight: float = 0.0
    # Next-item protocol (trainer/nextitem_data.py): training windows end every window_stride tokens
    # and supervise only the positions no later window does; 1 = one prefix per target (RecBole's
    # pipeline: every target read with its full max_len context), 0 = max_len (disjoint windows).
    window_stride: int = 0
    lr: float = 2e-3
    clip_norm: float = 1.0  # per parameter group (ranker / the rest), see trainer/clipping.py
    weight_decay: float = 0.0
    batch_size: int = 64

    @property
    def n_tasks(self) -> int:
        """Task tokens in Step 2 (1 when tasks are not decoupled)."""
        return self.n_interest_tasks + self.n_value_tasks if self.decouple_tasks else 1

    @property
    def n_fake(self) -> int:
        return self.n_fake_items if self.use_fake_items else 0

    def stages(self) -> tuple[int, ...]:
        """Funnel stage per interest task (1 impression, 2 click, 3 conversion), in funnel order."""
        if self.interest_stages:
            assert len(self.interest_stages) == self.n_interest_tasks
            return tuple(sorted(self.interest_stages))
        m = self.n_interest_tasks
        return tuple(1 + (3 * i) // m for i in range(m))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OneRankerConfig":
        d = dict(d)
        # Checkpoints written before these switches existed have neither the tensors nor the
        # behaviour: they load as they were trained.
        d.setdefault("popularity_feature", False)
        d.setdefault("embed_norm", False)
        if "interest_stages" in d:
            d["interest_stages"] = tuple(d["interest_stages"])
        return cls(**d)

    def replace(self, **kw) -> "OneRankerConfig":
        return replace(self, **kw)


PRESETS: dict[str, dict] = {
    "paper": {},
    "small": dict(d_model=64, n_heads=2, n_layers=2, n_step2_layers=2, n_step3_layers=1,
                  ffn_mult=2, n_interest_tasks=3, n_value_tasks=1, n_fake_items=16, max_len=50,
                  retrieve_n=50, num_negatives=256, train_positions=8, rank_hard_negatives=0,
                  batch_size=64),
    "tiny": dict(d_model=16, n_heads=2, n_layers=1, n_step2_layers=1, n_step3_layers=1, ffn_mult=2,
                 n_interest_tasks=2, n_value_tasks=1, n_fake_items=4, max_len=12, retrieve_n=5,
                 top_k=3, num_negatives=16, dropout=0.0, time_buckets=8),
}

# Ablations by model name (the evaluate harness and the CLI use these names).
ABLATIONS: dict[str, dict] = {
    "oneranker": {},
    "oneranker-gen-only": dict(use_step3=False, use_dc_loss=False),
    "oneranker-no-fake": dict(use_fake_items=False),
    "oneranker-no-fake-no-decouple": dict(use_fake_items=False, decouple_tasks=False),
    "oneranker-no-kv": dict(kv_passthrough=False),
    "oneranker-no-dc": dict(use_dc_loss=False),
}


def preset(name: str = "paper", **overrides) -> OneRankerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {sorted(PRESETS)}")
    return OneRankerConfig(**{**PRESETS[name], **overrides})
