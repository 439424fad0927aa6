"""A small local HTTP API for an inference-only device: predictions from the
latest verified ONNX model, with ONNX Runtime and the standard library only.

    GET  /health    {"ready": true, "round": 7, "sha256": "...", "variant": "int8"}
    POST /predict   {"inputs": [[...], ...]}  or  {"inputs": {"x": [[...]]}}
                 -> {"predictions": [...], "probabilities": [[...]], "round": 7}

It binds to loopback unless told otherwise (inference.serve), refuses bodies
over 8 MiB, and answers a bad request (not JSON, the wrong shape, NaN or
infinite values: ``fedge.onnxrt.check_input``) with 400 and one line saying
why.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from fedge.onnxrt import softmax

log = logging.getLogger("fedge.agent.serve")
MAX_BODY = 8 << 20


class ServedModel:
    """The predictor and what the device knows about it, swapped as a whole."""

    def __init__(self, predictor: Any, info: dict[str, Any]) -> None:
        self.predictor = predictor
        self.info = info


class PredictionServer:
    def __init__(self, address: str, current: Callable[[], ServedModel | None]) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"inference.serve {address!r} must look like 127.0.0.1:8080")
        self.current = current
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path != "/health":
                    self._send(404, {"error": "unknown path; use GET /health or POST /predict"})
                    return
                model = server.current()
                self._send(200, {"ready": model is not None, **(model.info if model else {})})

            def do_POST(self) -> None:
                if self.path != "/predict":
                    self._send(404, {"error": "unknown path; use POST /predict"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._send(413, {"error": f"request of {length} bytes exceeds {MAX_BODY}; send fewer rows"})
                    return
                model = server.current()
                if model is None:
                    self._send(503, {"error": "no model yet: waiting for the aggregator to publish one"})
                    return
                try:
                    request = json.loads(self.rfile.read(length) or b"{}")
                    self._send(200, predict(model, request))
                except (ValueError, TypeError, KeyError) as exc:
                    self._send(400, {"error": str(exc).splitlines()[0]})

        self.httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fedge-serve", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def predict(model: ServedModel, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict) or "inputs" not in request:
        raise ValueError('send a JSON object {"inputs": [[...], ...]}')
    raw = request["inputs"]
    # The predictor casts each input to the dtype the model declares.
    inputs = {k: np.asarray(v) for k, v in raw.items()} if isinstance(raw, dict) else np.asarray(raw)
    logits = model.predictor.predict(inputs)
    out: dict[str, Any] = {"round": model.info.get("round"), "outputs": logits.tolist()}
    if logits.ndim == 2 and logits.shape[1] >= 2:
        probs = softmax(logits)
        out["predictions"] = probs.argmax(axis=1).tolist()
        out["probabilities"] = probs.round(6).tolist()
    return out
