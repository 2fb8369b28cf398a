"""The app in the "direct" ingress mode (Serve's throughput-optimized preset, serve_app/deploy.py), on its own Ray.

Serve reads the mode from the environment its processes start with, so this module starts a local Ray of its own
and runs in the second pytest process (scripts/test.sh), after the multi-node tests have shut their clusters down.
"""

from __future__ import annotations

import os

import httpx
import pytest
import ray
from ray import serve

from seminar_ray.testing.artefacts import build_artefacts
from serve_app.deploy import DIRECT_ENV, direct_urls, start

pytestmark = [pytest.mark.ownray, pytest.mark.timeout(600)]
PORT = 18767


@pytest.fixture(scope="module")
def direct_app(tmp_path_factory):
    if ray.is_initialized():
        pytest.fail("a Ray instance is already running in this process: the direct mode needs its own")
    art = build_artefacts(tmp_path_factory.mktemp("direct"), num_users=12, min_len=30, max_len=80, model_max_len=64)
    saved = {k: os.environ.get(k) for k in (*DIRECT_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")}
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # shutdown waits out the drain
    args = {
        "checkpoint": str(art.checkpoint),
        "index": str(art.index),
        "data": str(art.data),
        "store": str(art.store),
        "limits": {"max_candidates": 20},
    }
    try:
        start(args, port=PORT, ingress="direct", options={"Retriever": {"num_replicas": 2, "autoscaling_config": None}})
        yield direct_urls()
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_each_ingress_replica_answers_on_its_own_port_like_the_proxy(direct_app):
    urls = direct_app
    assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
    assert f"http://127.0.0.1:{PORT}" not in urls
    body = {"user_id": 3, "candidates": list(range(1, 11))}
    answers = [httpx.post(f"{u}/v1/score", json=body, timeout=60) for u in [*urls, f"http://127.0.0.1:{PORT}"]]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    scores = [r.json()["scores"] for r in answers]
    assert len(scores[0]) == 10
    assert scores[1] == pytest.approx(scores[0]) and scores[2] == pytest.approx(scores[0])


def test_bad_requests_get_4xx_on_a_direct_port(direct_app):
    url = direct_app[0]
    too_many = httpx.post(f"{url}/v1/score", json={"user_id": 1, "candidates": list(range(1, 30))}, timeout=60)
    malformed = httpx.post(f"{url}/v1/score", json={"user_id": "x"}, timeout=60)
    assert too_many.status_code == 422 and "limit" in too_many.text
    assert malformed.status_code == 422
