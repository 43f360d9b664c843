"""The generation endpoint over real HTTP: formats, conditioning, seeds inside batches, ~35 kinds
of bad input, hot swap on promotion and rollback under load, and `fldd serve` stopping on SIGTERM.

One module-scoped server (the app's one deployment: FastAPI ingress, model cache and batcher)
serves three registered models, all trained here for a few steps: toy2d (fldd forward, T=2 and
T=4), text and binarized digits (masked forward, T=2)."""

import base64
import io
import math
import os
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from fldd.config import CONFIG_DIR
from pipelines import aliases, registry
from pipelines.tracking import tracking_uri
from tests.serving.conftest import DIGITS, MAX_BODY, MAX_NUM_SAMPLES, MOLECULES, TEXT, TOY, free_port, wait_for

def test_no_champion_yet_is_503_with_a_message(server):
    _, _, _, before = server
    assert before["readyz"].status_code == 503
    assert f"no registered model {TOY!r}" in before["readyz"].json()["detail"]
    assert before["generate"].status_code == 503, before["generate"].text
    assert f"no registered model {TOY!r}" in before["generate"].json()["detail"]
    assert before["quality"].status_code == 503, before["quality"].text  # the server's state, not the request's


def test_one_deployment_serves_http_and_samples(server):
    """The FastAPI ingress is also the model holder and the batcher: one Ray hop per request."""
    from ray import serve

    deployments = serve.status().applications["fldd-test"].deployments
    assert list(deployments) == ["GenerationServer"], deployments


def test_health_docs_and_models(server):
    client, _, runs, _ = server
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/models", "/healthz", "/readyz"} <= set(paths)
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert list(models) == [TOY, TEXT, DIGITS, MOLECULES]
    toy = models[TOY]
    assert toy["default_steps"] == 2 and toy["budgets"] == {"2": "1", "4": "2"} and toy["problem"] is None
    v1, v2 = toy["versions"]
    assert (v1["version"], v1["steps"], v1["aliases"]) == ("1", 2, ["champion", "champion-t2"])
    assert (v2["version"], v2["steps"], v2["aliases"]) == ("2", 4, ["champion-t4"])
    assert v1["run_id"] == runs["weak"] and v1["dataset"] == "toy2d" and v1["parameterization"] == "fldd"
    tags = MlflowClient(tracking_uri()).get_model_version(TOY, "1").tags
    assert v1["test_nelbo_bits"] == pytest.approx(float(tags["fldd.test_nelbo_bits"]))
    assert models[TEXT]["budgets"] == {"2": "1"} and models[DIGITS]["versions"][0]["dataset"] == "digits-binary"


def test_molecules_are_served_as_smiles_with_their_scores(server):
    """A model of the built-in moses data: /v1/generate answers SMILES strings, /v1/models shows the
    validity and FCD the gate recorded on the test split beside the NELBO, and a request can route on them."""
    from fldd.datasets import MOSES_SYMBOLS
    from fldd.molecules import tokenize_smiles

    client, *_ = server
    (version,) = {m["name"]: m for m in client.get("/v1/models").json()["models"]}[MOLECULES]["versions"]
    tags = MlflowClient(tracking_uri()).get_model_version(MOLECULES, version["version"]).tags
    scores = version["test_sample_scores"]
    assert set(scores) >= {"validity", "copy_rate", "interior_padding", "fcd_molecules"} and 0 <= scores["validity"] <= 1
    # uniqueness and novelty are NaN (left out) when no sample of this 10-step model is a molecule
    assert ("uniqueness" in scores) == ("novelty" in scores) == (scores["validity"] > 0)
    assert scores["validity"] == pytest.approx(float(tags["fldd.test_validity"]))
    assert ("fcd" in scores) == math.isfinite(float(tags["fldd.test_fcd"]))  # NaN (no valid sample) is left out
    assert version["card"]["data_kind"] == "text" and "text" in version["card"]["formats"]

    out = client.generate(model=MOLECULES, num_samples=6, seed=0, format="text")
    assert len(out["samples"]) == 6 and all(isinstance(s, str) for s in out["samples"])
    assert all(set(tokenize_smiles(s)) <= set(MOSES_SYMBOLS[1:]) for s in out["samples"])  # padding dropped
    prefixed = client.generate(model=MOLECULES, num_samples=3, seed=0, format="text", prefix="c1cc")
    assert all(s.startswith("c1cc") for s in prefixed["samples"])
    routed = client.generate(model=MOLECULES, num_samples=1, quality={"metric": "validity", "min": 0.0})
    assert routed["version"] == version["version"] and routed["quality"]["value"] == pytest.approx(scores["validity"])
    at_bound = client.generate(model=MOLECULES, num_samples=1, quality={"metric": "validity", "min": scores["validity"]})
    assert at_bound["version"] == version["version"]  # the bound is inclusive
    unmeetable = client.post({"model": MOLECULES, "quality": {"metric": "validity", "min": 1.5}})
    assert unmeetable.status_code == 422 and "validity" in unmeetable.text
    wrong_side = client.post({"model": MOLECULES, "quality": {"metric": "fcd", "min": 1.0}})
    assert wrong_side.status_code == 422 and "lower is better, so give max" in wrong_side.text


