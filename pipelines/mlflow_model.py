"""The MLflow pyfunc sampler, logged as models-from-code: weights + config are artifacts, no pickles.

`mlflow.pyfunc.load_model(uri).predict(None, params={"num_samples": 16, "steps": T, "seed": 0})`
returns an (num_samples, D) int64 array of samples drawn with the model's T-step sampler. It goes
through the same service as the Serve endpoint (fldd.service), with the same request limits;
override them with `load_model(uri, model_config={"max_num_samples": 256})`.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from fldd.model import FLDDModel
from fldd.service import GenerationRequest, Limits, RequestError, SamplerService


class FLDDSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        limits = Limits.from_dict(dict(context.model_config or {}))
        self.service = SamplerService(FLDDModel.load(context.artifacts["model"]), limits)

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        steps = int(params.get("steps", self.service.num_steps))
        try:
            if steps != self.service.num_steps:
                raise RequestError("steps", f"{steps}: this model samples on the T={self.service.num_steps} "
                                   "grid it was trained on")
            _, tokens = self.service(GenerationRequest(num_samples=int(params.get("num_samples", 16)),
                                                       seed=int(params.get("seed", 0))))
        except RequestError as error:  # the scoring server answers these with 400, not 500
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error
        return tokens.numpy()


mlflow.models.set_model(FLDDSampler())
