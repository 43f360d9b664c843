"""The Ray Serve application: one deployment that is the FastAPI ingress and also holds the
models (multiplexed, one per registry version) and the batcher.

    HTTP proxy --> GenerationServer (FastAPI ingress, one Serve deployment, 1..N replicas)
                     generate: validates the request, picks the version of champion-t<T>
                       --> get_service("NAME/VERSION")   @serve.multiplexed: one SamplerService per
                                                         registry version, loaded and warmed here
                       --> run_batch((service, request)) @serve.batch: one sampling pass per version
                                                         in the batch, in a worker thread
                     poll (a background task): reads the registry aliases

One process per replica: a request costs one Ray hop (proxy -> replica). The former split into an
ingress and a sampler deployment cost a second hop per request, which outweighed the model itself
(~1.5 ms per call at T=4) on small models (benchmarks/serve_load.py).

Hot swap: every poll_interval_s each replica reads the aliases; a version it has not served yet is
loaded and run once in that replica first, and only then do its new requests go to it. Requests
already running keep the version (and the SamplerService object) they started with, so a promotion
or a rollback fails nothing. With several replicas each one polls and warms its own models (one
copy per replica and version) and switches at its own poll: for up to poll_interval_s after a
promotion, responses may come from either version. A new replica takes traffic only after its
first poll (at most FIRST_POLL_TIMEOUT_S): champions loaded, or, if that poll failed, 503s until one
succeeds.

`serve run configs/serve.yaml` builds it with `build_app(args)`; so does `fldd serve`.
"""


import asyncio
import statistics
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve import Application

from fldd.model import FLDDModel
from fldd.service import GenerationRequest, ModelCard, PreparedRequest, RequestError, SamplerService
from pipelines.tracking import tracking_uri
from pipelines.vocabulary import champion_alias
from serving.registry import (ModelSnapshot, RoutingError, VersionInfo, load_registered_model, model_id,
                              read_registry, route_by_quality, split_model_id)
from serving.schemas import (Card, GenerateRequest, GenerateResponse, ModelEntry, ModelsResponse, RecordedQuality,
                             VersionEntry)
from serving.settings import ServeSettings

log = logging.getLogger("ray.serve")
MAX_MODELS_PER_REPLICA = 8  # budgets x (current + previous holder during a swap), per replica
LATENCY_WINDOW = 100  # requests per version whose median /v1/models reports
PLAYGROUND_DIR = Path(__file__).with_name("playground")  # the page at /: static files, no build step
FIRST_POLL_TIMEOUT_S = 120.0  # a replica waits this long for its first registry poll before serving
Loader = Callable[[str, str, str, str], FLDDModel]  # (tracking_uri, name, version, device) -> model


def _error(status: int, field: str, message: str) -> HTTPException:
    """The shape FastAPI uses for its own 422s: `loc` names the field."""
    return HTTPException(status, detail=[{"loc": ["body", *field.split(".")], "msg": json_safe(message),
                                          "type": "value_error"}])


_max_body_bytes = 65536


def set_max_body_bytes(limit: int) -> None:
    """The BodyLimit of this process. A module function, not app state: Serve ships the deployment
    class with its own copy of the FastAPI app, while this module (and BodyLimit) is imported."""
    global _max_body_bytes
    _max_body_bytes = limit