def test_tokens_per_budget(server):
    client, *_ = server
    default = client.generate(num_samples=5, seed=1)
    assert (default["model"], default["version"], default["alias"], default["steps"]) == (TOY, "1", "champion-t2", 2)
    assert default["seed"] == 1 and default["format"] == "tokens" and default["elapsed_s"] > 0
    assert len(default["samples"]) == 5 and all(len(row) == 2 and all(0 <= v < 50 for v in row)
                                                for row in default["samples"])
    assert default["samples"] == default["tokens"]
    t4 = client.generate(num_samples=3, steps=4)
    assert (t4["version"], t4["alias"], t4["steps"]) == ("2", "champion-t4", 4)
    assert 0 <= t4["seed"] <= 2**63 - 1  # a random seed, reported so the draw can be repeated
    again = client.generate(num_samples=3, steps=4, seed=t4["seed"])
    assert again["samples"] == t4["samples"]


def test_a_quality_target_gets_the_fewest_steps_champion_that_meets_it_and_says_which(server):
    client, *_ = server
    menu = {v["steps"]: v for v in next(m for m in client.get("/v1/models").json()["models"]
                                          if m["name"] == TOY)["versions"]}
    recorded = {T: menu[T]["test_nelbo_bits"] for T in (2, 4)}
    assert all(isinstance(value, float) for value in recorded.values()), recorded

    def ask(bound: float) -> requests.Response:
        return client.post({"num_samples": 2, "seed": 0, "quality": {"metric": "nelbo_bits", "max": bound}})

    loose = ask(max(recorded.values()) + 1.0).json()  # both budgets qualify: the fewest steps
    assert (loose["steps"], loose["version"], loose["alias"]) == (2, "1", "champion-t2")
    assert loose["quality"] == {"metric": "nelbo_bits", "value": recorded[2], "stderr": menu[2]["test_nelbo_stderr"],
                                "bound": max(recorded.values()) + 1.0, "bound_kind": "max"}
    best = min(recorded, key=lambda T: (recorded[T], T))
    assert ask(recorded[best]).json()["steps"] == best  # the bound is inclusive
    refused = ask(min(recorded.values()) - 1.0)
    assert refused.status_code == 422 and "the best is" in refused.text and f"T={best}" in refused.text
    assert [d["loc"] for d in refused.json()["detail"]] == [["body", "quality"]]
    both = client.post({"steps": 2, "quality": {"metric": "nelbo_bits", "max": 9.0}})
    assert both.status_code == 422 and "not both" in both.text
    assert client.generate(num_samples=1, steps=2)["quality"] is None  # a request by steps carries none
    # the menu reports what this replica measured for the version that served
    served = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == TOY)["versions"][0]
    assert served["version"] == "1" and served["latency_ms_p50"] > 0


def test_text_format_and_prefix(server):
    client, *_ = server
    out = client.generate(model=TEXT, num_samples=3, seed=0, format="text", prefix="the ")
    assert out["model"] == TEXT and len(out["samples"]) == 3
    alphabet = set("abcdefghijklmnopqrstuvwxyz ")
    for text, tokens in zip(out["samples"], out["tokens"]):
        assert len(text) == 64 and set(text) <= alphabet and text.startswith("the ")
        assert tokens[:4] == [19, 7, 4, 26]
    plain = client.generate(model=TEXT, num_samples=2, seed=0, format="tokens")
    assert all(len(row) == 64 and all(0 <= v < 27 for v in row) for row in plain["samples"])


