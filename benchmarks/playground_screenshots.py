"""Screenshots of the endpoint's playground page, one per data type, for the README and docs.

Everything comes from the product's own paths, in a project home of its own (default
.fldd/playground): per data set, the learned forward (`fldd-mask-carry`) and the fixed forward
with the same reverse parameterization (`masked-x0`) are trained at one step budget by the one
trainer (pipelines.train.launch, local mode), each promoted through the registry gate as the
first champion of its own registered model (`playground-<data>` and `playground-<data>-masked-x0`),
both served by one endpoint (the product's Serve app on local Ray), and the page is driven in
headless Chromium as a person would: pick the learned model in panel A, tick "side by side", pick
the fixed model at the same T in panel B, generate on one seed, screenshot. A rerun finds the
trained runs (same names) and the champions, and only takes the pictures again.

The models are trained for the presets' lengths on 2 CPU cores (about 3 min for toy2d, 5 for
digits, 25 for text); the pictures show those models, not tuned ones. `--train-steps` shortens them.

    python -m benchmarks.playground_screenshots                       # toy2d, digits, text -> docs/playground/
    python -m benchmarks.playground_screenshots --data toy2d --train-steps 500
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED, LEARNED = "masked-x0", "fldd-mask-carry"


@dataclass(frozen=True)
class Picture:
    """One data set's screenshot: the preset, T, the learned forward's and the fixed forward's
    training settings (the values their select-on-validation studies chose where there is one),
    and what the page is asked for."""

    preset: str
    steps: int
    learned: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    num_samples: int = 64
    prefix: str | None = None


PICTURES = {
    # docs/results/select_then_test_toy2d.json (T=4) and select_then_test_digits-binary.json (T=4)
    "toy2d": Picture("toy2d", 4, {"train.forward_lr": 3e-3}, {"train.lr": 2e-3}, num_samples=2000),
    "digits": Picture("digits", 4, {"train.forward_lr": 1e-3}, {"train.lr": 1e-3}, num_samples=60),
    # text: no study on the current networks yet; the middle of the forward rates studied
    "text": Picture("text", 8, {"train.forward_lr": 3e-4}, {"train.lr": 1e-3}, num_samples=12, prefix="the "),
}
ALWAYS = {"train.seed": 10, "train.forward_lr_ref_steps": 0}  # a report seed; the studies' protocol


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def model_names(key: str) -> dict[str, str]:
    return {LEARNED: f"playground-{key}", FIXED: f"playground-{key}-{FIXED}"}


def train_and_promote(key: str, picture: Picture, train_steps: int | None) -> dict[str, dict]:
    """Each forward trained (or found, by run name) and promoted as its model's champion at T."""
    from mlflow import MlflowClient

    from fldd.config import CONFIG_DIR, PARAMETERIZATIONS, FLDDConfig
    from pipelines import registry
    from pipelines.tracking import tracking_uri
    from pipelines.train import LaunchOptions, launch
    from pipelines.vocabulary import champion_alias

    client, done = MlflowClient(tracking_uri()), {}
    for forward, settings in ((LEARNED, picture.learned), (FIXED, picture.fixed)):
        name = model_names(key)[forward]
        overrides = {**PARAMETERIZATIONS[forward], "process.num_steps": picture.steps, **ALWAYS, **settings}
        if train_steps:
            every = max(1, train_steps // 4)
            overrides.update({"train.steps": train_steps, "train.checkpoint_every": every, "train.log_every": every})
        cfg = FLDDConfig.from_yaml(CONFIG_DIR / f"{picture.preset}.yaml").with_overrides(overrides)
        started = time.perf_counter()
        print(f"[{key}] {forward}: training {cfg.train.steps} steps at T={picture.steps}", flush=True)
        outcome = launch(cfg, LaunchOptions(workers=0, quiet=True, name=f"playground-{key}-{forward}"))
        (decision,) = registry.promote(run_id=outcome.run_id, model_name=name)
        print(f"[{key}] {forward}: {decision.decision} into {name} ({time.perf_counter() - started:.0f} s)", flush=True)
        holder = client.get_model_version_by_alias(name, champion_alias(picture.steps))
        done[forward] = {"model": name, "version": holder.version, "run_id": holder.run_id,
                         "train_steps": cfg.train.steps, "settings": settings}
    return done


def screenshot(url: str, key: str, picture: Picture, out: Path) -> dict:
    """The page with the learned model in panel A and the fixed one at the same T in panel B."""
    from serving.browser import Playground

    names = model_names(key)
    with Playground(url, width=1500) as page:
        page.open()
        page.choose("a", names[LEARNED], picture.steps)
        page.compare()
        page.choose("b", names[FIXED], picture.steps)
        if picture.prefix:
            for panel in ("a", "b"):
                page.field(panel, "prefix").send_keys(picture.prefix)
        page.set_samples(picture.num_samples, 0)
        states = page.generate("a", "b", timeout=120)
        if set(states.values()) != {"done"}:
            raise RuntimeError(f"{key}: the page showed an error: A {page.error('a')!r}, B {page.error('b')!r}")
        shown = {panel: page.shown(panel) for panel in ("a", "b")}
        page.screenshot(out)
    print(f"[{key}] wrote {out}", flush=True)
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=sorted(PICTURES), default=list(PICTURES))
    parser.add_argument("--train-steps", type=int, help="optimizer steps per model (default: the preset's)")
    parser.add_argument("--home", type=Path, default=ROOT / ".fldd" / "playground", help="project home (FLDD_HOME)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "playground")
    args = parser.parse_args(argv)
    os.environ["FLDD_HOME"] = str(args.home.resolve())  # before the project's modules read it
    from serving.browser import find_browser

    found = find_browser()
    if isinstance(found, str):
        parser.error(found)
    from serving.run import start_endpoint

    trained = {key: train_and_promote(key, PICTURES[key], args.train_steps) for key in args.data}
    models = [name for key in args.data for name in model_names(key).values()]
    endpoint = start_endpoint(models=models, port=free_port(), app_name="fldd-playground-screenshots",
                              overrides={"poll_interval_s": 2.0,
                                         "limits": {"max_num_samples": 4096, "max_batch_rows": 4096}})
    try:
        import requests

        deadline = time.monotonic() + 300
        while requests.get(endpoint.url + "/readyz", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{endpoint.url}/readyz: {requests.get(endpoint.url + '/readyz').text}")
            time.sleep(1)
        shown = {key: screenshot(endpoint.url, key, PICTURES[key], args.out_dir / f"playground_{key}.png")
                 for key in args.data}
    finally:
        endpoint.stop()
    record = args.out_dir / "playground_screenshots.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    previous.update({key: {"steps": PICTURES[key].steps, "num_samples": PICTURES[key].num_samples, "seed": 0,
                           "models": trained[key], "shown": shown[key]} for key in args.data})
    record.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
