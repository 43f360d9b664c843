"""Quality per millisecond: each served champion's test quality against its latency and throughput over HTTP.

The runs are the registry gate's (`benchmarks/gate_table.py`): per step budget T, the fixed forward's
winner (`masked-x0`) and a learned forward's winner, trained on one report seed and judged on the
test split. This script registers them as the champions of two models in that same store, one per
forward (`qpm-<dataset>-fixed`, `qpm-<dataset>-<learned>`: version per T, each the first at its
budget), serves both from one endpoint (the product's Serve app, local Ray), and measures, per model
and T, over HTTP on the loopback interface:
- latency at concurrency 1 (one-sample requests): p50 and p99, milliseconds, client side;
- throughput at concurrency 32 with 64-sample requests: samples per second.
Quality is the gate's recorded test NELBO (bits/token, 10 passes, the same test rows for both forwards).

The number to quote (`headline`): at the quality the fixed forward reaches at its largest T, how many
samples per second the learned forward serves, as a ratio to the fixed forward at that T; the learned
budget is the fewest steps whose NELBO is at or below it (null where none is).

The client is this process (`requests` in threads) on the same 2 cores as the servers; its CPU time
per measurement is recorded (client_cpu_share: CPU seconds / wall seconds / cores). Not measured
here: a non-Python load generator (wrk, hey) and the bare-FastAPI and MLflow-scoring floors (see
benchmarks/serve_load.py for the latter).

    python -m benchmarks.quality_per_ms --gate docs/results/gate_toy2d.json --out docs/results/quality_per_ms.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED = "masked-x0"


def headline(rows: list[dict], learned: str) -> dict:
    """The learned forward's throughput at the fixed forward's best quality, as a ratio (see the module doc).
    `rows`: {"forward", "steps", "test_nelbo_bits", "samples_per_s"} per served champion."""
    fixed = max((r for r in rows if r["forward"] == FIXED), key=lambda r: r["steps"])
    reaching = sorted((r for r in rows if r["forward"] == learned and r["test_nelbo_bits"] <= fixed["test_nelbo_bits"]),
                      key=lambda r: r["steps"])
    if not reaching:
        return {"fixed_steps": fixed["steps"], "quality": fixed["test_nelbo_bits"], "learned_steps": None, "ratio": None}
    best = reaching[0]
    return {"fixed_steps": fixed["steps"], "quality": fixed["test_nelbo_bits"], "learned_steps": best["steps"],
            "ratio": best["samples_per_s"] / fixed["samples_per_s"]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, model: str, steps: int, single: int, batched: int) -> dict:
    """Latency at concurrency 1 and throughput at concurrency 32 (64-sample requests) for one champion."""
    import requests

    session = requests.Session()

    def post(body: dict) -> float:
        start = time.perf_counter()
        response = session.post(f"{url}/v1/generate", json=body, timeout=120)
        response.raise_for_status()
        return time.perf_counter() - start

    post({"model": model, "steps": steps, "num_samples": 1, "seed": 0})  # load the version on the replica
    clock, cpu = time.perf_counter(), cpu_seconds()
    latencies = sorted(post({"model": model, "steps": steps, "num_samples": 1, "seed": i}) for i in range(single))
    single_wall, single_cpu = time.perf_counter() - clock, cpu_seconds() - cpu
    clock, cpu = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: requests.post(f"{url}/v1/generate", timeout=300, json={
            "model": model, "steps": steps, "num_samples": 64, "seed": i}).raise_for_status(), range(batched)))
    batched_wall, batched_cpu = time.perf_counter() - clock, cpu_seconds() - cpu
    cores = os.cpu_count() or 1
    return {"p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "samples_per_s": 64 * batched / batched_wall,
            "client_cpu_share": {"concurrency_1": single_cpu / single_wall / cores,
                                 "concurrency_32": batched_cpu / batched_wall / cores}}


def plot(rows: list[dict], learned: str, dataset: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for forward, style in ((FIXED, "s--"), (learned, "o-")):
        mine = sorted((r for r in rows if r["forward"] == forward), key=lambda r: r["steps"])
        for ax, key, label in ((axes[0], "p50_ms", "p50 latency, 1 sample, concurrency 1 (ms)"),
                               (axes[1], "samples_per_s", "samples/s, 64-sample requests, concurrency 32")):
            ax.plot([r[key] for r in mine], [r["test_nelbo_bits"] for r in mine], style, label=forward)
            for r in mine:
                ax.annotate(f"T={r['steps']}", (r[key], r["test_nelbo_bits"]), fontsize=7)
            ax.set_xlabel(label)
    axes[0].set_ylabel("test NELBO (bits/token), lower is better")
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.suptitle(f"{dataset}: quality against serving cost (one endpoint, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", type=Path, required=True, help="a gate_table.py results JSON")
    parser.add_argument("--home", type=Path, help="the project home of those runs (default .fldd/gate-<dataset>)")
    parser.add_argument("--learned", default="fldd-mask-carry", help="which learned forward's runs to serve")
    parser.add_argument("--single", type=int, default=100, help="one-sample requests per champion, concurrency 1")
    parser.add_argument("--batched", type=int, default=128, help="64-sample requests per champion, concurrency 32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.gate.is_file():
        parser.error(f"--gate {args.gate}: no such file (run benchmarks/gate_table.py first)")
    gate = json.loads(args.gate.read_text())
    dataset = gate["dataset"]
    cells = [c for c in gate["cells"] if c["learned"]["method"] == args.learned]
    if not cells:
        parser.error(f"--gate has no cell for {args.learned!r}")
    home = (args.home or ROOT / ".fldd" / f"gate-{dataset}").resolve()
    if not (home / "mlflow.db").is_file():
        parser.error(f"--home {home}: no mlflow.db (the store gate_table.py trained into)")
    os.environ.update(FLDD_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db",
                      MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

    from pipelines import registry
    from serving.run import start_endpoint

    names = {FIXED: f"qpm-{dataset}-fixed", args.learned: f"qpm-{dataset}-{args.learned}"}
    quality = {}
    for cell in cells:
        T = cell["steps"]
        for forward, run_id, bits in ((FIXED, cell["fixed"]["run_id"], cell["gate"]["holder_test_nelbo_bits"]),
                                      (args.learned, cell["learned"]["run_id"], cell["gate"]["test_nelbo_bits"])):
            # 10 passes, as the gate: a quality-routed request against these models routes on those values
            (decision,) = registry.promote(run_id=run_id, model_name=names[forward], passes=10)
            if decision.decision not in (registry.PROMOTED, registry.UNCHANGED):
                raise SystemExit(f"{forward} T={T}: {decision.decision}: {decision.reason}")
            quality[(forward, T)] = bits
    print(f"registered {sorted(names.values())} at T={sorted(c['steps'] for c in cells)} in {home}", flush=True)

    endpoint = start_endpoint(models=list(names.values()), port=free_port(), overrides={
        "poll_interval_s": 2, "deployment": {"autoscaling_config": None, "num_replicas": 1}})
    rows = []
    try:
        import requests

        deadline = time.time() + 300
        while requests.get(f"{endpoint.url}/readyz", timeout=30).status_code != 200:
            if time.time() > deadline:
                raise SystemExit("the endpoint did not become ready in 300 s")
            time.sleep(1)
        for (forward, T), bits in sorted(quality.items(), key=lambda item: (item[0][1], item[0][0])):
            measured = measure(endpoint.url, names[forward], T, args.single, args.batched)
            rows.append({"forward": forward, "steps": T, "test_nelbo_bits": bits, **measured})
            print(f"  {forward:>16} T={T:<3} test NELBO {bits:.4f}  p50 {measured['p50_ms']:6.1f} ms  "
                  f"{measured['samples_per_s']:8.0f} samples/s", flush=True)
    finally:
        endpoint.stop()
    top = headline(rows, args.learned)
    record = {"command": "python -m benchmarks.quality_per_ms " + " ".join(argv if argv is not None else sys.argv[1:]),
              "dataset": dataset, "gate_file": str(args.gate), "learned": args.learned,
              "requests": {"single": args.single, "batched": args.batched, "batched_samples": 64},
              "cores": os.cpu_count(), "rows": rows, "headline": [{"dataset": dataset, "ratio": top["ratio"], **top}]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    picture = plot(rows, args.learned, dataset, ROOT / "docs" / "plots" / f"{args.out.stem}_{dataset}.png")
    print(f"headline: {top}\nwrote {args.out}, {picture}")


if __name__ == "__main__":
    main()
