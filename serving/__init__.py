"""serving: the Ray Serve generation endpoint over the MLflow registry's champions.

app.py (the one deployment: FastAPI ingress, multiplexed versions, batching; `build_app` for
configs/serve.yaml), schemas.py (the HTTP
request/response models), registry.py (which version serves which step budget; the model
loader), settings.py (the config's `args`), run.py (`fldd serve`). The sampling itself, with
its request checks and limits, is fldd.service, shared with the MLflow pyfunc model.
"""
