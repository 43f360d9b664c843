"""Load test of the generation endpoint on the loopback interface (bounded in requests and time).

For one registered model at T=4 (`--model-name`, or a tiny toy2d model trained and promoted into a
temporary store when none is given), in one run:
- the in-process sampler (fldd.service.SamplerService) at batch sizes 1, 8 and 32;
- the Serve endpoint at client concurrency 1, 8 and 32 (one sample per request), throughput and
  p50 / p99 latency, and 5xx counts; then again at concurrency 32 with max_batch_size=1;
- MLflow's scoring server on the same registered model (`mlflow models serve --env-manager local`)
  at the same concurrencies, same requests.

The client (this process: `requests` in threads) runs on the same machine as the servers and takes
CPU from them; each measurement records its CPU time (client_cpu_s, client_cpu_ms_per_request) and
the load average before it, so that numbers from a shared or small box can be read with that in mind.

    python -m benchmarks.serve_load --requests 2000 --out docs/results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import requests  # noqa: E402
import torch  # noqa: E402

from pipelines.vocabulary import champion_alias  # noqa: E402
from serving.settings import ServeSettings  # noqa: E402

T = 4
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds() -> float:
    """CPU time of this process (all its threads), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(send, count: int, concurrency: int, time_limit: float) -> dict:
    """`count` calls of send(i) -> status code from `concurrency` threads, stopping at time_limit."""
    latencies, statuses = [], []
    load_average = os.getloadavg()[0]
    deadline = time.monotonic() + time_limit

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        try:
            status = send(i)
        except requests.RequestException:
            status = 0
        latencies.append(time.perf_counter() - start)
        statuses.append(status)

    start, cpu = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"concurrency": concurrency, "requests": len(statuses), "wall_s": round(wall, 3),
            "throughput_rps": round(len(statuses) / wall, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 2) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
            "ok": statuses.count(200), "http_5xx": sum(500 <= s < 600 for s in statuses),
            "failed": sum(s != 200 for s in statuses),
            # the client shares the machine: its CPU is CPU the server did not get
            "client_cpu_s": round(cpu, 2), "client_cpu_ms_per_request": round(1000 * cpu / max(len(statuses), 1), 2),
            "load_average_1m_before": round(load_average, 2)}


def tiny_champion(name: str) -> None:
    """Train and promote a small toy2d T=4 model into the current FLDD_HOME."""
    from fldd.config import CONFIG_DIR, FLDDConfig
    from pipelines import registry
    from pipelines.train import LaunchOptions, launch

    cfg = FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides(
        {"process.num_steps": T, "train.steps": 200, "train.checkpoint_every": 200, "train.log_every": 200,
         "data.num_train": 4000, "data.num_valid": 500})
    run_id = launch(cfg, LaunchOptions(workers=0, quiet=True, name="serve-load")).run_id
    (decision,) = registry.promote(run_id=run_id, model_name=name, passes=1)
    assert decision.promoted, decision


def in_process(uri: str, name: str, version: str, count: int) -> list[dict]:
    from fldd.service import GenerationRequest, SamplerService
    from serving.registry import load_registered_model

    service = SamplerService(load_registered_model(uri, name, version))
    rows = []
    for batch in CONCURRENCY:
        prepared = [service.prepare(GenerationRequest(num_samples=1, seed=i)) for i in range(batch)]
        service.generate(prepared)  # warm-up
        start, served = time.perf_counter(), 0
        while served < count:
            service.generate(prepared)
            served += batch
        wall = time.perf_counter() - start
        rows.append({"batch_size": batch, "requests": served, "throughput_rps": round(served / wall, 1)})
    return rows