class BodyLimit:
    """413 for request bodies over the configured max_body_bytes, whether or not the client sends
    Content-Length; the body is read once and replayed."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(scope, receive, send, limit)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope: dict, receive: Callable, send: Callable, limit: int) -> None:
        response = JSONResponse({"detail": [{"loc": ["body"], "msg": f"request body larger than {limit} bytes",
                                             "type": "too_large"}]}, status_code=413)
        await response(scope, receive, send)


def json_safe(value: Any) -> Any:
    """`value` as JSON can carry it back: a non-finite float as a string ("nan", "inf", "-inf"), a
    string with lone surrogates (valid JSON escapes, not UTF-8) with them backslash-escaped. A
    response that echoes such input (pydantic's error `input`, a message quoting the prefix) could
    not be encoded and became a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 (`detail[].loc` names the field), safe for NaN, Infinity, 1e400 and lone
    surrogates in the input, which FastAPI's default handler turns into a 500 when it echoes them."""
    return JSONResponse({"detail": json_safe(jsonable_encoder(error.errors()))}, status_code=422)


api = FastAPI(title="FLDD few-step generation",
              description="Samples from the champion models of the MLflow registry, one version per step budget.",
              version="1")
api.add_middleware(BodyLimit)
api.add_exception_handler(RequestValidationError, invalid_request)
# the playground's page, script and style sheet; the page itself calls only /v1/models and /v1/generate
api.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")


@serve.deployment
@serve.ingress(api)
class GenerationServer:
    """The HTTP API, the registry view (which version serves which budget, polled), the loaded
    versions (multiplexed) and the batcher, in one replica."""

    async def __init__(self, settings: dict[str, Any], loader: Loader = load_registered_model):
        self.settings = ServeSettings.from_dict(settings)
        self.loader = loader
        set_max_body_bytes(self.settings.max_body_bytes)
        # a replica given a GPU sees it; one given none sees no CUDA device at all
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.run_batch.set_max_batch_size(self.settings.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.snapshots: dict[str, ModelSnapshot] = {}
        self.warm: set[str] = set()  # model ids this replica has loaded and run once
        self.polled_at: float | None = None
        self.latencies: dict[str, deque[float]] = {}  # model id -> recent request times in this replica (s)
        self.cards: dict[str, ModelCard] = {}  # model id -> what /v1/models tells clients about it
        self.poll_error: str | None = None
        self._polled_once = asyncio.Event()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        # The proxy routes to a replica once this constructor returns: wait for the first poll, so that
        # a replica added by autoscaling starts with the champions loaded and warmed instead of
        # answering 503. Bounded: a registry that hangs leaves the replica up and /readyz says why.
        try:
            await asyncio.wait_for(self._polled_once.wait(), FIRST_POLL_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning(f"the first registry poll took over {FIRST_POLL_TIMEOUT_S} s; starting without it")

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_service(self, key: str) -> SamplerService:
        """The service of registry version `key` ("NAME/VERSION"), loaded on first use and cached
        (least recently used out beyond MAX_MODELS_PER_REPLICA). The key is always passed in: the
        HTTP requests carry no multiplexed model id."""
        name, version = split_model_id(key)

        def load() -> SamplerService:
            service = SamplerService(self.loader(self.settings.tracking_uri, name, version, self.device),
                                     self.settings.limits)
            # one pass now, so that lazy set-up (CUDA context and kernels, allocator) is paid here and
            # a version that cannot sample is never routed to
            service.generate([service.prepare(GenerationRequest(num_samples=1, seed=0))])
            return service

        return await asyncio.to_thread(load)  # off the event loop: other versions keep serving

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # reset from the config in __init__
    async def run_batch(self, items: list[tuple[SamplerService, PreparedRequest]]
                        ) -> list[tuple[torch.Tensor, int] | Exception]:
        # a batch may mix versions (requests carry no multiplexed model id): one pass per service
        groups: dict[int, list[int]] = {}
        for index, (service, _) in enumerate(items):
            groups.setdefault(id(service), []).append(index)
        results: dict[int, tuple[torch.Tensor, int] | Exception] = {}
        for indices in groups.values():
            service = items[indices[0]][0]
            try:
                # off the event loop: requests keep arriving and queueing for the next batch while this one samples
                samples = await asyncio.to_thread(service.generate, [items[i][1] for i in indices])
            except Exception as error:  # only this version's requests fail, not the others in the batch
                results.update({i: error for i in indices})
                continue
            results.update({i: (s, len(indices)) for i, s in zip(indices, samples)})
        return [results[i] for i in range(len(items))]

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as error:  # keep serving what was served; say why in /readyz
                self.poll_error = f"registry poll failed: {type(error).__name__}: {error}"
                log.warning(self.poll_error)
            self._polled_once.set()
            await asyncio.sleep(self.settings.poll_interval_s)

    async def poll(self) -> None:
        """Read the aliases of every served model; load and warm new versions, then switch to them."""
        for name in self.settings.models:
            snapshot = await asyncio.to_thread(read_registry, self.settings.tracking_uri, name)
            previous = self.snapshots.get(name)
            budgets = dict(snapshot.budgets)
            for steps, version in snapshot.budgets.items():
                key = model_id(name, version)
                try:
                    # every poll: a cache hit keeps the live champions the most recently used (never
                    # the ones evicted), and one evicted anyway is loaded again here, not in a request
                    self.cards[key] = (await self.get_service(key)).card()
                    if key not in self.warm:
                        self.warm.add(key)
                        log.info(f"serving {key} for T={steps}")
                except Exception as error:  # keep the previous holder of that budget, if any
                    log.warning(f"could not load {key} for T={steps}: {error}")
                    held = previous.budgets.get(steps) if previous else None
                    if held is None:
                        budgets.pop(steps)
                    else:
                        budgets[steps] = held
            versions = {**(previous.versions if previous else {}), **snapshot.versions}
            # one assignment: a request reads either the old snapshot or the new one, never a mix
            self.snapshots[name] = ModelSnapshot(name, snapshot.registered, budgets, snapshot.default_steps,
                                                 {v: versions[v] for v in set(budgets.values()) if v in versions})
        served = {model_id(name, v) for name, snap in self.snapshots.items() for v in snap.budgets.values()}
        self.latencies = {key: times for key, times in self.latencies.items() if key in served}  # retired: gone
        self.cards = {key: card for key, card in self.cards.items() if key in served}
        self.polled_at, self.poll_error = time.time(), None

    def _problems(self) -> list[str]:
        if self.polled_at is None:
            return [self.poll_error or "the registry has not been read yet"]
        found = []
        for name in self.settings.models:
            snapshot = self.snapshots[name]
            problem = snapshot.problem()
            if problem is None and snapshot.default_steps not in snapshot.budgets:
                problem = f"model {name!r}: the champion version could not be loaded"
            if problem:
                found.append(problem)
        return found

    @api.get("/", include_in_schema=False)
    async def playground(self) -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html")

    @api.get("/healthz", summary="the process is up")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    def _latency_ms_p50(self, key: str) -> float | None:
        recent = self.latencies.get(key)
        return 1000.0 * statistics.median(recent) if recent else None

    def _version_entry(self, name: str, info: VersionInfo) -> VersionEntry:
        key = model_id(name, info.version)
        card = self.cards.get(key)
        return VersionEntry(**{**asdict(info), "aliases": list(info.aliases)}, latency_ms_p50=self._latency_ms_p50(key),
                            card=None if card is None else Card(**{**asdict(card), "formats": list(card.formats)}))

    @api.get("/readyz", summary="every served model has a champion loaded (503 with the reasons otherwise)")
    async def readyz(self) -> JSONResponse:
        problems = self._problems()
        if problems:
            return JSONResponse({"ready": False, "detail": "; ".join(problems)}, status_code=503)
        return JSONResponse({"ready": True, "models": {n: s.budgets for n, s in self.snapshots.items()}})

    @api.get("/v1/models", response_model=ModelsResponse, summary="served versions, aliases, budgets, metrics")
    async def models(self) -> ModelsResponse:
        entries = []
        for name in self.settings.models:
            snapshot = self.snapshots.get(name) or ModelSnapshot(name, registered=False)
            versions = [self._version_entry(name, v)
                        for _, v in sorted(snapshot.versions.items(), key=lambda item: int(item[0]))]
            entries.append(ModelEntry(name=name, default_steps=snapshot.default_steps, budgets=snapshot.budgets,
                                      versions=versions, problem=snapshot.problem()))
        return ModelsResponse(models=entries, poll_interval_s=self.settings.poll_interval_s, polled_at=self.polled_at)

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses={404: {"description": "model not served"}, 413: {"description": "body too large"},
                         422: {"description": "invalid request; detail[].loc names the field"},
                         503: {"description": "no champion yet"}},
              summary="draw samples from the champion of a step budget")
    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        start = time.perf_counter()
        name = body.model or self.settings.models[0]
        if name not in self.settings.models:
            raise _error(404, "model", f"{name!r} is not served here; served: {list(self.settings.models)}")
        snapshot = self.snapshots.get(name)
        if snapshot is None:
            raise HTTPException(503, detail=self.poll_error or "the registry has not been read yet")
        steps, route = body.steps, None
        if body.quality is not None:  # the fewest-steps champion whose recorded test metric meets it
            if not snapshot.budgets:  # nothing served yet: the server's state, not the request's fault
                raise HTTPException(503, detail=snapshot.problem() or f"model {name!r} has no champion loaded")
            bound, bound_kind = body.quality.bound
            try:
                route = route_by_quality(snapshot, body.quality.metric, bound, bound_kind)
            except RoutingError as error:
                raise _error(422, "quality", str(error)) from None
            except ValueError as error:
                raise _error(422, "quality.metric", str(error)) from None
            steps = route.steps
        if steps is None:
            if snapshot.problem():
                raise HTTPException(503, detail=snapshot.problem())
            steps = snapshot.default_steps
        if steps not in snapshot.budgets:
            if not snapshot.budgets:
                raise HTTPException(503, detail=snapshot.problem() or f"model {name!r} has no champion loaded")
            raise _error(422, "steps", f"{steps}: not a served step budget of {name!r}; served: "
                         f"{sorted(snapshot.budgets)}")
        version = snapshot.budgets[steps]
        # the service is fetched once: this request keeps its version whatever the poller does meanwhile
        try:
            service = await self.get_service(model_id(name, version))
        except Exception as error:  # a version that cannot be (re)loaded here: a server fault, said as such
            raise HTTPException(503, detail=f"model {name!r} version {version} (T={steps}) cannot be loaded on "
                                f"this replica: {type(error).__name__}: {error}") from None
        clamp = body.conditioning
        request = GenerationRequest(num_samples=body.num_samples, seed=body.seed, prefix=body.prefix,
                                    format=body.format, positions=clamp.positions if clamp else None,
                                    tokens=clamp.tokens if clamp else None)
        try:  # checked before batching: a bad request never fails the batch it would have joined
            prepared = service.prepare(request)
        except RequestError as error:
            raise _error(422, error.field, error.message) from None
        result = await self.run_batch((service, prepared))
        if isinstance(result, Exception):
            raise result
        tokens, batch_requests = result
        # rendering (text, PNG encoding) and tolist take milliseconds per large request: off the event
        # loop, so other requests keep being accepted and batched meanwhile
        samples, token_lists = await asyncio.to_thread(lambda: (service.render(tokens, body.format), tokens.tolist()))
        quality = None if route is None else RecordedQuality(metric=route.metric, value=route.value, stderr=route.stderr,
                                                             bound=bound, bound_kind=bound_kind)
        elapsed = time.perf_counter() - start
        self.latencies.setdefault(model_id(name, version), deque(maxlen=LATENCY_WINDOW)).append(elapsed)
        return GenerateResponse(model=name, version=version, alias=champion_alias(steps), steps=service.num_steps,
                                seed=prepared.seed, format=body.format, samples=samples, tokens=token_lists,
                                batch_requests=batch_requests, elapsed_s=elapsed, quality=quality)


def build_application(args: dict[str, Any], loader: Loader = load_registered_model) -> Application:
    """The application from a serve config's `args` (see configs/serve.yaml). `loader` loads a
    registry version; the default reads it from MLflow."""
    settings = ServeSettings.from_dict(args, default_tracking_uri=tracking_uri())
    return GenerationServer.options(**settings.deployment).bind(settings.to_dict(), loader)


def build_app(args: dict[str, Any]) -> Application:
    """The `import_path` of configs/serve.yaml: Serve calls it with the application's `args`
    (an application builder takes exactly one parameter)."""
    return build_application(args)
