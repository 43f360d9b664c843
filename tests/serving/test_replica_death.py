"""A serving replica dies under load (issue 28, item 4), for real: the app with two replicas behind
Serve's HTTP proxy, four clients sending requests back to back, and one replica's actor killed with
`ray.kill`. Bound: no more requests fail than were in flight (at most one per client, four), the
replica is replaced, and /readyz stays honest throughout (the surviving replica can serve, so 200)."""

import threading
import time

import pytest
import ray
import requests
from ray import serve

from serving.app import build_app
from tests.serving.conftest import ARGS, Client, wait_for

APP, PREFIX, CLIENTS = "fldd-two-replicas", "/two", 4


def replica_actor_names() -> list[str]:
    """Serve names each replica's actor SERVE_REPLICA::<app>#<deployment>#<id> in namespace "serve"."""
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments["GenerationServer"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_at_most_its_in_flight_requests_and_is_replaced(server):
    base, *_ = server
    serve.run(build_app({**ARGS, "deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}}),
              name=APP, route_prefix=PREFIX)
    client = Client(base.url + PREFIX)
    try:
        wait_for(lambda: running_replicas() == 2 and client.get("/readyz").status_code == 200, 180, "two replicas")
        before = replica_actor_names()
        assert len(before) == 2
        outcomes: list[tuple[float, float, int | str]] = []  # (sent, answered, status code or client-side error)
        readiness: list[tuple[int, bool] | str] = []
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status: int | str = client.post({"num_samples": 2}).status_code
                except requests.RequestException as error:
                    status = type(error).__name__
                outcomes.append((sent, time.monotonic(), status))

        def watch_readiness() -> None:
            while not stop.is_set():
                try:
                    response = client.get("/readyz")
                    readiness.append((response.status_code, response.json().get("ready", False)))
                except (requests.RequestException, ValueError) as error:  # recorded: the test fails on it
                    readiness.append(f"{type(error).__name__}: {error}")
                time.sleep(0.2)

        threads = [threading.Thread(target=stream) for _ in range(CLIENTS)] + [threading.Thread(target=watch_readiness)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(outcomes) >= 20, 60, "requests before the kill")
            killed_at = time.monotonic()
            ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            wait_for(lambda: before[0] not in replica_actor_names() and len(replica_actor_names()) == 2
                     and running_replicas() == 2, 180, "the killed replica replaced")
            replaced_at = time.monotonic()
            wait_for(lambda: sum(t > replaced_at for _, t, _ in outcomes) >= 20, 60, "requests after the replacement")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        failed = [(sent, status) for sent, _, status in outcomes if status != 200]
        after_kill = [status for sent, _, status in outcomes if sent > killed_at]
        between = [status for sent, answered, status in outcomes if sent > killed_at and answered < replaced_at]
        print(f"{len(outcomes)} requests, {len(after_kill)} after the kill, failed: {failed}; "
              f"replaced in {replaced_at - killed_at:.1f} s; /readyz answers: {len(readiness)}")
        assert len(failed) <= CLIENTS, failed  # at most the requests in flight on the killed replica
        assert all(sent < killed_at for sent, _ in failed), failed  # none routed to it after it died
        assert between.count(200) >= 1  # the surviving replica served while the other was replaced
        assert after_kill.count(200) >= 20
        assert readiness and all(r == (200, True) for r in readiness), readiness
        assert set(replica_actor_names()) - set(before)  # a new replica, not the old one back
    finally:
        serve.delete(APP)
