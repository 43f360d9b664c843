"""Serving tests: tiny real models trained, registered and promoted in a real MLflow store, served
by the real Ray Serve application on 127.0.0.1 (a free port) of the session's Ray cluster."""

import os

import pytest
import requests

from fldd.config import CONFIG_DIR, FLDDConfig
from pipelines import registry
from pipelines.train import LaunchOptions, launch
from serving.browser import wait_until as wait_for  # one polling helper: the page driver's
from tests.conftest import module_project_home
from tests.servers import free_port  # noqa: F401 (test_app imports it from here)
from tests.pipelines.conftest import toy_config

# the HTTP proxy misses Serve's 5 s readiness checks on a busy 2-core box (STACK_NOTES): this must
# be in the environment before the session's Ray cluster starts, and conftest files load first
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


TOY, TEXT, DIGITS, MOLECULES = "serve-toy", "serve-text", "serve-digits", "serve-molecules"
MAX_NUM_SAMPLES, MAX_BODY = 16, 4096
ARGS = {"models": [TOY, TEXT, DIGITS, MOLECULES], "poll_interval_s": 0.5, "max_body_bytes": MAX_BODY,
        "limits": {"max_num_samples": MAX_NUM_SAMPLES, "max_batch_rows": 256},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        # logical CPUs: the session cluster has 2 and the tests' own training needs none
        "deployment": {"ray_actor_options": {"num_cpus": 0}}}


def small(cfg: FLDDConfig, steps: int, **overrides) -> FLDDConfig:
    return cfg.with_overrides({"train.steps": steps, "train.checkpoint_every": steps, "train.log_every": steps,
                               "reverse_network.width": 32, "forward_network.width": 32,
                               "reverse_network.arch": "mlp", "forward_network.arch": "mlp",
                               "train.batch_size": 32, **overrides})


class Client:
    def __init__(self, url: str):
        self.url = url

    def post(self, body=None, path: str = "/v1/generate", **kwargs) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return requests.post(self.url + path, timeout=60, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=60)

    def generate(self, **body) -> dict:
        response = self.post(body)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="package")
def server(ray_cluster, tmp_path_factory):
    """One endpoint for this package's tests (test_app.py, test_playground.py): (client, home, run ids,
    responses seen before any promotion). The app starts on an empty registry, then the models are
    promoted and it picks them up by polling."""
    from ray import serve

    from serving.app import build_app

    with module_project_home(tmp_path_factory, "serving") as home:
        runs = {}
        for name, steps, extra in (("weak", 20, {}), ("mid", 150, {}), ("t4", 20, {"process.num_steps": 4})):
            # the masked warm start: a general (non-masking) forward that keeps information in runs this
            # short (the toy2d preset's random start is still on its uninformative plateau, flagged collapsed)
            warm = {"process.warm_start": "masked", "train.forward_freeze_fraction": 0.3, "train.forward_lr": 3e-4}
            runs[name] = launch(small(toy_config(), steps, **warm, **extra),
                                LaunchOptions(workers=0, quiet=True, name=f"toy-{name}")).run_id
        masked = {"process.method": "masked", "process.reverse_parameterization": "direct", "process.num_steps": 2}
        molecules = {"data.num_train": 2000, "data.num_valid": 100}  # the built-in moses, a small part of it
        for name, preset, extra in (("text", "text", {}), ("digits", "digits", {}), ("molecules", "moses", molecules)):
            cfg = small(FLDDConfig.from_yaml(CONFIG_DIR / f"{preset}.yaml"), 10, **masked, **extra)
            runs[name] = launch(cfg, LaunchOptions(workers=0, quiet=True, name=f"{name}-tiny")).run_id

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ARGS), name="fldd-test", route_prefix="/")
        client = Client(f"http://127.0.0.1:{port}")
        wait_for(lambda: client.get("/v1/models").json()["polled_at"], 60, "the first registry poll")
        before = {"readyz": client.get("/readyz"), "generate": client.post({"num_samples": 1}),
                  "quality": client.post({"quality": {"metric": "nelbo_bits", "max": 9.0}})}

        for run, model in (("weak", TOY), ("t4", TOY), ("text", TEXT), ("digits", DIGITS), ("molecules", MOLECULES)):
            (decision,) = registry.promote(run_id=runs[run], model_name=model, passes=1)
            assert decision.promoted, decision
        wait_for(lambda: client.get("/readyz").status_code == 200, 120, "/readyz after promotion")
        budgets = lambda: {m["name"]: m["budgets"] for m in client.get("/v1/models").json()["models"]}  # noqa: E731
        wait_for(lambda: budgets()[TOY] == {"2": "1", "4": "2"}, 60, "both toy budgets served")
        try:
            yield client, home, runs, before
        finally:
            serve.shutdown()
