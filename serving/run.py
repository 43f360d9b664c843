"""`fldd serve`: the generation endpoint on a local Ray cluster (or an existing one) until Ctrl-C
or SIGTERM, then Serve is shut down and, when this process started the cluster, the cluster too."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from fldd.config import CONFIG_DIR
from pipelines.cluster import init_ray
from pipelines.logs import requiet
from serving.app import build_app

DEFAULT_CONFIG = CONFIG_DIR / "serve.yaml"


def read_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(http_options, the first application) of a Serve config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config {str(path)!r} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    applications = config.get("applications") if isinstance(config, dict) else None
    if not applications or not isinstance(applications, list):
        raise ValueError(f"{path}: expected a Ray Serve config with an `applications:` list")
    return dict(config.get("http_options") or {}), dict(applications[0])


@dataclass
class Endpoint:
    """A running application: where it listens, and how to take it away again."""

    name: str
    url: str
    models: list[str]
    own_cluster: bool  # this process started the Ray cluster (then stop() stops Serve and the cluster)

    def example_curl(self, steps: int | None = None) -> str:
        """A generation request to paste; `steps` names a served budget (default: the champion's)."""
        budget = "" if steps is None else f'\"steps\": {steps}, '
        return (f"curl -s -X POST {self.url}/v1/generate -H 'Content-Type: application/json' "
                f"-d '{{\"num_samples\": 4, {budget}\"seed\": 0}}'")

    def stop(self) -> None:
        try:
            if self.own_cluster:
                serve.shutdown()
            else:  # someone else's cluster: take only this app away
                serve.delete(self.name)
        finally:
            if self.own_cluster:
                ray.shutdown()


def start_endpoint(config: str | Path = DEFAULT_CONFIG, *, models: list[str] | None = None, port: int | None = None,
                   host: str | None = None, address: str | None = None, overrides: dict[str, Any] | None = None,
                   app_name: str | None = None) -> Endpoint:
    """Deploy the app of a Serve config (its `args` updated with `overrides`, one level deep) on the
    Ray cluster this process is connected to, a cluster at `address`, or a new local one, under the
    config's application name or `app_name`; return once it is deployed."""
    http, application = read_serve_config(config)
    args = dict(application.get("args") or {})
    for key, value in (overrides or {}).items():  # {"limits": {...}} keeps the file's other limits
        args[key] = {**args[key], **value} if isinstance(value, dict) and isinstance(args.get(key), dict) else value
    if models:
        args["models"] = list(models)
    host = host or http.get("host") or "127.0.0.1"
    port = int(port if port is not None else http.get("port", 8000))
    name, prefix = app_name or application.get("name", "fldd"), application.get("route_prefix", "/")
    # the HTTP proxy misses Serve's 5 s readiness checks on a busy 2-core box (STACK_NOTES);
    # it must be in the environment before Ray starts
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    requiet()  # Ray Serve set its driver logger to INFO when it was imported
    app = build_app(args)  # settings errors before any cluster starts
    own_cluster = not (ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"))
    init_ray(address, log_to_driver=False)
    endpoint = Endpoint(name, f"http://{host}:{port}{prefix.rstrip('/')}", list(args.get("models") or []), own_cluster)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=name, route_prefix=prefix)
    except BaseException:
        endpoint.stop()
        raise
    return endpoint


def serve_until_stopped(config: str | Path = DEFAULT_CONFIG, *, models: list[str] | None = None,
                        port: int | None = None, host: str | None = None, address: str | None = None) -> int:
    """Start the app, print its URL and an example request, and block until Ctrl-C / SIGTERM."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # one path out for Ctrl-C and SIGTERM: the finally below

    signal.signal(signal.SIGTERM, stop)  # replaces Ray's handler, which would exit without cleanup
    endpoint = None
    try:
        endpoint = start_endpoint(config, models=models, port=port, host=host, address=address)
        signal.signal(signal.SIGTERM, stop)  # again: ray.init installed its own handler, which exits without cleanup
        print(f"fldd serve: serving {endpoint.models} at {endpoint.url} (API docs: {endpoint.url}/docs; "
              f"readiness: {endpoint.url}/readyz)\n  {endpoint.example_curl()}\nCtrl-C or SIGTERM stops it.",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("fldd serve: stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        if endpoint is not None:
            endpoint.stop()
    return 0