def decode_png(data: str) -> tuple[int, int, list[list[int]]]:
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(raw))
    assert (image.format, image.mode) == ("PNG", "L")  # 8-bit grayscale
    width, height = image.size
    pixels = list(image.tobytes())  # mode L: one byte per pixel, row by row
    rows = [pixels[r * width:(r + 1) * width] for r in range(height)]
    return width, height, rows


def test_png_format_and_clamped_positions(server):
    client, *_ = server
    positions, tokens = [0, 9, 27, 63], [1, 0, 1, 1]
    out = client.generate(model=DIGITS, num_samples=6, seed=4, format="png",
                          conditioning={"positions": positions, "tokens": tokens})
    assert len(out["samples"]) == 6
    for png, row in zip(out["samples"], out["tokens"]):
        assert [row[p] for p in positions] == tokens
        width, height, pixels = decode_png(png)
        assert (width, height) == (8, 8)
        assert [v for line in pixels for v in line] == [255 * t for t in row]


def test_text_conditioning_is_clamped(server):
    client, *_ = server
    out = client.generate(model=TEXT, num_samples=4, seed=2, conditioning={"positions": [5, 40, 63],
                                                                             "tokens": [0, 26, 25]})
    assert all([row[5], row[40], row[63]] == [0, 26, 25] for row in out["tokens"])


def test_same_seed_same_samples_alone_and_in_a_batch(server):
    client, *_ = server
    alone = client.generate(model=TEXT, num_samples=4, seed=123)
    bodies = [{"model": TEXT, "num_samples": 1 + i % 3, "seed": i} for i in range(15)]
    bodies.insert(7, {"model": TEXT, "num_samples": 4, "seed": 123})
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: client.post(body), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    results = [r.json() for r in responses]
    assert max(r["batch_requests"] for r in results) > 1  # the requests really shared passes
    assert results[7]["samples"] == alone["samples"]
    assert results[8]["samples"] != alone["samples"][:1]  # another seed, other samples
    # the conditioned and unconditioned requests share a batch without changing each other either
    toy = client.generate(num_samples=4, seed=9)
    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(lambda s: client.post({"num_samples": 4, "seed": s}), [9, 1, 2, 9, 3, 4, 9, 5]))
    assert [m.json()["samples"] for m in mixed if m.json()["seed"] == 9] == [toy["samples"]] * 3


DIGIT_PIXELS = list(range(64))


def raw_json(text: str) -> dict:
    """A request body sent as written: JSON that Python's json.dumps would not produce (NaN, 1e400)."""
    return {"_raw": {"data": text, "headers": {"Content-Type": "application/json"}}}

