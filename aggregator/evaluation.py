"""The aggregator's own evaluation of the global model (``[evaluate]``):
the model and the held-out data are built on first use, in the process
that runs the job; nothing here is loaded from the network."""

from __future__ import annotations

from typing import Any

from aggregator.config import AggregatorConfig


class Evaluator:
    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self._model: Any = None
        self._data: Any = None

    def evaluate(self, model_arrays: dict) -> dict[str, float]:
        """Accuracy and loss of ``model_arrays`` on the evaluation data."""
        from fedge import torchkit

        cfg = self.cfg
        if self._model is None:
            self._model = torchkit.build_model(cfg.job.model, cfg.job.model_args)
            self._data = torchkit.load_data(cfg.evaluate.data, cfg.evaluate.args)
        torchkit.load_federated(self._model, model_arrays)
        return torchkit.evaluate(self._model, self._data, cfg.training.loss, cfg.evaluate.batch_size)
