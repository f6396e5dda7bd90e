"""Custom MLServer runtimes, run by MLServer in its own venv (tests/serve/third_party/
mlserver-requirements.txt): numpy and onnxruntime only, never mirage or torch.

- ``Linear``: a fixed softmax-linear classifier, p = softmax(x.reshape(B, -1) @ W), with W read
  from the ``.npy`` file in its model settings' ``parameters.uri``; it answers ``probabilities``
  or, with ``parameters.extra.output = "logits"``, the logits, as the output ``parameters.extra.
  output_name`` (default ``probs``). The tests compute the same in numpy.
- ``Onnx``: an ONNX classifier run with onnxruntime (``parameters.uri``), answering its logits
  (benchmarks/oip_throughput.py's gateway row).
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


def _images(payload: InferenceRequest) -> np.ndarray:
    tensor = payload.inputs[0]
    return np.asarray(NumpyCodec.decode_input(tensor), dtype=np.float32).reshape(tensor.shape)


def _response(name: str, output: str, values: np.ndarray) -> InferenceResponse:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return InferenceResponse(
        model_name=name,
        outputs=[
            ResponseOutput(
                name=output,
                shape=list(values.shape),
                datatype="FP32",
                data=values.reshape(-1).tolist(),
            )
        ],
    )


class Linear(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        self.weights = np.load(self.settings.parameters.uri).astype(np.float64)
        self.kind = extra.get("output", "probabilities")
        self.output_name = extra.get("output_name", "probs")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = _images(payload).astype(np.float64)
        z = x.reshape(len(x), -1) @ self.weights
        if self.kind == "probabilities":
            z = np.exp(z - z.max(axis=1, keepdims=True))
            z /= z.sum(axis=1, keepdims=True)
        return _response(self.name, self.output_name, z)


class Onnx(MLModel):
    async def load(self) -> bool:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        threads = (self.settings.parameters.extra or {}).get("threads")
        if threads:
            options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        (logits, *_) = self.session.run(None, {self.input_name: _images(payload)})
        return _response(self.name, "logits", logits)
