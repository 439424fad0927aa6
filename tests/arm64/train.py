"""Train a benchmark model briefly and save its state dict (for the arm64
quantization check): ``python -m tests.arm64.train FACTORY DATA OUT [JSON_ARGS]``."""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch

    from fedge.imports import load_callable

    factory, data, out = sys.argv[1:4]
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    x, y = load_callable(data)(split="train", **args)
    model = load_callable(factory)()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if x.ndim > 2 else 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(1 if x.ndim > 2 else 30):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), out)


if __name__ == "__main__":
    main()
