"""The Ray Serve application over real HTTP with the Redis history store (a real redis-server started here).

Read-your-writes across two Retriever replicas, a 503 with a message (never a hang or a 500) while Redis is down and
recovery when it returns, and the HistoryWriter SIGKILLed under an events load losing no acknowledged event.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from ray import serve

from seminar_ray.data.schema import read_table
from seminar_ray.serving.redis_store import RedisHistoryStore, load_base
from seminar_ray.testing.artefacts import build_artefacts
from seminar_ray.testing.polling import wait_until
from seminar_ray.testing.redis_local import LocalRedis
from serve_app.app import compose
from serve_app.deploy import REQUEST_TIMEOUT_S

PORT = 18767
APP = "seminar"
OPTIONS = {"Retriever": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 4}}}
MAX_LEN = 64  # the model's max_len: histories are read up to this


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_redis")
    art = build_artefacts(root, num_users=20, min_len=30, max_len=80, model_max_len=MAX_LEN)
    with LocalRedis(root / "redis") as server:
        load_base(server.url, art.data)
        args = {"checkpoint": str(art.checkpoint), "index": str(art.index), "data": str(art.data), "store": server.url}
        serve.start(http_options={"host": "127.0.0.1", "port": PORT, "request_timeout_s": REQUEST_TIMEOUT_S})
        serve.run(compose(args, OPTIONS), name=APP, route_prefix="/")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
                yield client, server, art
        finally:
            serve.shutdown()


def score(client, user_id, candidates=(1, 2, 3)):
    return client.post("/v1/score", json={"user_id": user_id, "candidates": list(candidates)})


def events(client, user_id, items):
    return client.post("/v1/events", json={"user_id": user_id, "events": [{"item_id": i} for i in items]})


def test_redis_store_read_your_writes_503_while_down_and_recovery(service):
    client, server, art = service
    base = dict(zip(*read_table(art.data, "sequences", ["user_id", "item_ids"]).to_pydict().values()))
    r = score(client, 3)
    assert r.status_code == 200 and r.json()["history_len"] == min(MAX_LEN, len(base[3])), r.text
    user = 10**7
    ack = events(client, user, [5, 9])
    assert ack.status_code == 200 and ack.json()["appended"] == 2, ack.text
    for _ in range(8):  # two Retriever replicas: every answer sees the acknowledged append
        assert score(client, user).json()["history_len"] == 2
    server.stop()
    for call in (lambda: score(client, 3), lambda: events(client, user, [7]), lambda: client.get("/healthz")):
        t0 = time.monotonic()
        r = call()
        assert r.status_code == 503 and "history store" in r.json()["detail"], (r.status_code, r.text)
        assert time.monotonic() - t0 < 10
    server.start()  # the same port and AOF: every acknowledged event is back
    wait_until(lambda: score(client, user).status_code == 200, 30, "a 200 once Redis is back")
    again = events(client, user, [7])
    assert again.status_code == 200 and again.json()["seq"] == ack.json()["seq"] + 1, again.text
    assert score(client, user).json()["history_len"] == 3


def test_history_writer_sigkilled_under_load_loses_no_acknowledged_event(service):
    client, server, _ = service
    user, acked, stop = 10**7 + 1, [], threading.Event()

    def post_events() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            for item in range(1, 1500):
                if stop.is_set():
                    return
                try:
                    r = events(c, user, [item])
                except httpx.HTTPError:
                    continue  # unacknowledged: the store may or may not hold it
                if r.status_code == 200:
                    acked.append((r.json()["seq"], item))

    thread = threading.Thread(target=post_events)
    thread.start()
    try:
        wait_until(lambda: len(acked) >= 10, 60, "10 acknowledged appends before the kill")
        writer = serve.get_deployment_handle("HistoryWriter", app_name=APP)
        os.kill(writer.pid.remote().result(timeout_s=30), signal.SIGKILL)  # mid-load
        n = len(acked)
        wait_until(lambda: len(acked) >= n + 10, 120, "10 appends acknowledged by the restarted writer", every_s=1)
    finally:
        stop.set()
        thread.join()
    stored = RedisHistoryStore(server.url).history(user, 10**6)[1].tolist()
    assert set(i for _, i in acked) <= set(stored), "an acknowledged event is missing"
    assert stored == sorted(stored) and len(stored) == len(set(stored)), "events applied out of order or twice"
    assert [i for _, i in sorted(acked)] == [i for i in stored if i in {a for _, a in acked}]  # seq order = order
