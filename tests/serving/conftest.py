"""Serving tests: tiny real models trained, registered and promoted in a real MLflow store, served
by the real Ray Serve application on 127.0.0.1 (a free port) of the session's Ray cluster."""

import os
import socket

# the HTTP proxy misses Serve's 5 s readiness checks on a busy 2-core box (STACK_NOTES): this must
# be in the environment before the session's Ray cluster starts, and conftest files load first
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
