"""Champion aliases and their history: moving them after a promotion, and rolling them back.

Per step budget T the alias `champion-t<T>` names the best version the gate has accepted, and
`champion` follows `champion-t<default budget>`. Each alias has a history (registered-model tag
`fldd.history.<alias>`, a JSON list of versions in the order they held it), so `rollback` can give
the alias back to its previous holder, one step per call. Signals wait until an alias and its
history have both moved (`uninterrupted`).

Moves are serialized across processes and machines by `alias_lock` (the registry has no
transactions): two promotions at once cannot both move an alias they were judged against, and the
history's read-modify-write cannot lose an entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.model_store import RegistryError, alias_holder, get_registered_model, registry_client
from pipelines.vocabulary import (ALIAS_LOCK_SUFFIX, CHAMPION, DEFAULT_BUDGET_TAG, LOCK_OWNER_TAG, ROLLED_BACK_AT_TAG,
                                  champion_alias, history_tag)

LOCK_WAIT_S = 60.0  # how long a promotion waits for another one's alias move before giving up
LOCK_STALE_S = 120.0  # a lock this old was left by a killed process (a move takes well under a second)


class RollbackError(RuntimeError):
    """A rollback that cannot be done: no previous holder, or an alias history out of step. (exit 1)"""


def alias_history(model: RegisteredModel, alias: str) -> list[str]:
    raw = model.tags.get(history_tag(alias))
    return [str(v) for v in json.loads(raw)] if raw else []


def set_alias_history(client: MlflowClient, name: str, alias: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(history))


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then take effect, so a signal never leaves the
    aliases of one decision and their history tags half-moved. (An MLflow error in between still
    can: the registry has no transactions. Signals reach only the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in watched}
    for s in watched:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])  # delivered now, to the handler that was in place


@contextlib.contextmanager
def alias_lock(client: MlflowClient, name: str, wait_s: float = LOCK_WAIT_S,
               stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Held by one process at a time for `name`, across machines sharing the tracking store: the
    registered model NAME.fldd-alias-lock exists while it is held. Creating it is the one atomic
    step the registry offers (model names are unique in its database). Its owner tag carries a
    token of this holder: the lock is released only by the holder whose token it carries. A lock
    seen unchanged (same creation time) for `stale_s` on this machine's clock was left by a process
    killed while holding it, and is broken; RegistryError after `wait_s`."""
    lock = name + ALIAS_LOCK_SUFFIX
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_s
    seen: tuple[int, float] | None = None  # (the lock's creation time, when this process first saw it)
    while True:
        try:
            client.create_registered_model(lock, tags={LOCK_OWNER_TAG: token},
                                           description=f"held while fldd moves the aliases of {name!r}")
            break
        except MlflowException as error:  # taken, or released between the insert and MLflow's re-read
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        held = get_registered_model(client, lock)
        if held is None:
            continue
        if seen is None or seen[0] != held.creation_timestamp:
            seen = (held.creation_timestamp, time.monotonic())
        elif time.monotonic() - seen[1] > stale_s:
            again = get_registered_model(client, lock)
            if again is not None and again.creation_timestamp == seen[0]:  # still the same stale lock
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
            seen = None
            continue
        if time.monotonic() > deadline:
            waited = time.monotonic() - seen[1]
            raise RegistryError(f"another promotion or rollback of {name!r} has held the lock {lock!r} for at least "
                                f"{waited:.0f} s (owner {held.tags.get(LOCK_OWNER_TAG, '?')}); a lock held "
                                f"{stale_s:.0f} s is taken as left by a killed process and broken: retry then")
        time.sleep(0.1 + 0.2 * random.random())  # jitter: waiters do not retry in step
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            current = get_registered_model(client, lock)
            if current is not None and current.tags.get(LOCK_OWNER_TAG) == token:  # never another holder's
                client.delete_registered_model(lock)


def move_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    registered = client.get_registered_model(name)
    history = alias_history(registered, alias)
    current = alias_holder(client, name, alias)
    if current is not None and (not history or history[-1] != str(current.version)):
        history.append(str(current.version))  # set outside fldd promote: keep it so rollback can return to it
    client.set_registered_model_alias(name, alias, version)
    set_alias_history(client, name, alias, history + [str(version)])


def move_champion_aliases(client: MlflowClient, name: str, T: int, version_number: str) -> list[str]:
    """Give `champion-t<T>` (and `champion` when T is the default budget) to a promoted version;
    returns the aliases moved."""
    if DEFAULT_BUDGET_TAG not in client.get_registered_model(name).tags:
        # the first budget ever promoted is the one `champion` follows (a refused first version sets nothing)
        client.set_registered_model_tag(name, DEFAULT_BUDGET_TAG, str(T))
    aliases = [champion_alias(T)]
    if str(T) == client.get_registered_model(name).tags.get(DEFAULT_BUDGET_TAG):
        aliases.append(CHAMPION)
    for moved in aliases:
        move_alias(client, name, moved, version_number)
    return aliases


def rollback(model_name: str, budget: int | None = None, client: MlflowClient | None = None) -> dict[str, str]:
    """Give `champion-t<T>` back to its previous holder (and `champion` when it held the same
    version), dropping the last entry of the alias history. Returns {alias: version now}."""
    client = registry_client(client)
    registered = get_registered_model(client, model_name)
    if registered is None:
        raise RegistryError(f"no registered model {model_name!r} in {client.tracking_uri}")
    if budget is None:
        if DEFAULT_BUDGET_TAG not in registered.tags:
            raise RegistryError(f"model {model_name!r} has no {DEFAULT_BUDGET_TAG} tag: give --budget")
        budget = int(registered.tags[DEFAULT_BUDGET_TAG])
    with alias_lock(client, model_name):
        return _rollback(client, model_name, budget)


def _rollback(client: MlflowClient, model_name: str, budget: int) -> dict[str, str]:
    registered = client.get_registered_model(model_name)  # read again, under the lock
    alias = champion_alias(budget)
    current = alias_holder(client, model_name, alias)
    if current is None:
        raise RollbackError(f"model {model_name!r} has no alias {alias}: nothing to roll back")
    history = alias_history(registered, alias)
    if not history or history[-1] != str(current.version):
        raise RollbackError(f"{alias} of {model_name!r} is at version {current.version} but its history "
                            f"{history} ends elsewhere (moved outside fldd promote?); set the alias by hand")
    if len(history) < 2:
        raise RollbackError(f"{alias} of {model_name!r} has no previous holder (version {current.version} is the "
                            "first): nothing to roll back to")
    previous = history[-2]
    moved = {alias: previous}
    champion = alias_holder(client, model_name, CHAMPION)
    champion_follows = (champion is not None and str(champion.version) == str(current.version)
                        and str(budget) == registered.tags.get(DEFAULT_BUDGET_TAG))
    with uninterrupted():
        client.set_registered_model_alias(model_name, alias, previous)
        set_alias_history(client, model_name, alias, history[:-1])
        if champion_follows:
            champion_history = alias_history(registered, CHAMPION)
            client.set_registered_model_alias(model_name, CHAMPION, previous)
            if champion_history and champion_history[-1] == str(current.version):
                set_alias_history(client, model_name, CHAMPION, champion_history[:-1])
            moved[CHAMPION] = previous
    client.set_model_version_tag(model_name, str(current.version), ROLLED_BACK_AT_TAG,
                                 time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return moved
