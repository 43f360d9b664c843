"""`fldd demo`: the whole product on one machine, on embedded defaults.

    sweep (Ray Tune + Ray Train)  ->  promotion (MLflow registry gate)  ->  Ray Serve endpoint  ->  HTTP requests

Every stage is the product's own code path (tune.sweep.run_sweep, pipelines.registry.promote,
serving.run.start_endpoint); this module only strings them together and reports. Running it twice
reuses what exists: the sweep is named by a digest of its spec (a rerun resumes it, finished trials
are kept), a promotion of the version that already holds an alias changes nothing.

The CLI imports this module to build its parser (DEMO_MODEL): Ray, MLflow, tune, serving and the
pipelines modules that load them are imported inside the functions (`# lazy: start-up time`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from commands.formatting import format_decision, format_table
from fldd.config import CONFIG_DIR
from fldd.data import load_test_split, resolve_data_shape
from pipelines.vocabulary import CHAMPION, FINAL_KL_METRIC

DEMO_SWEEP = CONFIG_DIR / "sweep-demo.yaml"
DEMO_MODEL = "fldd-demo-toy2d"
DEMO_APP = "fldd-demo"  # its own Serve application name: never replaces a `fldd serve` app on a shared cluster
READY_TIMEOUT_S = 180.0


class DemoError(RuntimeError):
    """A stage of the demo did not produce what the next one needs; the message says which."""


@dataclass
class DemoOptions:
    sweep_config: Path = DEMO_SWEEP
    model_name: str = DEMO_MODEL
    train_steps: int | None = None  # optimizer steps (train.steps) of every trial (default: the sweep file's)
    budgets: list[int] | None = None  # step budgets T (default: the sweep file's)
    port: int = 8000
    picture_samples: int = 1000  # samples per budget drawn over HTTP for the picture
    latency_requests: int = 20  # one-sample requests per budget, sent one after another
    keep_serving: bool = False  # after the summary, serve until Ctrl-C instead of stopping
    address: str | None = None
    verbose: bool = False


@dataclass
class BudgetSummary:
    budget: int
    rows: dict[str, Any]  # parameterization -> tune.results.TrialRow (the best finished one)
    kl: dict[str, float]  # parameterization -> exact KL(data || model) in nats, toy2d only
    decision: Any = None  # pipelines.gate.Decision
    latency_ms: list[float] = field(default_factory=list)
    served_version: str | None = None


@dataclass
class DemoOutcome:
    sweep_name: str
    budgets: list[BudgetSummary]
    picture: Path | None = None
    # (parameterization, T) -> where the picture's samples came from: "served vN, over HTTP" or "run ID"
    picture_sources: dict[tuple[str, int], str] = field(default_factory=dict)
    conditional: dict[str, Any] | None = None
    url: str | None = None
    curl: str = ""  # an example request at a served budget
    seconds: dict[str, float] = field(default_factory=dict)  # per stage


def demo_spec(options: DemoOptions):
    """The demo's sweep spec, with the step and budget overrides applied, and its name: the sweep
    file's name plus a digest of the spec, so a changed demo never resumes an old sweep."""
    from tune.spec import SweepSpec  # lazy: start-up time

    data = yaml.safe_load(Path(options.sweep_config).read_text())
    if options.train_steps is not None:
        data.setdefault("set", {})["train.steps"] = options.train_steps
        every = max(1, options.train_steps // 4)
        data["set"].update({"train.checkpoint_every": every, "train.log_every": every})
    if options.budgets:
        data["budgets"] = list(options.budgets)
    source = yaml.safe_dump(data, sort_keys=False)
    spec = SweepSpec.from_dict(data, CONFIG_DIR, source=source, default_name="demo")
    # the digest the sweep itself checks on resume (resolved base config included): a rerun of the
    # same demo resumes, a changed one (new defaults too) is a new sweep instead of a refusal
    spec.name = f"{spec.name}-{spec.digest()[:8]}"
    return spec


def post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise DemoError(f"POST {url} {body}: HTTP {error.code}: {error.read().decode(errors='replace')}") from error


def wait_until_ready(url: str, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll /readyz until every budget's champion is loaded."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}: {error.read().decode(errors='replace')}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = str(error)
        time.sleep(1.0)
    raise DemoError(f"the endpoint at {url} was not ready after {timeout:.0f} s: {last}")


def _best_by_parameterization(rows: list, budget: int) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for row in rows:
        if row.budget != budget or row.status != "finished" or not math.isfinite(row.valid_nelbo_bits):
            continue
        held = best.get(row.parameterization)
        if held is None or row.valid_nelbo_bits < held.valid_nelbo_bits:
            best[row.parameterization] = row
    return best


def run_demo(options: DemoOptions) -> DemoOutcome:
    """Sweep, promote, serve, query; returns what each stage produced. Serve (and the Ray cluster,
    when this call started it) is stopped on return unless options.keep_serving."""
    import ray  # lazy: start-up time
    from mlflow import MlflowClient  # lazy: start-up time

    from pipelines import registry  # lazy: start-up time
    from pipelines.reports import save_samples_by_forward  # lazy: start-up time
    from pipelines.tracking import project_home, tracking_uri  # lazy: start-up time
    from serving.run import start_endpoint  # lazy: start-up time
    from tune.sweep import run_sweep  # lazy: start-up time

    spec = demo_spec(options)
    started_ray = not (ray.is_initialized() or options.address or os.environ.get("RAY_ADDRESS"))
    outcome = DemoOutcome(spec.name, [])
    endpoint = None
    clock = time.perf_counter()
    try:
        # 1. the sweep: every (budget, parameterization) cell trained with Ray Train under Ray Tune
        print(f"\n[1/4] sweep {spec.name!r}: {spec.parameterizations} at T={spec.budgets}, "
              f"{spec.base.train.steps} steps each", flush=True)
        sweep = run_sweep(spec, address=options.address, verbose=options.verbose)
        outcome.seconds["sweep"] = time.perf_counter() - clock
        print(format_table(sweep), flush=True)
        client = MlflowClient(tracking_uri())
        for T in spec.budgets:
            best = _best_by_parameterization(sweep.rows, T)
            if not best:
                errors = "; ".join(f"{r.parameterization}: {r.status} {r.error}".strip() for r in sweep.rows
                                   if r.budget == T)
                raise DemoError(f"sweep {spec.name!r}: no trial finished at T={T} ({errors})")
            kl = {name: client.get_run(row.run_id).data.metrics.get(FINAL_KL_METRIC, math.nan)
                  for name, row in best.items()}
            outcome.budgets.append(BudgetSummary(T, best, kl))

        # 2. promotion: the best trial per budget (on validation) through the registry's test-split gate
        clock = time.perf_counter()
        print(f"\n[2/4] promotion into {options.model_name!r} (paired test-split gate against the current "
              "champion of each budget)", flush=True)
        decisions = registry.promote(sweep=spec.name, model_name=options.model_name)
        for decision in decisions:
            print(format_decision(decision), flush=True)
            for summary in outcome.budgets:
                if summary.budget == decision.budget:
                    summary.decision = decision
        if not any(alias.startswith(CHAMPION) for alias in
                   client.get_registered_model(options.model_name).aliases):
            raise DemoError(f"{options.model_name!r} has no champion: every promotion was refused (see above)")
        outcome.seconds["promote"] = time.perf_counter() - clock

        # 3. the endpoint: Ray Serve over the registry's champion-t<T> aliases
        clock = time.perf_counter()
        print(f"\n[3/4] Ray Serve on 127.0.0.1:{options.port}", flush=True)
        if started_ray:  # on our own fresh cluster, a listener on the port is someone else's server
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", options.port)) == 0:
                    raise DemoError(f"port {options.port} on 127.0.0.1 is in use; pick a free one with --port")
        endpoint = start_endpoint(models=[options.model_name], port=options.port, address=options.address,
                                  app_name=DEMO_APP,
                                  overrides={"poll_interval_s": 2.0,
                                             "limits": {"max_num_samples": max(64, options.picture_samples)}})
        outcome.url = endpoint.url
        ready = wait_until_ready(endpoint.url)
        if options.model_name not in (ready.get("models") or {}):
            raise DemoError(f"{endpoint.url}/readyz answered without {options.model_name!r}: is another server "
                            f"on port {options.port}? Pick a free one with --port")
        served = {int(T): str(v) for T, v in ready["models"][options.model_name].items()}
        outcome.seconds["serve_start"] = time.perf_counter() - clock

        # 4. requests over HTTP: samples per budget, latency, one conditional request
        clock = time.perf_counter()
        print(f"[4/4] requests to {endpoint.url}/v1/generate at T={sorted(served)}", flush=True)
        samples: dict[int, torch.Tensor] = {}
        for summary in outcome.budgets:
            if summary.budget not in served:
                continue
            summary.served_version = served[summary.budget]
            answer = post_json(f"{endpoint.url}/v1/generate",
                               {"num_samples": options.picture_samples, "steps": summary.budget, "seed": 0})
            samples[summary.budget] = torch.tensor(answer["tokens"])
            for i in range(options.latency_requests):
                sent = time.perf_counter()
                post_json(f"{endpoint.url}/v1/generate", {"num_samples": 1, "steps": summary.budget, "seed": i})
                summary.latency_ms.append(1000 * (time.perf_counter() - sent))
        if not samples:
            raise DemoError(f"the endpoint serves none of the budgets {spec.budgets}")
        first = min(samples)
        outcome.curl = endpoint.example_curl(first)
        token = int(torch.mode(samples[first][:, 0]).values)  # a common first coordinate
        given = {"positions": [0], "tokens": [token]}
        try:
            outcome.conditional = post_json(f"{endpoint.url}/v1/generate",
                                            {"num_samples": 8, "steps": first, "seed": 0, "conditioning": given})
        except DemoError as error:  # e.g. a champion whose forward is not masking: the summary still comes
            outcome.conditional = {"error": str(error), "steps": first}
        outcome.conditional["given"] = given
        outcome.seconds["requests"] = time.perf_counter() - clock
        out_dir = project_home() / "demo"
        out_dir.mkdir(parents=True, exist_ok=True)
        by_forward = samples_by_forward(outcome, samples, options, client)
        outcome.picture = save_samples_by_forward(by_forward, resolve_data_shape(spec.base)[0].vocab_size,
                                                  out_dir / f"{spec.name}-samples.png", data=load_test_split(spec.base),
                                                  notes=outcome.picture_sources)
        print(format_summary(outcome, options.model_name), flush=True)
        if options.keep_serving:
            print("\nServing until Ctrl-C.", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                print("stopping Serve", flush=True)
    finally:
        try:
            if endpoint is not None:
                endpoint.stop()  # the application goes away first, gracefully
        finally:
            if started_ray:
                ray.shutdown()  # the demo's own cluster, Serve's controller and proxy with it
    return outcome


def samples_by_forward(outcome: DemoOutcome, served_samples: dict[int, torch.Tensor], options: DemoOptions,
                       client: Any) -> dict[str, dict[int, torch.Tensor]]:
    """Samples of every parameterization's best trial at every budget, for the picture: the served
    champion's as drawn over HTTP, the others drawn here from their runs' models by the same
    sampler service (seed 0, as the HTTP request). Records where each came from in the outcome."""
    from fldd.model import FLDDModel  # lazy: start-up time
    from fldd.service import GenerationRequest, Limits, SamplerService  # lazy: start-up time
    from pipelines.tracking import download_model_file, tracking_uri  # lazy: start-up time

    by_forward: dict[str, dict[int, torch.Tensor]] = {}
    for summary in outcome.budgets:
        T = summary.budget
        served_run = (client.get_model_version(options.model_name, summary.served_version).run_id
                      if summary.served_version and T in served_samples else None)
        for name, row in sorted(summary.rows.items()):
            if row.run_id == served_run:
                tokens, source = served_samples[T], f"served v{summary.served_version}, over HTTP"
            else:
                path, _ = download_model_file(tracking_uri(), row.run_id)
                service = SamplerService(FLDDModel.load(path), Limits(max_num_samples=options.picture_samples))
                tokens = service(GenerationRequest(num_samples=options.picture_samples, seed=0))[1]
                source = f"run {row.run_id[:8]}, sampled here"
            by_forward.setdefault(name, {})[T] = tokens
            outcome.picture_sources[(name, T)] = source
    return by_forward


def format_summary(outcome: DemoOutcome, model_name: str) -> str:
    from pipelines.tracking import tracking_uri  # lazy: start-up time

    lines = ["", "=" * 100, "Summary (validation split, seed 0; NELBO in bits/token, lower is better; "
             "the gate decides on the test split)", "",
             f"{'T':>3}  {'parameterization':<16} {'valid NELBO':>18} {'exact KL':>9} {'steps':>6}  MLflow run"]
    for summary in outcome.budgets:
        for name, row in sorted(summary.rows.items()):
            lines.append(f"{summary.budget:>3}  {name:<16} {row.valid_nelbo_bits:>9.4f} +- {row.valid_nelbo_stderr:.4f}"
                         f" {summary.kl.get(name, math.nan):>9.4f} {row.steps_trained:>6}  {row.run_id}")
    lines += ["", f"{'T':>3}  {'promotion':<10} {'version':>7}  {'aliases moved':<22} {'served':>6} "
              f"{'latency p50 / max (1 sample)':>29}"]
    for summary in outcome.budgets:
        d = summary.decision
        latency = (f"{statistics.median(summary.latency_ms):.1f} / {max(summary.latency_ms):.1f} ms"
                   if summary.latency_ms else "-")
        lines.append(f"{summary.budget:>3}  {d.decision if d else '-':<10} {d.version or '-' if d else '-':>7}  "
                     f"{', '.join(d.aliases_moved) if d and d.aliases_moved else '-':<22} "
                     f"{'v' + summary.served_version if summary.served_version else '-':>6} {latency:>29}")
    if outcome.conditional:
        given, answer = outcome.conditional["given"], outcome.conditional.get("tokens") or outcome.conditional["error"]
        lines += ["", f"conditional request (T={outcome.conditional['steps']}, x[0] clamped to {given['tokens'][0]}):"
                  f" {answer}"]
    if outcome.picture:
        lines.append(f"\nsamples of each forward at each budget, beside the test split: {outcome.picture}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in outcome.seconds.items())
    lines += [f"time: {times}", "",
              f"MLflow UI:  mlflow ui --backend-store-uri {tracking_uri()} --host 127.0.0.1",
              f"registry:   fldd models {model_name}"]
    if outcome.url:
        lines += [f"endpoint:   {outcome.url} (API docs at {outcome.url}/docs)",
                  f"playground: {outcome.url}/  (pick a budget, generate, compare two side by side; "
                  "up while the demo serves: --keep-serving)",
                  f"  {outcome.curl}"]
    return "\n".join(lines)