BAD = {  # id: (request body or raw kwargs, expected status, text the response must contain)
    "num_samples-zero": ({"num_samples": 0}, 422, "num_samples"),
    "num_samples-negative": ({"num_samples": -3}, 422, "num_samples"),
    "num_samples-too-large": ({"num_samples": MAX_NUM_SAMPLES + 1}, 422, "num_samples"),
    "num_samples-float": ({"num_samples": 1.5}, 422, "num_samples"),
    "num_samples-string": ({"num_samples": "3"}, 422, "num_samples"),
    "steps-not-served": ({"steps": 3}, 422, "steps"),
    "steps-zero": ({"steps": 0}, 422, "steps"),
    "steps-negative": ({"steps": -4}, 422, "steps"),
    "seed-negative": ({"seed": -1}, 422, "seed"),
    "seed-too-large": ({"seed": 2**63}, 422, "seed"),
    "unknown-field": ({"num_samples": 1, "temperature": 0.7}, 422, "temperature"),
    "missing-body": ({"_raw": {"headers": {"Content-Type": "application/json"}}}, 422, "body"),
    "body-not-json": ({"_raw": {"data": "{num_samples: 2", "headers": {"Content-Type": "application/json"}}},
                      422, "JSON decode error"),
    "json-not-an-object": ({"_raw": {"json": [1, 2]}}, 422, "body"),
    "oversized-body": ({"_raw": {"json": {"num_samples": 1, "prefix": "a" * MAX_BODY}}}, 413, "larger than"),
    "positions-out-of-range": ({"model": DIGITS, "conditioning": {"positions": [64], "tokens": [1]}}, 422,
                               "positions"),
    "positions-negative": ({"model": DIGITS, "conditioning": {"positions": [-1], "tokens": [1]}}, 422, "positions"),
    "positions-repeated": ({"model": DIGITS, "conditioning": {"positions": [3, 3], "tokens": [1, 1]}}, 422,
                           "repeated positions"),
    "positions-not-integers": ({"model": DIGITS, "conditioning": {"positions": [1.5], "tokens": [1]}}, 422,
                               "positions"),
    "positions-tokens-lengths": ({"model": DIGITS, "conditioning": {"positions": [1, 2], "tokens": [1]}}, 422,
                                 "same length"),
    "tokens-missing": ({"model": DIGITS, "conditioning": {"positions": [1]}}, 422, "tokens"),
    "tokens-outside-vocabulary": ({"model": DIGITS, "conditioning": {"positions": [1], "tokens": [7]}}, 422,
                                  "outside the vocabulary"),
    "tokens-mask-id": ({"model": DIGITS, "conditioning": {"positions": [1], "tokens": [2]}}, 422, "MASK"),
    "conditioning-every-position": ({"model": DIGITS, "conditioning": {"positions": DIGIT_PIXELS,
                                                                       "tokens": [1] * 64}}, 422, "all 64 positions"),
    "conditioning-non-masking-forward": ({"conditioning": {"positions": [0], "tokens": [3]}}, 422,
                                         "masking forward"),
    "prefix-outside-alphabet": ({"model": TEXT, "prefix": "Hello!"}, 422, "outside the alphabet"),
    "prefix-too-long": ({"model": TEXT, "prefix": "a" * 64}, 422, "longer than the sequence"),
    "prefix-empty": ({"model": TEXT, "prefix": ""}, 422, "prefix"),
    "prefix-non-text-model": ({"model": DIGITS, "prefix": "ab"}, 422, "for text models"),
    "prefix-and-conditioning": ({"model": TEXT, "prefix": "a", "conditioning": {"positions": [9], "tokens": [1]}},
                                422, "not both"),
    "format-unknown": ({"format": "jpeg"}, 422, "format"),
    "format-png-non-image": ({"format": "png"}, 422, "for image data"),
    "format-text-non-text": ({"model": DIGITS, "format": "text"}, 422, "for text models"),
    "unknown-route": ({"_raw": {"path": "/v1/generat", "json": {}}}, 404, "Not Found"),
    "wrong-method": ({"_raw": {"method": "GET"}}, 405, "Method Not Allowed"),
    "model-not-registered": ({"model": "no-such-model"}, 404, "no-such-model"),
    # non-finite numbers and unencodable strings: a 422 naming the field, never a 500 (JSON cannot
    # echo NaN, Infinity or a lone surrogate back; FastAPI's default handler failed on them)
    "num_samples-nan": (raw_json('{"num_samples": NaN}'), 422, "num_samples"),
    "num_samples-infinity": (raw_json('{"num_samples": Infinity}'), 422, "num_samples"),
    "num_samples-1e400": (raw_json('{"num_samples": 1e400}'), 422, "num_samples"),
    "steps-nan": (raw_json('{"steps": NaN}'), 422, "steps"),
    "steps-infinity": (raw_json('{"steps": Infinity}'), 422, "steps"),
    "steps-1e400": (raw_json('{"steps": 1e400}'), 422, "steps"),
    "seed-nan": (raw_json('{"seed": NaN}'), 422, "seed"),
    "seed-infinity": (raw_json('{"seed": Infinity}'), 422, "seed"),
    "seed-1e400": (raw_json('{"seed": 1e400}'), 422, "seed"),
    "seed-minus-infinity": (raw_json('{"seed": -Infinity}'), 422, "seed"),
    "conditioning-nan-position": (raw_json('{"conditioning": {"positions": [NaN], "tokens": [1]}}'), 422, "positions"),
    "prefix-lone-surrogate": (raw_json('{"model": "%s", "prefix": "\\ud800"}' % TEXT), 422, "prefix"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, kind):
    client, *_ = server
    body, status, expected = BAD[kind]
    if "_raw" in body:
        raw = dict(body["_raw"])
        method, path = raw.pop("method", "POST"), raw.pop("path", "/v1/generate")
        response = requests.request(method, client.url + path, timeout=60, **raw)
    else:
        response = client.post(body)
    assert response.status_code == status, response.text
    assert expected in response.text, response.text
    if status == 422:  # the field is named where FastAPI names it
        locations = [".".join(str(p) for p in d["loc"]) for d in response.json()["detail"]]
        assert any(loc.startswith("body") for loc in locations), locations
    assert client.generate(num_samples=1, seed=0)["version"] == "1"


def malformed_bodies(count: int, seed: int) -> list[bytes]:
    """Seeded malformed and hostile JSON bodies: wrong types, deep nesting, huge and non-finite
    numbers, unicode (lone surrogates included), duplicate keys, truncation, wrong top-level values."""
    rng = random.Random(seed)
    fields = ["num_samples", "steps", "seed", "model", "prefix", "format", "conditioning", "positions", "tokens",
              "quality", "", "num_samples ", "\u00e9"]
    atoms = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "0", "-0.0", "2.0", "1", "-1",
             "9" * 40, "true", "null", '"3"', '""', '"\\ud800"', '"\u00e9\u4e2d"', '"a\\u0000b"', "[]", "{}",
             "[NaN]", '{"positions": [NaN], "tokens": [1]}', '{"positions": [0], "tokens": [1e400]}']

    def value(depth: int) -> str:
        if depth > 0 and rng.random() < 0.2:
            return "[" + ", ".join(value(depth - 1) for _ in range(rng.randint(0, 3))) + "]"
        if depth > 0 and rng.random() < 0.2:
            return obj(depth - 1)
        return rng.choice(atoms)

    def obj(depth: int) -> str:
        pairs = [f'"{rng.choice(fields)}": {value(depth)}' for _ in range(rng.randint(0, 4))]
        if pairs and rng.random() < 0.3:
            pairs.append(pairs[0])  # a duplicate key
        return "{" + ", ".join(pairs) + "}"

    bodies = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.75:
            text = obj(3)
        elif kind < 0.85:
            text = value(2)
        elif kind < 0.95:
            text = obj(3)[:rng.randint(0, 20)]  # cut short
        else:
            text = "[" * 200 + "]" * 200  # deep nesting
        bodies.append(text.encode("utf-8", "surrogatepass"))
    return bodies


