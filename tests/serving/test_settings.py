"""The serve config's `args` (serving.settings): one `deployment:` section, clear errors naming the
key, and the shipped configs/serve.yaml. No Ray here."""

import re

import pytest
import yaml

from fldd.config import CONFIG_DIR
from serving.settings import DEFAULT_MAX_ONGOING_REQUESTS, ServeSettings, SettingsError

BASE = {"models": ["m"], "tracking_uri": "sqlite:////tmp/x.db"}


def test_shipped_config_has_one_deployment():
    args = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())["applications"][0]["args"]
    settings = ServeSettings.from_dict(args, default_tracking_uri="sqlite:////tmp/x.db")
    assert "ingress" not in args and "sampler" not in args
    assert settings.deployment["max_ongoing_requests"] >= settings.max_batch_size
    assert {"autoscaling_config", "ray_actor_options"} <= set(settings.deployment)
    assert ServeSettings.from_dict(settings.to_dict()) == settings  # what replicas receive


def test_deployment_defaults_and_passthrough():
    assert ServeSettings.from_dict(BASE).deployment == {"max_ongoing_requests": DEFAULT_MAX_ONGOING_REQUESTS}
    options = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    assert ServeSettings.from_dict({**BASE, "deployment": options}).deployment == {
        **options, "max_ongoing_requests": DEFAULT_MAX_ONGOING_REQUESTS}


@pytest.mark.parametrize("old", [{"ingress": {"num_replicas": 1}}, {"sampler": {"max_ongoing_requests": 64}},
                                 {"ingress": {}, "sampler": {}}])
def test_former_two_deployment_sections_say_merge_into_deployment(old):
    with pytest.raises(SettingsError) as error:
        ServeSettings.from_dict({**BASE, **old})
    message = str(error.value)
    assert all(key in message for key in old) and "`deployment:`" in message, message


@pytest.mark.parametrize("args, key", [
    ({"deployment": {"max_ongoing_requests": 8}, "batching": {"max_batch_size": 16}},
     "deployment.max_ongoing_requests"),
    ({"deployment": {"max_ongoing_requests": "64"}}, "deployment.max_ongoing_requests"),
    ({"deployment": ["num_replicas", 2]}, "deployment="),
    ({"replicas": 2}, "unknown keys ['replicas']"),
    ({"deployment": {"num_replica": 2, "max_ongoing_request": 8}},  # typos: named here, not a TypeError from Ray
     "deployment: unknown keys ['max_ongoing_request', 'num_replica']"),
])
def test_bad_deployment_options_name_the_key(args, key):
    with pytest.raises(SettingsError, match=re.escape(key)):
        ServeSettings.from_dict({**BASE, **args})


@pytest.mark.parametrize("args, message", [
    ({"poll_interval_s": True}, "poll_interval_s=True: must be a number > 0"),  # a bool is not a number
    ({"poll_interval_s": float("nan")}, "poll_interval_s=nan: must be a number > 0"),
    ({"max_body_bytes": "65536"}, "max_body_bytes='65536': must be an integer >= 256"),  # no coercion
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size=0: must be an integer >= 1"),
    ({"batching": {"wait": 1}}, "batching: unknown keys ['wait']"),
    ({"batching": {"batch_wait_timeout_s": 11}}, "batching.batch_wait_timeout_s=11: must be a number in [0, 10]"),
    ({"zeta": 1, "alpha": 2, "poll_interval_s": -1}, "unknown keys ['alpha', 'zeta']"),  # all, sorted, first
    ({"models": []}, "models=[]: give one or more registered model names"),
    ({"models": ["a", "a"]}, "models=['a', 'a']: repeated names"),
    ({"models": None}, "models=None: give one or more"),
    ({"limits": [1]}, "limits=[1]: a mapping of request limits"),
    ({"limits": {"max_num_samples": 0}}, "limits.max_num_samples=0: must be an integer >= 1"),
])
def test_every_bad_value_is_named_with_what_it_must_be(args, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        ServeSettings.from_dict({**BASE, **args})
    assert ServeSettings.from_dict({**BASE, "models": "m"}).models == ("m",)  # one name is a list of one
