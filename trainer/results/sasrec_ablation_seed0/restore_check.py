import torch, numpy as np
import trainer.nextitem as N
from streaming.replay.datasets import load_interactions
from trainer.nextitem_data import split_interactions, collate_eval
from trainer.model.config import preset
torch.set_num_threads(1)
inter = load_interactions("movielens-100k"); split = split_interactions(inter)
cfg = preset("small", **N.NEXTITEM_DEFAULTS).replace(num_negatives=0, num_items=split.num_items, num_users=len(split.users))
rows = split.eval_rows()
counts = split.train_counts(); q = (counts + 1.0) ** 0.75; q[:2] = 0
log_q = torch.log((q / q.sum()).clamp(min=1e-12))
vb = [collate_eval(split, rows[i:i+512], cfg.max_len, "valid") for i in range(0, len(rows), 512)]
tb = [collate_eval(split, rows[i:i+512], cfg.max_len, "test") for i in range(0, len(rows), 512)]
torch.manual_seed(0)
m = N.build("sasrec", cfg)
info = N.train(m, split, cfg, 8, 3, torch.device("cpu"), 0, log_q, vb, print, "sasrec")
print("best epoch", info["best_epoch"], "curve best", max(c["valid_hr@10"] for c in info["curve"]))
print("after restore: valid", N.evaluate(m, vb, None, torch.device("cpu"))["hr@10"], "test", N.evaluate(m, tb, None, torch.device("cpu"))["hr@10"])
# test with the validation item dropped from the history (the valid input, test target)
import copy
tb2 = []
for b_v, b_t in zip(vb, tb):
    b = dict(b_v); b["target"] = b_t["target"]; ex = b_v["excluded"].clone(); ex[torch.arange(len(b["target"])), b_v["target"]] = True
    ex[torch.arange(len(b["target"])), b_t["target"]] = False; b["excluded"] = ex; tb2.append(b)
print("test target from the valid history", N.evaluate(m, tb2, None, torch.device("cpu"))["hr@10"])
torch.save(m.state_dict(), "/tmp/dbg_sasrec.pt")
