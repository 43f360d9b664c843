"""Ray start-up for every job (training, sweeps, serving): `init_ray` joins the cluster at an
address or starts a fresh local one (`start_local_ray`). Before joining an existing cluster, a quick
look at its address (`prepare_connection`).

`ray.init(address="HOST:PORT")` fails slowly and says little. Against a cluster with token
authentication (Ray 2.59+ turns it on for `ray start --head` on a machine with ~/.ray/auth_token)
a client without RAY_AUTH_MODE=token retries "InvalidAuthToken" for about 20 s, then raises a bare
ConnectionError; with an explicit address Ray never turns token mode on by itself, even when the
token is on this machine. An address where nothing listens keeps `ray.init` waiting for minutes.

`prepare_connection` asks the cluster's GCS for its cluster id over gRPC (milliseconds), once
without a token and, if refused, once with this machine's token, and then:
- no token auth: nothing to do;
- token auth and a matching token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token):
  turns RAY_AUTH_MODE=token on for this process, as `ray start` and `ray.init()` do for a local one;
- no token here, a token the cluster refuses, RAY_AUTH_MODE=disabled, nothing listening, or not a
  Ray GCS: raises ClusterConnectionError at once, with what to do.

Only public means, except one line: the probe is a plain gRPC call by method name (no generated
stubs), and the token is read in Ray's documented order and sent in Ray's header, `authorization:
Bearer <token>` (tests/pipelines/test_cluster.py checks both against `ray get-auth-token` and a real
token-auth head). Turning token mode on for this process still needs `ray._raylet.Config` (see
`_enable_token_mode`); pyproject's Ray range lists the versions this was tested with.

Known limit: Ray reads the token once per process. A long-lived process that already joined a
token-auth cluster and then sees another token (RAY_AUTH_TOKEN or HOME changed) passes this check
with the new token while `ray.init` still sends the old one; every command here is a new process.
"""

from __future__ import annotations

import logging
import os
import socket

import grpc
import ray
from ray._raylet import Config  # private: the one use is _enable_token_mode (no public route, see there)

from fldd.config import ConfigError

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's documented switch for token authentication
PROBE_TIMEOUT_S = 5.0
# the GCS method the probe calls: its request message has no fields, so b"" is its serialized form
# and no generated stubs are needed
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
TOKEN_WHITESPACE = " \t\n\r\f\v"  # what Ray trims from a token (C++ isspace)
TOKEN_HELP = ("put the cluster's token (on the head node: `ray get-auth-token`, or its ~/.ray/auth_token) in "
              "~/.ray/auth_token on this machine, or in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH), "
              "and set RAY_AUTH_MODE=token")


class ClusterConnectionError(ConfigError):
    """The Ray cluster at an address cannot be joined from here; the message says why and what to do."""


def _probe(address: str, token_headers: dict[str, str] | None, timeout: float) -> tuple[str, str]:
    """(status code name, details) of one GetClusterId call to the GCS at `address`."""
    # no HTTP proxy: a proxy would answer for any address (seen here: "http2 header with status: 404")
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        # no (de)serializers: the request and the reply stay bytes (only the status matters)
        get_cluster_id = channel.unary_unary(GCS_PROBE_METHOD)
        try:
            get_cluster_id(b"", timeout=timeout, metadata=list((token_headers or {}).items()))
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
    return "OK", ""


def _first_line(path: str) -> str:
    """The token in a token file as Ray reads it: its first line, trimmed ("" when unreadable)."""
    try:
        with open(path, "rb") as file:  # binary: only "\n" ends the line, as in Ray's getline
            line = file.readline()
    except OSError:
        return ""
    try:
        return line.decode().strip(TOKEN_WHITESPACE)
    except UnicodeDecodeError as error:
        raise ClusterConnectionError(f"cannot read this machine's Ray auth token from {path}: {error}; "
                                     f"{TOKEN_HELP}") from error


def _local_token() -> tuple[str, str]:
    """This machine's Ray auth token ("" when there is none) and where it was read, found as Ray
    finds it (https://docs.ray.io/en/latest/ray-security/token-auth.html): RAY_AUTH_TOKEN, else the
    file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. A set variable wins even when it holds
    only whitespace, as in Ray. Read on every call: RAY_AUTH_TOKEN / HOME may change within a process."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(TOKEN_WHITESPACE), "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        token = _first_line(token_path)
        if not token:  # Ray refuses to start with this too
            raise ClusterConnectionError(f"cannot read this machine's Ray auth token: RAY_AUTH_TOKEN_PATH is set "
                                         f"but file cannot be opened or is empty: {token_path}; {TOKEN_HELP}")
        return token, f"RAY_AUTH_TOKEN_PATH={token_path}"
    # Ray's own fallback when HOME is unset or empty: ./.ray/auth_token
    return _first_line(os.path.join(os.environ.get("HOME") or ".", ".ray", "auth_token")), "~/.ray/auth_token"


def _token_headers(token: str) -> dict[str, str]:
    """The authorization header Ray sends with `token` ({} for no token)."""
    return {"authorization": f"Bearer {token}"} if token else {}


def _local_token_headers() -> dict[str, str]:
    """The authorization header Ray sends with this machine's token ({} when there is none)."""
    return _token_headers(_local_token()[0])


