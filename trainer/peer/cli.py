"""``oneranker bench quality`` (registered by trainer/cli.py). Heavy imports happen inside."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def bench_quality_cmd(
    dataset: str = typer.Option("movielens-100k", help="Dataset name or user_id,item_id,timestamp CSV/parquet."),
    out: Optional[Path] = typer.Option(None, help="Write the results JSON here (e.g. "
                                       "trainer/results/quality_movielens-100k.json)."),
    seeds: str = typer.Option("0,1,2", help="Comma list of seeds: one run per seed, mean ± sd."),
    models: str = typer.Option("recbole-sasrec,popularity,sasrec,oneranker-gen-only",
                               help="Comma list: recbole-sasrec, recbole-pop (RecBole's, in .venv-recbole; Pop "
                                    "always runs with recbole-sasrec as the split check), popularity, sasrec, "
                                    "oneranker-gen-only, oneranker (ours, trainer/nextitem.py)."),
    epochs: Optional[int] = typer.Option(None, help="Max epochs of every model (default: the next-item default, 40; "
                                                      "RecBole's SASRec takes ~115 s an epoch on 2 CPU cores, 16 s on a GPU)."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience on validation HR@10 (default 5)."),
    threads: int = typer.Option(2, help="torch CPU threads per run (ours and each RecBole process)."),
    jobs: int = typer.Option(1, help="RecBole seeds run at once (each with --threads)."),
    preset: str = typer.Option("small", help="Our model preset; RecBole SASRec gets the same sizes."),
    ours_from: Optional[Path] = typer.Option(None, help="Reuse our models' runs from this next-item results JSON "
                                             "(refused unless dataset, preset, epochs, patience and config match)."),
    ours_missing: str = typer.Option("train", help="Seeds absent from --ours-from: train | skip (popularity is "
                                     "always computed)."),
    limit: Optional[int] = typer.Option(None, help="First N interactions only."),
    device: str = typer.Option("cpu", help="cpu | cuda: where RecBole and our models train (ONERANKER_PEER_PYTHON "
                               "may name an interpreter with recbole when .venv-recbole is CPU-only)."),
    set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Our config override (e.g. --set batch_size=2048), as `oneranker evaluate "
                                        "--set`; RecBole's budget follows it."),
) -> None:
    """RecBole's SASRec (peer library, own venv, `make peer-venv`) vs our models on the same split and
    budget: one table (HR@10, NDCG@10, HR@50, train s, ratios to popularity and to RecBole SASRec)."""
    from trainer.peer.bench import bench_quality

    if ours_missing not in ("train", "skip"):
        raise typer.BadParameter("train | skip", param_hint="--ours-missing")
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("cpu | cuda", param_hint="--device")
    from trainer.evaluate import parse_overrides

    bench_quality(dataset, [int(s) for s in seeds.split(",") if s.strip()], models, str(out) if out else None,
                  epochs, patience, threads, jobs, preset, str(ours_from) if ours_from else None, ours_missing, limit, device,
                  parse_overrides(set_))
