"""RecBole's SASRec and Pop on a split written by trainer/peer/atomic.py: a standalone script for the
peer environment (``.venv-recbole/bin/python trainer/peer/recbole_sasrec.py CONFIG.json``; stdlib +
recbole only, never the project's modules).

CONFIG.json: {"atomic_dir": <dir holding <name>/<name>.inter and users.json>, "name": <name>,
"work_dir": <scratch dir: RecBole's logs, tensorboard files and checkpoints>, "out": <JSON path>,
"models": ["Pop", "SASRec"], "seed": 0, "threads": 2, "recbole": {RecBole config overrides:
hidden_size, inner_size, n_layers, n_heads, hidden_dropout_prob, attn_dropout_prob,
MAX_ITEM_LIST_LENGTH, learning_rate, train_batch_size, epochs, stopping_step, …}}.

Per model it writes RecBole's own metrics (``native_valid`` best epoch, ``native_test``: Hit/NDCG
@1,5,10,50 in full-sort mode; for sequential models RecBole does NOT exclude the user's earlier
items, for Pop it does) and ``test``: the same trained model scored with OUR protocol
(trainer/nextitem.py): full-corpus rank of the last item given all earlier ones, the user's earlier
items excluded, ties broken against the target, on our evaluated users (≥ 3 interactions).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

# torch >= 2.6 loads with weights_only=True by default: RecBole's checkpoints (config objects
# inside) then fail to load in Trainer.evaluate(load_best_model=True).
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def numpy2_aliases() -> None:
    """RecBole 1.2.1's Config sets np.float, np.int, np.long... from np.float_, np.complex_ and
    np.unicode_, which numpy 2.0 removed. .venv-recbole pins numpy 1.23.5 (nothing to do); an
    interpreter with numpy 2 (a GPU machine's image) gets those three back."""
    import numpy as np

    for name, value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if name not in np.__dict__:
            setattr(np, name, value)

HR_KS = (1, 5, 10, 50)
NDCG_KS = (10, 50)


def recbole_config(cfg: dict, model: str) -> dict:
    """The RecBole config: our split (leave-one-out on our time order, nothing filtered), full-sort
    evaluation, Hit/NDCG @1,5,10,50, early stopping on Hit@10, CE over the full corpus."""
    work = Path(cfg["work_dir"])
    base = {
        "data_path": str(Path(cfg["atomic_dir"])), "dataset": cfg["name"],
        "checkpoint_dir": str(work / "saved"), "show_progress": False,
        "use_gpu": cfg.get("device", "cpu") == "cuda", "gpu_id": "0",
        "seed": cfg.get("seed", 0), "reproducibility": True, "state": "INFO", "worker": 0,
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "rm_dup_inter": None, "val_interval": None, "filter_inter_by_user_or_item": False,
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "repeatable": False, "metrics": ["Hit", "NDCG"], "topk": list(HR_KS), "valid_metric": "Hit@10",
        "valid_metric_bigger": True, "eval_batch_size": 4096, "train_neg_sample_args": None,
        "loss_type": "CE", "learner": "adam", "weight_decay": 0.0,
    }
    if model == "Pop":
        return {**base, "epochs": 1, "train_batch_size": 4096}
    # RecBole's sequential models require ``repeatable`` (their full-sort evaluation then keeps the
    # user's earlier items in the ranking; our_protocol below excludes them).
    return {**base, "repeatable": True, **cfg.get("recbole", {})}


def read_inter(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """A .inter atomic file (trainer/peer/atomic.py writes it): user token → [(item token, timestamp)]
    in file order. Standard library only: this script runs in the peer environment."""
    out: dict[str, list[tuple[str, float]]] = {}
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        iu, ii, it = (header.index(h) for h in ("user_id:token", "item_id:token", "timestamp:float"))
        for line in f:
            p = line.rstrip("\n").split("\t")
            out.setdefault(p[iu], []).append((p[ii], float(p[it])))
    return out


def history_by_user(inter_file: Path) -> dict[str, list[str]]:
    """user token → item tokens in timestamp order (atomic.py writes position timestamps)."""
    return {u: [i for i, _ in sorted(v, key=lambda x: x[1])] for u, v in read_inter(inter_file).items()}


def our_protocol(model, dataset, hist: dict[str, list[str]], users: list[str], max_len: int, split: str) -> dict:
    """Full-corpus ranks of each user's ``split`` target (test: last, valid: second-to-last) given
    every earlier item, earlier items excluded, ties against the target → HR/NDCG like ours."""
    import torch
    from recbole.data.interaction import Interaction

    model.eval()
    uf, itf = dataset.uid_field, dataset.iid_field
    seq_f, len_f = itf + dataset.config["LIST_SUFFIX"], dataset.config["ITEM_LIST_LENGTH_FIELD"]
    ranks = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(users), 256):
            chunk = users[s:s + 256]
            seqs, tgts, lens = [], [], []
            for u in chunk:
                items = [int(dataset.token2id(itf, t)) for t in hist[u]]
                cut = len(items) - (1 if split == "test" else 2)
                seqs.append(items[:cut])
                tgts.append(items[cut])
            B = len(chunk)
            mat = torch.zeros(B, max_len, dtype=torch.long)
            for k, sq in enumerate(seqs):  # RecBole's layout: the newest max_len items, left-aligned
                w = sq[-max_len:]
                mat[k, :len(w)] = torch.tensor(w)
                lens.append(len(w))
            inter = Interaction({uf: torch.tensor([int(dataset.token2id(uf, u)) for u in chunk]),
                                 seq_f: mat, len_f: torch.tensor(lens)})
            scores = model.full_sort_predict(inter.to(dev)).view(B, -1).float().cpu()
            excluded = torch.zeros_like(scores, dtype=torch.bool)
            excluded[:, 0] = True  # [PAD]
            for k, sq in enumerate(seqs):
                excluded[k, sq] = True
            t = torch.tensor(tgts)
            excluded[torch.arange(B), t] = False
            ts = scores.gather(1, t.unsqueeze(1))
            other = (~excluded).scatter(1, t.unsqueeze(1), False)
            ranks.append(((scores >= ts) & other).sum(1))
    r = torch.cat(ranks).float()
    out = {f"hr@{k}": float((r < k).float().mean()) for k in HR_KS}
    for k in NDCG_KS:
        out[f"ndcg@{k}"] = float(torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    out["n_users"] = len(users)
    return out


def run_model(cfg: dict, model_name: str, hist: dict, users: list[str]) -> dict:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config = Config(model=model_name, dataset=cfg["name"], config_dict=recbole_config(cfg, model_name))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(cfg.get("threads", 2))
    t0 = time.time()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    t_data = time.time() - t0
    epochs_done = []
    orig_valid = trainer._valid_epoch

    def valid_epoch(*a, **k):  # record the validation curve (RecBole logs it only)
        score, result = orig_valid(*a, **k)
        epochs_done.append({k2: round(float(v), 4) for k2, v in result.items()})
        print(f"  RecBole {model_name} epoch {len(epochs_done)} valid " + json.dumps(epochs_done[-1]), flush=True)
        return score, result

    trainer._valid_epoch = valid_epoch
    t1 = time.time()
    best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    train_s = time.time() - t1
    native_pop = None
    if model_name == "Pop":
        # RecBole's Pop.calculate_loss counts ``item_cnt[item] += 1`` with advanced indexing: an item
        # repeated within one training batch is counted once per batch, not once per interaction.
        # Its native numbers are kept (native_*); the scored model counts every training interaction
        # of RecBole's own training split (exact popularity on RecBole's split).
        native_pop = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        items = train_data._dataset.inter_feat[train_data._dataset.iid_field]
        cnt = torch.bincount(items, minlength=model.n_items).view(-1, 1)
        model.item_cnt.copy_(cnt)
        model.max_cnt = model.item_cnt.max(0)[0]  # on the model's device
    else:  # the best epoch's weights (Trainer.fit saved them)
        ck = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["state_dict"])
        model.load_other_parameter(ck.get("other_parameter"))
    native_test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    max_len = config["MAX_ITEM_LIST_LENGTH"] or 50
    ds = train_data._dataset
    res = {
        "test": our_protocol(model, ds, hist, users, max_len, "test"),
        "valid": our_protocol(model, ds, hist, users, max_len, "valid"),
        "native_test": {k: float(v) for k, v in (native_pop or native_test).items()},
        **({"native_test_exact_counts": {k: float(v) for k, v in native_test.items()}} if native_pop else {}),
        "native_valid": {k: float(v) for k, v in (best_valid or {}).items()},
        "native_n_test": len(test_data.dataset) if model_name != "Pop" else int(len(test_data.uid_list)),
        "train_seconds": round(train_s, 1), "data_seconds": round(t_data, 1),
        "epochs_run": len(epochs_done) if model_name != "Pop" else 1,
        "best_epoch": (1 + max(range(len(epochs_done)), key=lambda e: (epochs_done[e].get("hit@10", 0), -e)))
        if epochs_done else 0,
        "curve": epochs_done,
        "params": sum(p.numel() for p in model.parameters()),
        "config": {k: config[k] for k in ("hidden_size", "inner_size", "n_layers", "n_heads",
                                           "hidden_dropout_prob", "attn_dropout_prob", "hidden_act",
                                           "MAX_ITEM_LIST_LENGTH", "learning_rate", "train_batch_size",
                                           "epochs", "stopping_step", "loss_type", "learner", "seed")
                   if k in config},
        "n_train_rows": len(train_data.dataset),
    }
    res["test"].update({f"native_{k}": v for k, v in res["native_test"].items()})
    return res


def main(path: str) -> None:
    cfg = json.loads(Path(path).read_text())
    Path(cfg["work_dir"]).mkdir(parents=True, exist_ok=True)
    os.chdir(cfg["work_dir"])  # RecBole writes log/ and log_tensorboard/ into the working directory
    numpy2_aliases()
    import recbole
    import torch

    data_dir = Path(cfg["atomic_dir"]) / cfg["name"]
    info = json.loads((data_dir / "users.json").read_text())
    hist = history_by_user(data_dir / f"{cfg['name']}.inter")
    out = {"recbole": recbole.__version__, "torch": torch.__version__, "numpy": sys.modules["numpy"].__version__,
           "device": cfg.get("device", "cpu"), "seed": cfg.get("seed", 0),
           "split": {k: v for k, v in info.items() if k != "eval_users"}, "models": {}}
    for m in cfg.get("models", ["Pop", "SASRec"]):
        print(f"RecBole {m} seed {cfg.get('seed', 0)} …", flush=True)
        r = run_model(cfg, m, hist, info["eval_users"])
        out["models"][m] = r
        t = r["test"]
        print(f"RecBole {m}: " + " ".join(f"{k}={t[k]:.4f}" for k in ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10"))
              + f" | native hit@10={r['native_test'].get('hit@10', math.nan):.4f} train={r['train_seconds']}s "
              f"epochs={r['epochs_run']} best={r['best_epoch']}", flush=True)
        Path(cfg["out"]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
