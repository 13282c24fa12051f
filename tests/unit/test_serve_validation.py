"""Bad requests get a 4xx with a message, never a 5xx; admin actions need the token; cold start."""

import json

import httpx
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from deploy.bench import _free_port
    from deploy.replica import Replica, Server, StaticTokens
    from exporter.store import SnapshotStore
    from exporter.synthetic import make_model, make_users, publish_model

    tmp = tmp_path_factory.mktemp("serve")
    store = SnapshotStore(str(tmp / "store"))
    model = make_model("tiny", num_items=60, num_users=20)
    publish_model(store, model, 1, tmp)
    users = make_users(20, 60, model.cfg.max_len, 5)
    replica = Replica("v1", store.url, StaticTokens(users), cache_dir=tmp / "cache", threads=1,
                      poll_s=3600, admin_token="s3cret")
    srv = Server(replica, "127.0.0.1", _free_port()).start_background()
    yield srv
    srv.stop()


BAD = [
    ({}, "user_id"),
    ({"k": 5}, "user_id"),
    ({"user_id": "u1", "k": 0}, "k"),
    ({"user_id": "u1", "k": -3}, "k"),
    ({"user_id": "u1", "k": 10**9}, "k"),
    ({"user_id": "u1", "k": "5"}, "k"),
    ({"user_id": "u1", "k": 2.5}, "k"),
    ({"user_id": "u1", "k": True}, "k"),
    ({"user_id": 17}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "x" * 1000}, "user_id"),
    ({"user_id": None}, "user_id"),
    ({"user_id": "u1", "candidates": "a1"}, "candidates"),
    ({"user_id": "u1", "candidates": [1, 2]}, "candidates"),
    ({"user_id": "u1", "candidates": []}, "candidates"),
    ({"user_id": "u1", "candidates": [f"a{i}" for i in range(2001)]}, "candidates"),
    ({"user_id": "u1", "device": "fridge"}, "device"),
    ({"user_id": "u1", "surprise": 1}, "surprise"),
    ([1, 2, 3], "body"),
    ("just a string", "body"),
]


def test_bad_requests_are_4xx_with_a_message(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body, field in BAD:
            r = c.post("/v1/rank", json=body)
            assert r.status_code == 422, (body, r.status_code, r.text)
            doc = r.json()
            assert doc["error"] == "invalid request" and any(field in p for p in doc["problems"]), (body, doc)
        r = c.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["problems"]
        r = c.post("/v1/rank", content=json.dumps({"user_id": "u1", "pad": "x" * 70_000}).encode(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "bytes" in r.json()["error"]

        def chunks():  # no content-length: the limit holds for streamed bodies too
            yield b'{"user_id": "u1", "pad": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/v1/rank").status_code == 405
        assert c.post("/v1/nothing", json={}).status_code == 404
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics


def test_rank_answers_known_unknown_and_candidate_requests(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["model_version"] == 1 and ready["providers"][-1] == "CPUExecutionProvider"
        resp = c.post("/v1/rank", json={"user_id": "u1", "k": 3})
        r = resp.json()
        assert r["model_version"] == 1 and not r["cold_start"] and len(r["items"]) == 3
        # per-stage durations for `oneranker bench serve`
        stages = dict(p.strip().split(";dur=") for p in resp.headers["server-timing"].split(","))
        assert set(stages) == {"pre", "feast", "encode", "run", "post"} and float(stages["run"]) > 0
        assert [i["rank"] for i in r["items"]] == [1, 2, 3]
        assert r["items"][0]["score"] >= r["items"][1]["score"] >= r["items"][2]["score"]
        cold = c.post("/v1/rank", json={"user_id": "never-seen", "k": 2, "device": "ios"}).json()
        assert cold["cold_start"] and not cold["known_user"] and len(cold["items"]) == 2
        cands = ["a3", "a7", "a11", "zz-unknown"]
        r = c.post("/v1/rank", json={"user_id": "u2", "k": 10, "candidates": cands}).json()
        assert {i["ad_id"] for i in r["items"]} == {"a3", "a7", "a11"} and r["unknown_candidates"] == 1
        r = c.post("/v1/rank", json={"user_id": "u2", "k": 100}).json()
        assert 0 < len(r["items"]) <= 100  # k above the graph's K is capped, not an error


def test_admin_needs_the_token(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/admin/reload").status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["changed"] is False
        r = c.post("/admin/rollback", json={"version": 99}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 409 and "refused" in r.json()["error"]
        assert c.get("/readyz").json()["model_version"] == 1
    server.replica.admin_token = None  # not configured → disabled
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 403 and "disabled" in r.json()["error"]
    finally:
        server.replica.admin_token = "s3cret"
