import json, sys, os, numpy as np
sys.path.insert(0, "/work/main/trainer/peer")
import recbole_sasrec as R
cfg = json.load(open("/work/main/.oneranker/peer/movielens-100k/recbole-84bfab3565/seed0.config.json"))
os.chdir(cfg["work_dir"]); R.numpy2_aliases()
import torch, glob
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, init_seed
config = Config(model="SASRec", dataset=cfg["name"], config_dict=R.recbole_config(cfg, "SASRec"))
init_seed(0, True)
ds = create_dataset(config); tr, va, te = data_preparation(config, ds)
model = get_model("SASRec")(config, tr._dataset)
ck = torch.load(sorted(glob.glob(cfg["work_dir"] + "/saved/SASRec-*.pth"))[-1], map_location="cpu", weights_only=False)
model.load_state_dict(ck["state_dict"]); model.eval()
from pathlib import Path
data_dir = Path(cfg["atomic_dir"]) / cfg["name"]
info = json.loads((data_dir / "users.json").read_text()); hist = R.history_by_user(data_dir / "peer.inter")
users = info["eval_users"]
# per-user ranks: re-run our_protocol per length bucket
L = np.array([len(hist[u]) for u in users])
for name, mask in (("len<52", L < 52), ("52<=len<150", (L >= 52) & (L < 150)), ("len>=150", L >= 150)):
    us = [u for u, m in zip(users, mask) if m]
    v = R.our_protocol(model, tr._dataset, hist, us, 50, "valid")["hr@10"]; t = R.our_protocol(model, tr._dataset, hist, us, 50, "test")["hr@10"]
    print(name, len(us), "valid", round(v, 4), "test", round(t, 4))
