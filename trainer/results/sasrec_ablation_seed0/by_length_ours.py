import torch, numpy as np
import trainer.nextitem as N
from streaming.replay.datasets import load_interactions
from trainer.nextitem_data import split_interactions, collate_eval
from trainer.nextitem_metrics import full_corpus_ranks
from trainer.model.config import preset
torch.set_num_threads(2)
inter = load_interactions("movielens-100k"); split = split_interactions(inter)
cfg = preset("small", **N.NEXTITEM_DEFAULTS).replace(num_negatives=0, num_items=split.num_items, num_users=len(split.users))
rows = split.eval_rows()
m = N.build("sasrec", cfg); m.load_state_dict(torch.load("/tmp/dbg_sasrec.pt")); m.eval()
def ranks(which):
    b = collate_eval(split, rows, cfg.max_len, which)
    with torch.no_grad():
        s = N.corpus_scores(m, b).float()
    return full_corpus_ranks(s, b["target"], b["excluded"]).numpy(), s, b
rv, sv, bv = ranks("valid"); rt, st, bt = ranks("test")
L = np.array([len(split.seqs[r]) for r in rows])
for name, mask in (("len<52", L < 52), ("52<=len<150", (L >= 52) & (L < 150)), ("len>=150", L >= 150)):
    print(name, mask.sum(), "valid", (rv[mask] < 10).mean().round(4), "test", (rt[mask] < 10).mean().round(4))
# same-second ties of the target with the previous item
T = [np.asarray(split.times[r]) for r in rows]
tie_t = np.array([t[-1] == t[-2] for t in T]); tie_v = np.array([t[-2] == t[-3] for t in T])
print("test target tied with previous", tie_t.mean().round(3), "hr@10 tied", (rt[tie_t] < 10).mean().round(4), "untied", (rt[~tie_t] < 10).mean().round(4))
print("valid target tied with previous", tie_v.mean().round(3), "hr@10 tied", (rv[tie_v] < 10).mean().round(4), "untied", (rv[~tie_v] < 10).mean().round(4))
# popularity rank of the targets
cnt = split.train_counts()
pt = np.array([cnt[split.seqs[r][-1]] for r in rows]); pv = np.array([cnt[split.seqs[r][-2]] for r in rows])
print("median train count of target: valid", np.median(pv), "test", np.median(pt))
