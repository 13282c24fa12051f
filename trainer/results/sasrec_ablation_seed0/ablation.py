# Seed-0 ablations of our SASRec as it was at commit 60885a2 (pre-LN; its RecBole-like encoder is now the default, so run them from that commit) (8 epochs, patience 3): PYTHONPATH=. python trainer/results/sasrec_ablation_seed0/ablation.py VARIANT
# VARIANT joins any of postln, embln, init02, nouser, leftpos, constlr, stride1 with "-" (exp_<VARIANT>.json lands in /tmp).
import sys, torch, torch.nn as nn
import trainer.model.baselines as B
import trainer.nextitem as N
what = sys.argv[1]
orig = B.SASRec.__init__
def init(self, cfg):
    orig(self, cfg)
    d = cfg.d_model
    if "postln" in what:
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.ffn_mult * d, cfg.dropout, batch_first=True, norm_first=False)
        self.enc = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ln = nn.Identity()
    if "embln" in what:
        self.emb_ln = nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout))
    if "init02" in what:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None: nn.init.zeros_(m.bias)
            if isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02); nn.init.zeros_(m.in_proj_bias)
        self.item.weight.data[0].zero_()
    if "nouser" in what:
        self.user.weight.data.zero_(); self.user.weight.requires_grad_(False)
B.SASRec.__init__ = init
if "embln" in what or "leftpos" in what:
    def states(self, batch):
        items, actions = batch["items"], batch["actions"]
        B_, L = items.shape
        x = torch.cat([self.user(batch["user"]).unsqueeze(1), self.item(items) + self.action(actions)], 1)
        if "leftpos" in what:
            # RecBole's positions: counted from the oldest item read (1..n; the user token 0), not from
            # the window's end, so an item keeps its position when newer items are appended
            x = x + self.pos(torch.cat([torch.zeros_like(items[:, :1]), (items > 0).long().cumsum(1) * (items > 0)], 1))
        else:
            x = x + self.pos.weight[: L + 1]
        if "embln" in what:
            x = self.emb_ln(x)
        valid = torch.cat([torch.ones_like(items[:, :1], dtype=torch.bool), items > 0], 1)
        causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=items.device).triu(1)
        h = self.ln(torch.nan_to_num(self.enc(x, mask=causal, src_key_padding_mask=~valid)))
        pos = batch["pos"]
        return torch.gather(h, 1, pos.unsqueeze(-1).expand(*pos.shape, h.shape[-1]))
    B.SASRec.states = states
if "constlr" in what:
    class Const(torch.optim.lr_scheduler.LambdaLR):
        def __init__(self, opt, fn): super().__init__(opt, lambda s: 1.0)
    torch.optim.lr_scheduler.LambdaLR = Const
extra = dict(window_stride=1, batch_size=644) if "stride1" in what else {}  # RecBole's pipeline: one prefix per target
N.nextitem_main('movielens-100k', 'sasrec', 'small', 8, 3, 'cpu', f'/tmp/exp_{what}.json', 0, None,
                2 if "stride1" in what else 1, **extra)
