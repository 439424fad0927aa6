"""Built-in model factories (PyTorch). Import only where PyTorch may load.

- ``digits_mlp``: 64 -> hidden -> 10, for the demo on scikit-learn digits.
- ``tabular_mlp``: a small MLP for tabular data (breast cancer: 30 -> 2).
- ``mnist_2nn``: McMahan et al. 2017's 2NN, 784-200-200-10, 199,210 parameters.
- ``mnist_cnn``: McMahan et al. 2017's CNN (5x5 conv 32, pool, 5x5 conv 64,
  pool, FC 512, 10 outputs), 1,663,370 parameters, input (n, 1, 28, 28).
"""

from __future__ import annotations

from torch import nn


def digits_mlp(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def tabular_mlp(in_features: int = 30, hidden: int = 32, classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def mnist_2nn(hidden: int = 200) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 10),
    )
