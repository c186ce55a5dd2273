"""The iris model as a Ray Serve application: a preprocessor deployment calling a 2-replica model deployment
through a ``DeploymentHandle``. No telemetry code but two ``@instrument_step`` decorators: the model's
``__call__`` is its ``predict`` step by kserve-otel's ``ray_steps`` default.

    POST /  {"instances": [[6.8, 2.8, 4.8, 1.4], ...]}  ->  {"predictions": [1, ...]}
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from kserve_otel import instrument_step


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class IrisClassifier:
    """Logistic regression on scikit-learn's bundled iris data, trained when the replica starts."""

    def __init__(self) -> None:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        self.name = "iris"  # the model_name label of its steps
        features, labels = load_iris(return_X_y=True)
        self.classifier = LogisticRegression(max_iter=1000).fit(features, labels)

    def __call__(self, rows: list[list[float]]) -> list[int]:
        return self.classifier.predict(np.asarray(rows, dtype=np.float64).reshape(-1, 4)).tolist()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Preprocessor:
    """The HTTP ingress: decodes and checks the request, asks the model, shapes the answer."""

    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model

    @instrument_step("preprocess", model_name="iris")
    def preprocess(self, body: dict[str, Any]) -> list[list[float]]:
        rows = body.get("instances")
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 4 for r in rows):
            raise ValueError('expected {"instances": [[4 numbers], ...]}')
        return [[round(float(x), 1) for x in row] for row in rows]

    @instrument_step("postprocess", model_name="iris")
    def postprocess(self, classes: list[int]) -> dict[str, Any]:
        return {"predictions": classes}

    async def __call__(self, request: Request) -> dict[str, Any]:
        rows = self.preprocess(await request.json())
        return self.postprocess(await self.model.remote(rows))


app = Preprocessor.bind(IrisClassifier.bind())
