"""``oneranker features …``: Feast repo commands (heavy imports inside the commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
features_app = typer.Typer(help="The Feast feature store (user token sequences, profiles, ads).",
                           no_args_is_help=True)

OnlineOpt = typer.Option(None, "--online", envvar="ONERANKER_FEAST_ONLINE",
                         help="Online store: sqlite (default, under $ONERANKER_HOME/feast), a SQLite "
                              "path, or redis://host:port or redis://host:port/db.")


@features_app.command("apply")
def apply_cmd(
    online: Optional[str] = OnlineOpt,
    catalog: Optional[Path] = typer.Option(None, envvar="ONERANKER_AD_CATALOG",
                                           help="Ad catalog parquet (default $ONERANKER_HOME/"
                                                "ad_catalog.parquet); materialized when present."),
) -> None:
    """`feast apply` for the configured store, then materialize the ad catalog into the online store."""
    from features.store import apply

    result = apply(online=online, catalog=catalog)
    table = Table(title="feast apply")
    table.add_column("item")
    table.add_column("value")
    table.add_row("feature_store.yaml", str(result.yaml))
    table.add_row("online store", json.dumps(result.online_store))
    table.add_row("objects", ", ".join(result.objects))
    table.add_row("ads materialized", str(result.ads_materialized))
    console.print(table)


@features_app.command("get")
def get_cmd(
    user: List[str] = typer.Option([], "--user", help="User id (repeatable)."),
    ad: List[str] = typer.Option([], "--ad", help="Ad id (repeatable)."),
    online: Optional[str] = OnlineOpt,
) -> None:
    """Print the online features of some users and ads as JSON."""
    from features.store import FeatureStoreClient, open_store

    client = FeatureStoreClient(open_store(online=online))
    out = {
        "users": {u: {"sequence": s.to_dict(), "profile": p}
                  for (u, s), p in zip(client.get_user_sequences(user).items(),
                                       client.get_user_profiles(user).values())},
        "ads": client.get_ads(ad),
    }
    print(json.dumps(out, indent=2))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(features_app, name="features")
