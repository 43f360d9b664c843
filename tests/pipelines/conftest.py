"""Helpers for the pipeline tests (the Ray cluster and project-home fixtures live in tests/conftest.py)."""


def toy_config(**overrides):
    from fldd.config import FLDDConfig
    from fldd.config import CONFIG_DIR

    base = {"train.steps": 60, "train.log_every": 20, "train.checkpoint_every": 20, "data.num_train": 4000,
            "data.num_valid": 500, "reverse_network.width": 64, "forward_network.width": 64}
    return FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides({**base, **overrides})
