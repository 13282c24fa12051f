"""A seeded ad layer that turns interactions into ad requests, and a seeded synthetic ad world.

Both produce the same thing: a list of ``AdRequest`` in dataset time (seconds), plus an ``AdCatalog``.
``request_events`` turns requests into the contract's impression/click/conversion events on a
rebased, speed-compressed clock. Same seed, same inputs → the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from streaming.replay.datasets import Interactions

DEVICES = ("ios", "android", "web")


@dataclass
class AdCatalog:
    """Every ad's static profile. Arrays are aligned with ``ad_id``."""

    ad_id: np.ndarray  # [A] str
    advertiser_id: np.ndarray  # [A] int64
    category: np.ndarray  # [A] int64
    bid: np.ndarray  # [A] float64, per click
    price: np.ndarray  # [A] float64, value of one conversion unit
    p_conversion: np.ndarray  # [A] float64, used where the data has no rating

    def __len__(self) -> int:
        return len(self.ad_id)

    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.ad_id)}

    def to_arrow(self) -> pa.Table:
        return pa.table({
            "ad_id": pa.array(self.ad_id.tolist(), pa.string()),
            "advertiser_id": pa.array(self.advertiser_id, pa.int64()),
            "category": pa.array(self.category, pa.int64()),
            "bid": pa.array(self.bid, pa.float64()),
            "price": pa.array(self.price, pa.float64()),
        })

    def write(self, path: Path) -> Path:
        """The catalog as parquet at ``path`` (the Feast ad view's file source)."""
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_arrow(), path)
        return path

    @classmethod
    def seeded(cls, ad_ids: np.ndarray, category: np.ndarray, seed: int) -> "AdCatalog":
        rng = np.random.default_rng([seed, 1])
        n = len(ad_ids)
        return cls(
            ad_id=np.asarray(ad_ids, dtype=object),
            advertiser_id=rng.integers(0, max(1, n // 10), size=n).astype(np.int64),
            category=np.asarray(category, dtype=np.int64),
            bid=np.round(rng.lognormal(0.0, 0.5, size=n), 4),
            price=np.round(rng.lognormal(3.0, 0.7, size=n), 2),
            p_conversion=rng.beta(2.0, 8.0, size=n),
        )


@dataclass
class AdRequest:
    """One ad request: the ads shown together and what the user then did (dataset time, seconds)."""

    request_id: str
    user_id: str
    ts: float
    ads: list[str]  # position i+1 shows ads[i]
    bids: list[float]
    device: str
    clicks: list[tuple[str, float]] = field(default_factory=list)  # (ad_id, ts)
    conversions: list[tuple[str, float, float]] = field(default_factory=list)  # (ad_id, ts, value)


def _conversion(rng: np.random.Generator, click_ts: float, price: float) -> tuple[float, float]:
    # Conversion delays are heavy-tailed (median ~40 min) but stay inside the 24 h window.
    delay = min(float(rng.lognormal(np.log(2400.0), 1.0)), 20 * 3600.0)
    quantity = 1 + int(rng.poisson(0.5))
    return click_ts + delay, round(price * quantity, 2)


def requests_from_interactions(data: Interactions, seed: int = 0, n_impressions: int = 10,
                               ) -> tuple[list[AdRequest], AdCatalog]:
    """Each interaction becomes a request: the interacted item + n-1 popularity-sampled others, the
    interacted item clicked, a conversion after a sampled delay when rating ≥ 4 (or with the item's
    conversion probability when there is no rating)."""
    catalog = AdCatalog.seeded(data.items, data.item_category, seed)
    index = catalog.index()
    rng = np.random.default_rng([seed, 2])
    counts = np.bincount([index[i] for i in data.item_id], minlength=len(catalog)).astype(np.float64)
    popularity = (counts + 1.0) ** 0.75
    popularity /= popularity.sum()
    n_other = min(n_impressions - 1, len(catalog) - 1)
    # Oversample candidates once (vectorised), then take the first distinct non-target ones per row.
    pool = rng.choice(len(catalog), size=(len(data), 3 * n_other + 4), p=popularity)
    positions = rng.integers(0, n_other + 1, size=len(data))
    click_delay = rng.uniform(2.0, 60.0, size=len(data))
    devices = rng.integers(0, len(DEVICES), size=len(data))
    requests = []
    for r in range(len(data)):
        target = index[data.item_id[r]]
        shown: list[int] = []
        seen = {target}
        for c in pool[r]:
            if c not in seen:
                seen.add(c)
                shown.append(int(c))
                if len(shown) == n_other:
                    break
        shown.insert(int(positions[r]) if positions[r] <= len(shown) else len(shown), target)
        ts = float(data.timestamp[r])
        req = AdRequest(
            request_id=f"r{seed}-{r}", user_id=f"u{data.user_id[r]}", ts=ts,
            ads=[catalog.ad_id[i] for i in shown], bids=[float(catalog.bid[i]) for i in shown],
            device=DEVICES[devices[r]],
        )
        click_ts = ts + float(click_delay[r])
        req.clicks.append((catalog.ad_id[target], click_ts))
        rating = data.rating[r]
        converts = rating >= 4 if not np.isnan(rating) else rng.random() < catalog.p_conversion[target]
        if converts:
            conv_ts, value = _conversion(rng, click_ts, float(catalog.price[target]))
            req.conversions.append((catalog.ad_id[target], conv_ts, value))
        requests.append(req)
    return requests, catalog


def synthetic_requests(seed: int = 0, n_users: int = 500, n_ads: int = 2000, n_categories: int = 20,
                       n_requests: int = 20000, n_impressions: int = 10, days: float = 30.0,
                       ) -> tuple[list[AdRequest], AdCatalog]:
    """A seeded ad world: users with latent category interests, ads with advertisers, categories,
    bids and quality; clicks ~ Bernoulli(sigmoid(interest + quality − position decay)); conversions
    ~ Bernoulli(ad's conversion probability) after a heavy-tailed delay."""
    rng = np.random.default_rng([seed, 3])
    category = rng.integers(0, n_categories, size=n_ads)
    catalog = AdCatalog.seeded(np.array([f"s{i}" for i in range(n_ads)], dtype=object), category, seed)
    quality = rng.normal(0.0, 1.0, size=n_ads)
    interest = rng.dirichlet(np.full(n_categories, 0.3), size=n_users)  # [U, C]
    by_category = [np.flatnonzero(category == c) for c in range(n_categories)]
    popularity = np.exp(quality)
    popularity /= popularity.sum()
    times = np.sort(rng.uniform(0.0, days * 86400.0, size=n_requests)) + 1.7e9
    users = rng.integers(0, n_users, size=n_requests)
    requests = []
    for r in range(n_requests):
        u = int(users[r])
        # Half the slate follows the user's interests (a targeting system), half is popular ads.
        cats = rng.choice(n_categories, size=n_impressions, p=interest[u])
        shown: list[int] = []
        for j, c in enumerate(cats):
            pick = (int(rng.choice(by_category[c])) if j % 2 == 0 and len(by_category[c])
                    else int(rng.choice(n_ads, p=popularity)))
            if pick not in shown:
                shown.append(pick)
        ts = float(times[r])
        req = AdRequest(
            request_id=f"r{seed}-{r}", user_id=f"u{u}", ts=ts,
            ads=[catalog.ad_id[i] for i in shown], bids=[float(catalog.bid[i]) for i in shown],
            device=DEVICES[int(rng.integers(0, len(DEVICES)))],
        )
        for pos, a in enumerate(shown):
            logit = -3.0 + 8.0 * interest[u, category[a]] + 0.8 * quality[a] - 0.15 * pos
            if rng.random() < 1.0 / (1.0 + np.exp(-logit)):
                click_ts = ts + float(rng.uniform(1.0, 120.0))
                req.clicks.append((catalog.ad_id[a], click_ts))
                if rng.random() < catalog.p_conversion[a]:
                    conv_ts, value = _conversion(rng, click_ts, float(catalog.price[a]))
                    req.conversions.append((catalog.ad_id[a], conv_ts, value))
        requests.append(req)
    return requests, catalog


def request_events(requests: list[AdRequest], start_ms: int, speed: float, t0: float | None = None,
                   ) -> list[tuple[str, dict]]:
    """All events of ``requests`` as (event_type, data), sorted by event time.

    Event time is rebased so the first request happens at ``start_ms`` and compressed by ``speed``
    (speed 1000: a dataset day lasts 86.4 s); that keeps replays inside the contract's time range.
    """
    if not requests:
        return []
    base = min(r.ts for r in requests) if t0 is None else t0

    def clock(ts: float) -> int:
        return start_ms + int(round((ts - base) * 1000.0 / speed))

    out: list[tuple[int, int, str, dict]] = []
    seq = 0
    for req in requests:
        t = clock(req.ts)
        hour = int((req.ts // 3600) % 24)
        for pos, (ad, bid) in enumerate(zip(req.ads, req.bids), start=1):
            out.append((t, seq, "impression", {
                "event_id": f"{req.request_id}:i{pos}", "schema_version": 1, "ts": t,
                "request_id": req.request_id, "user_id": req.user_id, "ad_id": ad,
                "position": pos, "bid": bid, "context": {"device": req.device, "hour": hour},
            }))
            seq += 1
        for ad, cts in req.clicks:
            ct = clock(cts)
            out.append((ct, seq, "click", {
                "event_id": f"{req.request_id}:c:{ad}", "schema_version": 1, "ts": ct,
                "request_id": req.request_id, "user_id": req.user_id, "ad_id": ad,
            }))
            seq += 1
        for ad, vts, value in req.conversions:
            vt = clock(vts)
            out.append((vt, seq, "conversion", {
                "event_id": f"{req.request_id}:v:{ad}", "schema_version": 1, "ts": vt,
                "request_id": req.request_id, "user_id": req.user_id, "ad_id": ad, "value": value,
            }))
            seq += 1
    out.sort(key=lambda e: (e[0], e[1]))
    return [(etype, data) for _, _, etype, data in out]


def load_requests(dataset: str, seed: int = 0, n_impressions: int = 10, limit: int | None = None,
                  ) -> tuple[list[AdRequest], AdCatalog]:
    """Requests for a dataset name or path, the first ``limit`` interactions/requests in time."""
    if dataset == "synthetic":
        return synthetic_requests(seed=seed, n_impressions=n_impressions,
                                  n_requests=limit if limit else 20000)
    from streaming.replay.datasets import load_interactions

    data = load_interactions(dataset)
    if limit:
        data = data.head(limit)
    return requests_from_interactions(data, seed=seed, n_impressions=n_impressions)
