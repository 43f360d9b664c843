"""pipelines: Ray Train + MLflow: the training launcher, Ray start-up, tracking, the registry gate, reports."""