def test_malformed_bodies_never_get_a_5xx_and_the_replica_stays_up(server):
    client, *_ = server
    bodies = malformed_bodies(500, seed=2026)
    statuses = {}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: requests.post(client.url + "/v1/generate", data=body, timeout=60,
                                                             headers={"Content-Type": "application/json"}), bodies))
    for body, response in zip(bodies, responses):
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body, response.status_code, response.text[:300])
        response.json()  # every answer is JSON
    assert sum(statuses.values()) == 500 and set(statuses) - {200, 404, 413, 422} == set(), statuses
    assert client.generate(num_samples=1, seed=0)["version"] == "1"  # still serving


def test_promotion_and_rollback_during_a_stream_of_requests(server):
    """A promotion moves champion-t2 and champion to a new version and a rollback moves them back,
    while 4 clients keep sending requests: nothing fails and the responses follow the aliases."""
    client, _, runs, _ = server
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            try:
                response = client.post({"num_samples": 2})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                else:
                    seen.append(response.json()["version"])
            except requests.RequestException as error:
                failures.append(repr(error))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(seen) >= 10, 60, "requests before the promotion")
        (decision,) = registry.promote(run_id=runs["mid"], model_name=TOY, passes=1)
        assert decision.promoted and decision.version == "3", decision
        wait_for(lambda: "3" in seen, 60, "responses from the promoted version")
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert models[TOY]["budgets"] == {"2": "3", "4": "2"}
        # quality routing follows the registry: the promoted version's recorded NELBO qualifies it at T=2
        target = {"num_samples": 1, "quality": {"metric": "nelbo_bits", "max": decision.candidate_test_bits}}
        routed = client.post(target).json()
        assert (routed["steps"], routed["version"], routed["quality"]["value"]) == (
            2, "3", pytest.approx(decision.candidate_test_bits))
        promoted_at = len(seen)
        assert aliases.rollback(TOY, budget=2) == {"champion-t2": "1", "champion": "1"}
        wait_for(lambda: "1" in seen[promoted_at:], 60, "responses from the rolled-back version")
        rolled_back_at = len(seen)
        after = client.post(target)  # version 1 is worse than that bound (it lost the gate): T=4, or nobody
        t4 = next(v for v in next(m for m in client.get("/v1/models").json()["models"]
                                  if m["name"] == TOY)["versions"] if v["steps"] == 4)
        if t4["test_nelbo_bits"] <= decision.candidate_test_bits:
            assert (after.json()["steps"], after.json()["version"]) == (4, "2"), after.text
        else:
            assert after.status_code == 422 and "the best is" in after.text, after.text
        wait_for(lambda: len(seen) >= rolled_back_at + 10, 60, "requests after the rollback")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    assert seen[0] == "1" and "3" in seen and seen[-1] == "1"
    # once the rollback was seen, the promoted version is not served again
    assert "3" not in seen[rolled_back_at + 4:]  # at most the 4 requests in flight at the switch
    assert {m["name"]: m for m in client.get("/v1/models").json()["models"]}[TOY]["budgets"] == {"2": "1", "4": "2"}


