"""Model factories the export tests name by import path, as a user names
theirs (``tests.export.zoo:mlp``): one of each family a fleet runs, small
enough to export, verify and quantize in seconds.

Also two factories that must fail the right way: one that returns something
other than a module, and one whose forward() uses an operator without an
ONNX translation.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_features: int = 64, hidden: int = 32, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def cnn(classes: int = 10) -> nn.Module:
    """Conv + BatchNorm (folded into the conv by the exporter), input (n, 1, 28, 28)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, classes),
    )


class _DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                       nn.BatchNorm2d(cin), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def mobilenet_block(classes: int = 10) -> nn.Module:
    """A MobileNet-style stem, two depthwise-separable blocks and a pooled head; input (n, 3, 32, 32)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        _DepthwiseSeparable(16, 32, 1), _DepthwiseSeparable(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )


class _RecurrentClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module], features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        if isinstance(h, tuple):  # LSTM returns (h, c)
            h = h[0]
        return self.head(h[-1])


def lstm(features: int = 16, hidden: int = 32, classes: int = 5) -> nn.Module:
    """Input (n, time, features), batch first; the last hidden state feeds a linear head."""
    return _RecurrentClassifier(nn.LSTM, features, hidden, classes)


def gru(features: int = 16, hidden: int = 32, classes: int = 5) -> nn.Module:
    return _RecurrentClassifier(nn.GRU, features, hidden, classes)


class _TransformerClassifier(nn.Module):
    def __init__(self, features: int, d_model: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def transformer(features: int = 8, d_model: int = 32, classes: int = 3) -> nn.Module:
    """Two encoder layers, d_model 32, mean-pooled; input (n, time, features)."""
    return _TransformerClassifier(features, d_model, classes)


def not_a_module() -> object:
    return {"weights": [1, 2, 3]}


@torch.library.custom_op("fedge_zoo::sensor_fusion", mutates_args=())
def _sensor_fusion(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@_sensor_fusion.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_sensor_fusion(x))


def custom_op_model() -> nn.Module:
    """Uses a custom operator that has no ONNX translation."""
    return _CustomOpModel()


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(2, -1))


def fixed_batch_model() -> nn.Module:
    """forward() hard-codes the batch size: cannot get a dynamic batch."""
    return _FixedBatch()


class _TokenClassifier(nn.Module):
    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


def token_classifier(vocab: int = 50, dim: int = 8, classes: int = 3) -> nn.Module:
    """Token ids (n, length) -> an embedding table of ``vocab`` rows -> mean -> classes; any length."""
    return _TokenClassifier(vocab, dim, classes)


class _Positives(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x > 0)


def positives() -> nn.Module:
    """Indices of the positive entries: an output whose length depends on the data, not the batch."""
    return _Positives()


class _BranchOnValues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: tracing keeps one branch
            return x * 2
        return x - 1


def branch_on_values() -> nn.Module:
    return _BranchOnValues()
