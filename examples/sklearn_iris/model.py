"""The iris classifier as a KServe model: trained at start-up on scikit-learn's bundled iris data (no download).

A plain ``kserve.Model`` with no telemetry code: the KServe instrumentation times its three steps. It answers
the v1 protocol (``{"instances": [[...4 floats...], ...]}``) and the v2 protocol over REST and gRPC (one FP32 or
FP64 input of shape ``[n, 4]``).
"""

from __future__ import annotations

from typing import Any

import kserve
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse


class IrisModel(kserve.Model):
    """Logistic regression on the iris data set; predicts the class index (0, 1, 2) of each row."""

    def __init__(self, name: str = "iris") -> None:
        super().__init__(name)
        self.classifier: Any = None

    def load(self) -> bool:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        features, labels = load_iris(return_X_y=True)
        self.classifier = LogisticRegression(max_iter=1000).fit(features, labels)
        self.ready = True
        return self.ready

    def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Decode either protocol into the feature rows, remembering how to answer."""
        if isinstance(payload, InferRequest):
            rows = payload.inputs[0].as_numpy()
            return {"rows": np.asarray(rows, dtype=np.float64).reshape(-1, 4), "v2": True, "id": payload.id}
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list):
            raise kserve.errors.InvalidInput('expected {"instances": [[sepal length, sepal width, petal length, petal width], ...]}')
        return {"rows": np.asarray(instances, dtype=np.float64).reshape(-1, 4), "v2": False, "id": None}

    def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        return {**payload, "classes": self.classifier.predict(payload["rows"])}

    def postprocess(
        self, result: dict[str, Any], headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        classes = np.asarray(result["classes"], dtype=np.int64)
        if not result["v2"]:
            return {"predictions": classes.tolist()}
        output = InferOutput(name="output-0", shape=list(classes.shape), datatype="INT64", data=classes.tolist())
        return InferResponse(response_id=result["id"] or "", model_name=self.name, infer_outputs=[output])
