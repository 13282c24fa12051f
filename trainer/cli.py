"""Trainer commands: ``oneranker train``, ``oneranker evaluate``, ``oneranker bench train``.
Heavy imports (torch, kafka) happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oneranker import config

BootstrapOpt = typer.Option(None, "--bootstrap-servers", envvar="ONERANKER_KAFKA",
                            help="Kafka bootstrap servers (host:port[,…]); default 127.0.0.1:9092.")


def train_cmd(
    device: str = typer.Option("auto", help="auto | cpu | cuda (CUDA: bf16 autocast, pinned memory)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Checkpoints (default $ONERANKER_HOME/checkpoints)."),
    batch_size: int = typer.Option(64, help="Micro-batch size (samples)."),
    max_batch_size: int = typer.Option(256, help="With a backlog, micro-batches grow up to this."),
    max_wait_ms: int = typer.Option(500, help="Train a partial batch after waiting this long."),
    preset: str = typer.Option("small", help="Model preset for a fresh start: small | paper | tiny."),
    checkpoint_every_steps: int = typer.Option(200, help="Checkpoint every N optimizer steps (0 = off)."),
    checkpoint_every_s: float = typer.Option(60.0, help="… or every T seconds (0 = off)."),
    keep: int = typer.Option(3, help="Checkpoints to keep."),
    samples_topic: str = typer.Option(config.TOPIC_SAMPLES, help="Topic of the training samples."),
    group_id: str = typer.Option("oneranker-trainer", help="Consumer group."),
    metrics_port: int = typer.Option(config.DEFAULT_TRAINER_METRICS_PORT,
                                     help="Prometheus endpoint port (0 = any free port, -1 = off)."),
    metrics_jsonl: Optional[Path] = typer.Option(None, help="Append prequential metrics as JSON lines here "
                                                 "(default $ONERANKER_HOME/trainer_metrics.jsonl)."),
    metrics_every_s: float = typer.Option(10.0, help="Seconds between metric lines."),
    learned_log: Optional[Path] = typer.Option(None, help="Test mode: append '<ckpt step>\\t<sample_id>' of "
                                               "every sample a written checkpoint has learned."),
    max_samples: Optional[int] = typer.Option(None, help="Exit after learning this many samples."),
    exit_when_idle_s: Optional[float] = typer.Option(None, help="Exit after this many seconds without records."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    centroid_every_steps: int = typer.Option(1, help="Move the fake-item centroids (a damped Lloyd step) every N steps."),
    min_capacity: int = typer.Option(1024, help="Initial rows of the item/user tables (they grow ×2)."),
    max_users: Optional[int] = typer.Option(None, help="Admission limit for users (beyond: the OOV row)."),
    seed: int = typer.Option(0, help="Seed of a fresh start."),
    bootstrap_servers: Optional[str] = BootstrapOpt,
) -> None:
    """Train OneRanker incrementally from the samples topic (test-then-train metrics, checkpoints,
    offsets committed only after the checkpoint holding them); resumes from the newest checkpoint."""
    from oneranker.cli import _bootstrap, console
    from trainer.online import TrainerOptions, run_trainer

    home = config.settings().home
    opts = TrainerOptions(
        bootstrap=_bootstrap(bootstrap_servers, 30.0), topic=samples_topic, group_id=group_id,
        checkpoint_dir=checkpoint_dir or home / "checkpoints", preset=preset, device=device,
        batch_size=batch_size, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
        checkpoint_every_steps=checkpoint_every_steps,
        checkpoint_every_s=checkpoint_every_s, keep=keep, metrics_port=metrics_port,
        metrics_jsonl=metrics_jsonl or home / "trainer_metrics.jsonl", metrics_every_s=metrics_every_s,
        learned_log=learned_log, max_samples=max_samples, exit_when_idle_s=exit_when_idle_s, threads=threads,
        min_capacity=min_capacity, max_users=max_users, seed=seed, centroid_every=centroid_every_steps)
    opts.metrics_jsonl.parent.mkdir(parents=True, exist_ok=True)
    res = run_trainer(opts)
    console.print_json(json.dumps(res, default=float))


def evaluate_cmd(
    dataset: str = typer.Option("movielens-100k", help="Dataset name or CSV/parquet path."),
    protocol: str = typer.Option("ad-request", help="ad-request: each user's last ad request held out (Steps 1-3, "
                                 "GAUC, value NDCG) | next-item: leave-last-out sequential recommendation on "
                                 "user_id,item_id,timestamp data, full-corpus HR@{1,5,10,50}/NDCG@{10,50} with "
                                 "earlier items excluded + 100-sampled-negatives HR/NDCG@10 (trainer/nextitem.py)."),
    models: Optional[str] = typer.Option(None, help="Comma list or 'all' (popularity, sasrec, cascade, oneranker, "
                                         "ablations). Default: all; next-item: popularity,sasrec,oneranker-gen-only."),
    preset: str = typer.Option("small", help="small | paper."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs per model (default 5; next-item: at most 40, "
                                         "early stopping on the validation items)."),
    patience: Optional[int] = typer.Option(None, help="next-item: stop after this many epochs without a better "
                                           "validation HR@10 (default 5)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    out: Optional[Path] = typer.Option(None, help="Write the results JSON here."),
    limit: Optional[int] = typer.Option(None, help="First N interactions only."),
    seed: int = typer.Option(0),
    seeds: Optional[str] = typer.Option(None, help="Comma list: one run per seed, then a mean ± sd summary."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    split: str = typer.Option("test", help="test | valid (each user's second-to-last request: for tuning)."),
    curves: bool = typer.Option(False, "--curves", help="Evaluate after every epoch."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast in training (default: CUDA only)."),
    set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE (every model), repeatable."),
) -> None:
    """Offline evaluation: train and evaluate models on one dataset (trainer/evaluate.py; the UniROM
    family's auction harness, trainer/unirom_eval.py, when every model is one of its models)."""
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    if names and protocol == "ad-request":
        from trainer.unirom_eval import MODELS as AUCTION_MODELS

        if set(names) <= set(AUCTION_MODELS):
            from trainer.unirom_eval import run as run_auction

            run_auction(",".join(names), dataset, limit, seeds or str(seed), threads=threads,
                        out=str(out) if out else None, sets=set_, **({"mca_epochs": epochs} if epochs else {}))
            return
        if set(names) & set(AUCTION_MODELS):
            raise typer.BadParameter(f"run {', '.join(AUCTION_MODELS)} apart from the other models (their own "
                                     "harness: auctions, eCTR/eRPM/IC)", param_hint="--models")
    from trainer.evaluate import run

    run(seed, seeds, str(out) if out else None, set_, protocol, patience, dataset=dataset, models=models, preset=preset,
        epochs=epochs, device=device, limit=limit, threads=threads, split=split, curves=curves, bf16=bf16)


def bench_train_cmd(
    quick: bool = typer.Option(False, help="Fewer steps (CI)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    out: Optional[Path] = typer.Option(None, help="Write JSON here."),
    presets: str = typer.Option("small,paper", help="Comma list of presets."),
    runs: int = typer.Option(3, help="Runs per preset (median; at least 3)."),
    batch_size: Optional[int] = typer.Option(None, help="Override the preset's batch size."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    online_vs_frozen: bool = typer.Option(False, "--online-vs-frozen",
                                          help="Instead: prequential AUC of the incremental vs a frozen model."),
    limit: int = typer.Option(25000, help="--online-vs-frozen: first N movielens-100k requests."),
) -> None:
    """Training throughput (samples/s, tokens/s, peak memory; data vs compute) per preset, or with
    --online-vs-frozen the online-vs-frozen comparison."""
    if online_vs_frozen:
        from trainer.online_vs_frozen import online_vs_frozen as ovf

        ovf(limit=limit, device="cpu" if device == "auto" else device, threads=threads,
            out=str(out) if out else None)
        return
    from trainer.bench import bench_train

    bench_train(tuple(p.strip() for p in presets.split(",") if p.strip()), quick, device, runs, batch_size,
                threads, str(out) if out else None)


def bench_keepup_cmd(
    dataset: str = typer.Option("movielens-100k", help="Dataset whose samples are replayed."),
    speed: float = typer.Option(100000.0, help="Replay speed (event-time compression), as `oneranker produce`."),
    threads: str = typer.Option("1,2", help="Comma list of torch thread counts; one replay each."),
    limit: Optional[int] = typer.Option(None, help="Only the first N requests."),
    out: Path = typer.Option(Path("trainer/results/keepup_cpu.json"), help="Write JSON here."),
    metrics_every_s: float = typer.Option(2.0, help="The trainer's metrics cadence (the lag's resolution)."),
    drain_timeout_s: float = typer.Option(300.0, help="After the replay, wait at most this long for the "
                                          "trainer to catch up."),
    bootstrap_servers: Optional[str] = typer.Option(None, "--bootstrap-servers",
                                                    help="Use this broker (default: start an embedded one)."),
) -> None:
    """Whether the trainer keeps up with the replay: publish the dataset's samples paced at --speed
    into a fresh topic, run `oneranker train` (CPU, defaults) on it, record the lag (produced −
    learned) over time per thread count with the load average; prints tables, writes JSON."""
    from trainer.keepup import keepup

    keepup(dataset, speed, tuple(int(x) for x in threads.split(",") if x.strip()), limit, bootstrap_servers,
           str(out), metrics_every_s, drain_timeout_s)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
    bench_app.command("train")(bench_train_cmd)
    bench_app.command("keepup")(bench_keepup_cmd)
    from trainer.peer.cli import bench_quality_cmd; bench_app.command("quality")(bench_quality_cmd)  # noqa: E702