def _enable_token_mode() -> None:
    """RAY_AUTH_MODE=token for this process (and what it starts), as Ray's own `_enable_token_auth`.

    The one private Ray API left here, because no public one exists: Ray reads its config (the auth
    mode among it) from the environment once, at `import ray`, and `ray.init(address=...)` never
    re-reads it, so the variable alone does not reach this process's own connection (the
    real-cluster test fails without this line: ray.init raises ConnectionError)."""
    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")  # re-read the environment, as `_enable_token_auth` does


def prepare_connection(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Check that the Ray cluster at HOST:PORT (its GCS) can be joined from here; turn token mode on
    when the cluster needs it and the token is here. Raises ClusterConnectionError otherwise.

    `auto` and `ray://` addresses, TLS clusters (RAY_USE_TLS) and Kubernetes token auth
    (RAY_ENABLE_K8S_TOKEN_AUTH: a service-account token) are left to `ray.init`."""
    if address == "auto" or "://" in address or any(
            os.environ.get(name, "0").lower() in ("1", "true") for name in ("RAY_USE_TLS", "RAY_ENABLE_K8S_TOKEN_AUTH")):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterConnectionError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, "
                                     "6379 unless `ray start --head --port` chose another), auto or ray://HOST:PORT")
    code, details = _probe(address, None, timeout)
    if code == "OK":
        return
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        raise ClusterConnectionError(
            f"no Ray cluster answers at {address} ({details or code}): start one with "
            f"`ray start --head --port={port}` on {host}, or give the head's address and GCS port "
            "(`ray start --head` prints it)")
    if code != "UNAUTHENTICATED":
        raise ClusterConnectionError(f"{address} does not answer as a Ray cluster's GCS (gRPC {code}: {details}): "
                                     "give the head's GCS address (HOST:PORT), not its dashboard or client port")
    # the cluster runs with token authentication
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        raise ClusterConnectionError(f"the Ray cluster at {address} requires token authentication, but "
                                     f"{AUTH_MODE_ENV}={mode} here: set {AUTH_MODE_ENV}=token (the token must be "
                                     "on this machine: ~/.ray/auth_token or RAY_AUTH_TOKEN)")
    token, source = _local_token()
    headers = _token_headers(token)
    if not headers:
        raise ClusterConnectionError(f"the Ray cluster at {address} requires token authentication and this "
                                     f"machine has no token: {TOKEN_HELP}")
    code, details = _probe(address, headers, timeout)
    if code == "UNAUTHENTICATED":
        raise ClusterConnectionError(f"the Ray cluster at {address} refused this machine's auth token (from "
                                     f"{source}): it is not the cluster's; {TOKEN_HELP}")
    if code != "OK":
        raise ClusterConnectionError(f"the Ray cluster at {address} did not answer with the token (gRPC {code}: "
                                     f"{details})")
    if mode is None:
        log.info("the Ray cluster at %s uses token authentication: joining with this machine's token "
                 "(RAY_AUTH_MODE=token)", address)
        _enable_token_mode()


def _ray_log_level() -> int:
    """ray.init resets the `ray` logger to its logging_level (INFO by default): keep the level the
    command line chose (WARNING unless --verbose)."""
    return logging.getLogger("ray").getEffectiveLevel()


def init_ray(address: str | None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS), else start a fresh local one. Before joining,
    prepare_connection (below) checks the address in milliseconds: it turns token auth on
    when the cluster needs it and the token is on this machine, and otherwise raises
    ClusterConnectionError (a ConfigError) saying what to do, instead of Ray's retries."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # a fresh local cluster (never attach to a stale one by accident)
        start_local_ray(log_to_driver=log_to_driver)
        return
    # fail fast with what to do (no token, nothing listening); token mode on when the cluster needs it
    prepare_connection(address)
    # tell the cluster's own processes which cluster they are in (see start_local_ray)
    env = {} if address == "auto" or address.startswith("ray://") else {"env_vars": {"RAY_ADDRESS": address}}
    ray.init(address=address, log_to_driver=log_to_driver, runtime_env=env or None, logging_level=_ray_log_level())


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """A new local cluster on 127.0.0.1 whose processes know its address.

    Ray Train's placement-group cleaner (it frees a Tune trial's workers when the trial is stopped
    early) asks the state API with no address; with two local clusters on the machine (a sweep and
    a server, or tests) that fails with "multiple active Ray instances" and the stopped trial's CPUs
    leak, so the next trial waits forever. Fixing the GCS port up front lets every worker carry
    RAY_ADDRESS. The dashboard stays on: without it the same cleanup is skipped (STACK_NOTES).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts the head node
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=log_to_driver, runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}},
                 logging_level=_ray_log_level())
    finally:  # later clusters started from this process (or its children) pick their own port
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