@pytest.mark.cluster
def test_rays_own_serve_run_deploys_the_shipped_config(server, tmp_path):
    """How a platform team deploys: `serve run` on configs/serve.yaml (its own Ray cluster here),
    only the model, port and CPUs changed. It serves the same version the fldd-started app serves."""
    client, home, _, _ = server
    application = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    port = free_port()
    application["http_options"]["port"] = port
    app_args = application["applications"][0]["args"]
    app_args.update(models=[TOY], tracking_uri=tracking_uri(), poll_interval_s=1,
                    deployment={**app_args["deployment"], "ray_actor_options": {"num_cpus": 0},
                                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}})
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(application))
    env = {**os.environ, "FLDD_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)  # a cluster of its own, not the tests' session cluster
    serve_cli = Path(sys.executable).parent / "serve"
    process = subprocess.Popen([str(serve_cli), "run", str(config)], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, "".join(lines[-40:])
            try:
                return requests.get(url + "/readyz", timeout=10).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, 180, "serve run to be ready")
        response = requests.post(url + "/v1/generate", json={"num_samples": 2, "seed": 5}, timeout=60)
        assert response.status_code == 200 and response.json()["model"] == TOY, response.text
        assert response.json()["samples"] == client.generate(num_samples=2, seed=5)["samples"]
    finally:
        process.send_signal(signal.SIGINT)  # serve run's Ctrl-C: shuts the app and its cluster down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    reader.join(timeout=10)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_fldd_serve_stops_cleanly_on_sigterm(server, tmp_path):
    client, home, _, _ = server
    application = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    port = free_port()
    application["http_options"]["port"] = 1  # --port must win
    app_args = application["applications"][0]["args"]
    app_args.update(deployment={"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 16}, poll_interval_s=1)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(application))
    env = {**os.environ, "FLDD_HOME": str(home), "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen([sys.executable, "-m", "commands.cli", "serve", "--config", str(config),
                                "--model-name", TOY, "--port", str(port)], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: any(f"{url}/v1/generate" in line for line in lines) or process.poll() is not None,
                 240, "fldd serve to print its URL")
        assert process.poll() is None, "".join(lines)
        assert any(line.startswith("  curl -s -X POST") for line in lines), "".join(lines)
        wait_for(lambda: requests.get(url + "/readyz", timeout=30).status_code == 200, 120, "fldd serve ready")
        response = requests.post(url + "/v1/generate", json={"num_samples": 2, "seed": 5}, timeout=60)
        assert response.status_code == 200 and response.json()["model"] == TOY, response.text
        assert response.json()["samples"] == client.generate(num_samples=2, seed=5)["samples"]  # same version
        ray_processes = descendants(process.pid)
        assert len(ray_processes) >= 3  # GCS, raylet, workers, ...
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    assert "fldd serve: stopping" in "".join(lines)
    wait_for(lambda: not any(alive(pid) for pid in ray_processes), 30, "its Ray processes to exit")
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)
    assert client.get("/healthz").status_code == 200  # the other server was not touched
