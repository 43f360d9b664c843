"""Champion aliases and their history: moving them after a promotion, and rolling them back.

Per step budget T the alias `champion-t<T>` names the best version the gate has accepted, and
`champion` follows `champion-t<default budget>`. Each alias has a history (registered-model tag
`fldd.history.<alias>`, a JSON list of versions in the order they held it), so `rollback` can give
the alias back to its previous holder, one step per call. Signals wait until an alias and its
history have both moved (`uninterrupted`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator

from mlflow.entities.model_registry import RegisteredModel
from mlflow.tracking import MlflowClient

from pipelines.model_store import RegistryError, alias_holder, get_registered_model, registry_client
from pipelines.vocabulary import CHAMPION, DEFAULT_BUDGET_TAG, ROLLED_BACK_AT_TAG, champion_alias, history_tag


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
