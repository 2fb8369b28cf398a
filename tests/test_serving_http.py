"""The Ray Serve application over real HTTP on 127.0.0.1, one Serve instance for the module.

(Serve's local testing mode cannot run it: @serve.batch calls serve.get_replica_context(), which local testing mode
lacks in Ray 2.60; the stages themselves are tested without Serve in test_serving.py.)
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from ray import serve

from seminar_ray.serving import Limits, ScoreRequest
from seminar_ray.serving.history import LogHistoryStore
from seminar_ray.testing.artefacts import build_artefacts
from seminar_ray.testing.polling import wait_until
from serve_app.app import compose
from serve_app.deploy import REQUEST_TIMEOUT_S

PORT = 18765
APP = "seminar"
OPTIONS = {"Retriever": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 4}}}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_http")
    a = build_artefacts(root, num_users=20, min_len=30, max_len=80, model_max_len=64)
    b = build_artefacts(root, num_users=20, min_len=30, max_len=80, model_max_len=64, seed=1, name="ckpt-b")
    return a, b


def app_args(art, **more) -> dict:
    return {
        "checkpoint": str(art.checkpoint),
        "index": str(art.index),
        "data": str(art.data),
        "store": str(art.store),
        "limits": {"max_candidates": 50, "max_query_chars": 64},
        **more,
    }


@pytest.fixture(scope="module")
def service(ray_local, artefacts):
    serve.start(http_options={"host": "127.0.0.1", "port": PORT, "request_timeout_s": REQUEST_TIMEOUT_S})
    serve.run(compose(app_args(artefacts[0]), OPTIONS), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
        yield client, artefacts
    serve.shutdown()


def score(client, user_id=1, candidates=(1, 2, 3), **extra):
    return client.post("/v1/score", json={"user_id": user_id, "candidates": list(candidates), **extra})


def test_score_events_and_read_your_writes(service):
    client, (a, _) = service
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"].startswith("ckpt-a@")
    r = score(client, user_id=3, candidates=range(1, 21), return_topk=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["scores"]) == 20 and all(0 < s < 1 for s in body["scores"])
    assert body["index_version"] == health["index_version"] and body["history_len"] > 0
    assert len(body["topk"]) == 20
    cold = score(client, user_id=10**7, candidates=[5, 6])
    assert cold.status_code == 200 and cold.json()["history_len"] == 0  # cold start, not an error
    ack = client.post("/v1/events", json={"user_id": 10**7, "events": [{"item_id": 5}, {"item_id": 9, "query": 2}]})
    assert ack.status_code == 200 and ack.json()["appended"] == 2 and ack.json()["model_version"]
    after = score(client, user_id=10**7, candidates=[5, 6], return_topk=True).json()
    assert after["history_len"] == 2 and after["topk"][0][:2] in ([0, 1], [1, 0])  # the acknowledged events
    by_handle = serve.get_app_handle(APP).score.remote(ScoreRequest(user_id=3, candidates=list(range(1, 21))))
    assert by_handle.result(timeout_s=60).scores == pytest.approx(body["scores"])  # the same path without HTTP


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"user_id": 1, "candidates": [10**6]}, "unknown candidate item id"),
        ({"user_id": 1, "candidates": list(range(1, 52))}, "limit is 50"),
        ({"user_id": 1, "query": "q" * 65, "candidates": [1]}, "limit is 64"),
        ({"user_id": 1, "query": 10**6, "candidates": [1]}, "unknown query id"),
        ({"user_id": "one", "candidates": [1]}, "user_id"),
        ({"candidates": [1]}, "user_id"),
        ({"user_id": 1, "candidates": []}, "candidates"),
    ],
)
def test_bad_score_requests_get_4xx_with_a_message(service, body, fragment):
    r = service[0].post("/v1/score", json=body)
    assert 400 <= r.status_code < 500 and fragment in r.text, (r.status_code, r.text)


def test_bad_bodies_and_events_get_4xx(service):
    client = service[0]
    r = client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/events", json={"user_id": 1, "events": [{"item_id": 10**6}]})
    assert r.status_code == 422 and "unknown event item id" in r.text
    assert score(client).status_code == 200  # and nothing broke


class Load:
    """Closed-loop background load; records (answered at, status, model version or error, sent at) of every request."""

    def __init__(self, client_url: str, workers: int = 3):
        self.url, self.results, self.stop = client_url, list[tuple](), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(workers)]

    def _run(self, w: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.time()
                try:
                    r = score(client, user_id=w, candidates=range(1, 11))
                    self.results.append(
                        (
                            time.time(),
                            r.status_code,
                            r.json().get("model_version") if r.status_code == 200 else r.text,
                            sent,
                        )
                    )
                except httpx.HTTPError as e:
                    self.results.append((time.time(), -1, repr(e), sent))

    def since(self, t: float) -> list[tuple]:
        """The results of the requests answered after time `t` (time.time())."""
        return [r for r in list(self.results) if r[0] > t]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def replica_states(deployment: str) -> dict:
    return dict(serve.status().applications[APP].deployments[deployment].replica_states)


def retriever_actors() -> dict[str, str]:
    """name → namespace of every live Retriever replica actor."""
    import ray

    return {
        a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Retriever#" in a["name"]
    }


def replaced(before) -> bool:
    """A new retriever replica exists (so the controller has noticed the kill) and two replicas run, none starting."""
    return bool(retriever_actors().keys() - before) and replica_states("Retriever") == {"RUNNING": 2}


def test_checkpoint_roll_without_failed_requests(service):
    client, (a, b) = service
    with Load(str(client.base_url)) as load:
        wait_until(lambda: len(load.since(0)) >= 10, 60, "10 answers from the first checkpoint before the roll")
        serve.run(compose(app_args(b, store=str(a.store)), OPTIONS), name=APP, route_prefix="/")
        # the roll starts new replicas: 20-80 s each on a loaded shared machine
        wait_until(lambda: str(load.results[-1][2]).startswith("ckpt-b@"), 180, "answers from the rolled-in checkpoint")
        rolled_at = time.time()
        wait_until(lambda: len(load.since(rolled_at)) >= 10, 60, "10 answers after the roll, old replicas draining")
    failed = [r for r in load.results if r[1] != 200]
    assert not failed, failed[:3]
    versions = [r[2] for r in load.results]
    assert versions[0].startswith("ckpt-a@") and versions[-1].startswith("ckpt-b@"), (versions[:2], versions[-2:])
    assert client.get("/healthz").json()["index_version"].startswith("ckpt-b")


def test_retriever_replica_killed_under_load_recovers(service):
    import ray

    client = service[0]
    before = retriever_actors()
    assert len(before) == 2, before
    victim = sorted(before)[0]
    with Load(str(client.base_url)) as load:
        wait_until(lambda: len(load.since(0)) >= 10, 60, "10 answers before the kill")
        killed_at = time.time()
        ray.kill(ray.get_actor(victim, namespace=before[victim]), no_restart=True)
        # a replica start takes 20-80 s when the shared machine is loaded
        wait_until(lambda: replaced(before.keys()), 180, "Serve to replace the killed Retriever replica", every_s=0.5)
        replaced_at = time.time()
        wait_until(lambda: len(load.since(replaced_at)) >= 20, 60, "20 answers after the replacement")
    # Requests in flight at the kill may fail, but with an answer from Serve (a 5xx, or 408 once Serve's
    # request_timeout_s has passed), not by hanging until the client's own 60 s timeout; every request sent once the
    # replacement runs must succeed.
    after = [r for r in load.results if r[3] > replaced_at]
    assert after and all(r[1] == 200 for r in after), [r for r in after if r[1] != 200][:3]
    failed = [r for r in load.results if r[1] != 200]
    assert all(r[0] > killed_at and r[3] < replaced_at for r in failed), failed[:3]  # only casualties of the kill
    assert all(r[1] >= 408 and r[0] - r[3] < REQUEST_TIMEOUT_S + 5 for r in failed), failed[:3]  # bounded answers
    assert len(failed) < 0.2 * len(load.results), failed[:3]


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class Sleeper:
    """Holds every request far past Serve's request timeout, reporting its pid first."""

    async def __call__(self, request) -> str:
        import asyncio

        await asyncio.sleep(600)
        return "late"

    def pid(self) -> int:
        return os.getpid()


