"""The MLflow pyfunc sampler, logged as models-from-code: weights + config are artifacts, no pickles.

`mlflow.pyfunc.load_model(uri).predict(None, params={"num_samples": 16, "steps": T, "seed": 0})`
returns an (num_samples, D) int64 array of samples drawn with the model's T-step sampler.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from fldd.model import FLDDModel
from fldd.sampler import sample


class FLDDSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = FLDDModel.load(context.artifacts["model"]).eval()

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        num_samples = int(params.get("num_samples", 16))
        steps = int(params.get("steps", self.model.num_steps))
        if steps != self.model.num_steps:
            raise ValueError(f"steps={steps}: this model samples on the T={self.model.num_steps} grid it was trained on")
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        return sample(self.model, num_samples, generator=generator).numpy()


mlflow.models.set_model(FLDDSampler())