def serve_endpoint(args, uri: str, url: str, max_batch_size: int, concurrencies) -> list[dict]:
    """Deploy the app with this batch size (replacing the previous one) and load it."""
    from ray import serve

    from serving.app import build_app

    # one replica, whatever the CPU count: comparable across machines and with the scoring server
    app_args = {"models": [args.model_name], "tracking_uri": uri, "limits": {"max_num_samples": 64},
                "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
                "deployment": {"num_replicas": 1, "max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 0}}}
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    deadline = time.monotonic() + 120
    while requests.get(url + "/readyz", timeout=30).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the endpoint did not become ready")
        time.sleep(0.5)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))

    shared: list[int] = []  # batch_requests of each response: how many requests shared its pass

    def send(i: int) -> int:
        body = {"num_samples": 1, "steps": T, "seed": i}
        response = session.post(url + "/v1/generate", json=body, timeout=60)
        if response.status_code == 200:
            shared.append(response.json()["batch_requests"])
        return response.status_code

    load(send, 50, 8, 30)  # warm-up
    rows = []
    for concurrency in concurrencies:
        shared.clear()
        row = load(send, args.requests, concurrency, args.time_limit)
        rows.append({"max_batch_size": max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s, **row,
                     "mean_batch_requests": round(sum(shared) / len(shared), 2) if shared else None})
    return rows


def mlflow_server(args, uri: str, concurrencies) -> list[dict]:
    port = free_port()
    # the scoring server execs `uvicorn` through bash: the venv's bin must be on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                f"models:/{args.model_name}@{champion_alias(T)}", "--env-manager", "local", "-h",
                                "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(url + "/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("mlflow models serve did not start")
            time.sleep(1)
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))

        def send(i: int) -> int:
            body = {"inputs": [], "params": {"num_samples": 1, "steps": T, "seed": i}}
            return session.post(url + "/invocations", json=body, timeout=60).status_code

        load(send, 20, 4, 30)
        return [load(send, args.requests, c, args.time_limit) for c in concurrencies]
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", help="registered model with a champion-t4 (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per measurement at most")
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out MLflow's scoring server")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=ServeSettings.batch_wait_timeout_s,
                        help="batching.batch_wait_timeout_s of the Serve app (default: the settings default)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve_load.json"))
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    from pipelines.cluster import start_local_ray

    home = None
    if args.model_name is None:
        home = tempfile.mkdtemp(prefix="fldd-serve-load-")
        os.environ["FLDD_HOME"] = home
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        args.model_name = "serve-load-toy2d"
    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    start_local_ray(log_to_driver=False)
    if home is not None:
        tiny_champion(args.model_name)
    version = MlflowClient(uri).get_model_version_by_alias(args.model_name, champion_alias(T)).version
    result = {"model": args.model_name, "version": str(version), "steps": T, "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),  # the box may be shared
              "caveat": "client and servers share the machine's CPUs: client_cpu_s is taken from the servers",
              "in_process": in_process(uri, args.model_name, str(version), args.requests)}
    print(json.dumps(result["in_process"], indent=1), flush=True)
    from ray import serve

    port = free_port()  # HTTP options are fixed once Serve runs: one port for both deployments
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    result["serve"] = serve_endpoint(args, uri, url, 16, CONCURRENCY)
    print(json.dumps(result["serve"], indent=1), flush=True)
    result["serve_no_batching"] = serve_endpoint(args, uri, url, 1, (32,))
    print(json.dumps(result["serve_no_batching"], indent=1), flush=True)
    if not args.skip_mlflow:
        result["mlflow_scoring_server"] = mlflow_server(args, uri, CONCURRENCY)
        print(json.dumps(result["mlflow_scoring_server"], indent=1), flush=True)
    in32 = next(r for r in result["in_process"] if r["batch_size"] == 32)["throughput_rps"]
    http32 = next(r for r in result["serve"] if r["concurrency"] == 32)
    result["targets"] = {
        "http_vs_in_process_at_32": round(http32["throughput_rps"] / in32, 3),
        "batching_vs_batch_size_1_at_32": round(http32["throughput_rps"]
                                                / result["serve_no_batching"][0]["throughput_rps"], 2),
        "http_5xx_at_32": http32["http_5xx"],
    }
    if "mlflow_scoring_server" in result:
        mlflow32 = next(r for r in result["mlflow_scoring_server"] if r["concurrency"] == 32)
        result["targets"]["vs_mlflow_scoring_server_at_32"] = round(http32["throughput_rps"]
                                                                    / max(mlflow32["throughput_rps"], 1e-9), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=1))
    import ray

    serve.shutdown()
    ray.shutdown()
    if home is not None:  # the temporary store of the tiny model
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
