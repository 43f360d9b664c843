"""pipelines: Ray Train + MLflow launchers and the `fldd` CLI (the CLI is in-process for now)."""