def test_request_held_by_a_killed_replica_answers_within_the_request_timeout(service):
    """A request in flight to a replica that dies gets Serve's answer (408 or 5xx) within request_timeout_s, not
    the client's own 60 s timeout; a request a live replica holds too long gets 408 at request_timeout_s."""
    client = service[0]
    handle = serve.run(Sleeper.bind(), name="sleeper", route_prefix="/sleep")
    try:
        t0 = time.monotonic()
        held = client.get("/sleep")
        assert held.status_code == 408 and REQUEST_TIMEOUT_S - 1 < time.monotonic() - t0 < REQUEST_TIMEOUT_S + 5
        answer = {}

        def call() -> None:
            t0 = time.monotonic()
            r = client.get("/sleep")
            answer.update(status=r.status_code, text=r.text, seconds=time.monotonic() - t0)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(1.0)  # the request is now held by the replica
        os.kill(handle.pid.remote().result(timeout_s=30), signal.SIGKILL)
        thread.join(timeout=REQUEST_TIMEOUT_S + 30)
        assert answer and answer["status"] in (408, 500, 502, 503, 504), answer
        assert answer["seconds"] < REQUEST_TIMEOUT_S + 5, answer
    finally:
        serve.delete("sleeper")


def test_history_writer_sigkill_keeps_every_acknowledged_event(service):
    client, (a, _) = service
    user = 10**7 + 1
    acked = []
    for n in range(5):
        r = client.post("/v1/events", json={"user_id": user, "events": [{"item_id": 10 + n, "timestamp": n}]})
        assert r.status_code == 200
        acked.append(r.json()["seq"])
    writer = serve.get_deployment_handle("HistoryWriter", app_name=APP)
    os.kill(writer.pid.remote().result(), signal.SIGKILL)  # right after the acknowledgements

    def append_99():
        r = client.post("/v1/events", json={"user_id": user, "events": [{"item_id": 99}]})
        return r if r.status_code == 200 else None

    # Serve restarts the writer; appends resume with the next seq
    r = wait_until(append_99, 90, "the restarted HistoryWriter to acknowledge an append", every_s=1)
    assert r.json()["seq"] == acked[-1] + 1
    q, items = LogHistoryStore(a.store).history(user, 100)
    assert items.tolist() == [10, 11, 12, 13, 14, 99]
    assert score(client, user_id=user, candidates=[1]).json()["history_len"] == 6


def test_fuzzed_requests_get_4xx_with_a_message_never_5xx_and_the_log_holds_exactly_the_acks(service):
    """2,000 generated requests (bench/fuzz.py's hypothesis strategies), valid and malformed: ids and timestamps past
    int64, NaN / Infinity / 1e400, wrong types, missing and unknown fields, lists past the limits, non-JSON bodies."""
    from bench.fuzz import Space, fuzz

    client, (a, _) = service
    out = fuzz(
        str(client.base_url), Space.load(a.data, Limits(max_candidates=50, max_query_chars=64)), a.store, requests=2000
    )
    summary = out.summary()
    assert out.requests >= 2000 and not out.problems, summary
    assert summary["responses_5xx"] == 0 and out.lost_events == 0 and out.unacknowledged_in_log == 0
    for path in ("/v1/score", "/v1/events"):  # both routes saw accepted and refused requests
        assert out.status[f"{path} 200"] > 100 and out.status[f"{path} 422"] > 100, summary
    assert len(out.acked) == out.status["/v1/events 200"]
