"""Where the model to export comes from: its factory and its weights.

Owns building the ``nn.Module`` from a ``module:factory`` import path and
loading weights from one of three files, and describing that origin for the
manifest:

- a state dict saved with ``torch.save(model.state_dict(), path)``, read with
  ``torch.load(..., weights_only=True)`` and never otherwise (fedge's wire
  rule: nothing is unpickled);
- a ``.safetensors`` file of float tensors;
- a fedge global-model message (the retained ``Kind.MODEL`` envelope), which
  also names the factory and the round that produced it.

PyTorch is imported here; the runtime side of the package never imports
this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.errors import ExportError
from export.files import sha256_file
from fedge.errors import first_line

if TYPE_CHECKING:
    from torch import nn

    from fedge.messages import GlobalModel


@dataclass(frozen=True)
class ModelSource:
    """What the manifest records about the origin of an exported model."""

    factory: str
    factory_args: dict[str, Any] = field(default_factory=dict)
    weights_path: str | None = None
    weights_sha256: str | None = None
    weights_format: str | None = None  # state_dict | safetensors | fedge_model
    global_round: int | None = None
    job: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"factory": self.factory, "factory_args": self.factory_args}
        if self.weights_path is not None:
            out["weights"] = {"file": Path(self.weights_path).name, "sha256": self.weights_sha256,
                              "format": self.weights_format}
        if self.global_round is not None:
            out["global_round"] = self.global_round
            out["job"] = self.job
        return out


def build(factory: str, factory_args: Mapping[str, Any] | None = None) -> nn.Module:
    """``fedge.torchkit.build_model`` with its errors turned into ``ExportError``."""
    from fedge.imports import ImportSpecError
    from fedge.torchkit import build_model

    try:
        model = build_model(factory, dict(factory_args or {}))
    except ImportSpecError as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:
        raise ExportError(f"model factory {factory!r} failed: {type(exc).__name__}: {exc}") from None
    model.eval()
    return model


def parse_global_model(data: bytes, what: str = "global model") -> GlobalModel:
    """Decode and verify a fedge ``Kind.MODEL`` message (no PyTorch needed)."""
    from fedge import wire
    from fedge.messages import GlobalModel, ProtocolError

    try:
        return GlobalModel.parse(wire.decode(data))
    except (wire.WireError, ProtocolError) as exc:
        raise ExportError(f"{what} is not a valid fedge model message: {exc}") from None


def model_from_global(message: bytes | GlobalModel, factory: str | None = None,
                      factory_args: Mapping[str, Any] | None = None) -> tuple[nn.Module, ModelSource]:
    """Build the model a global-model message describes and load its tensors.

    ``factory``/``factory_args`` override what the message names (for a
    factory that moved); by default the message's own are used. The
    aggregator calls this with the bytes it just published.
    """
    from fedge.tensors import TensorError, unpack

    gm = parse_global_model(message) if isinstance(message, (bytes, bytearray, memoryview)) else message
    fac = factory or gm.model
    args = dict(factory_args if factory_args is not None else gm.model_args)
    model = build(fac, args)
    try:
        arrays = unpack(gm.body)
        gm.spec.check(arrays, what="global model")
    except TensorError as exc:
        raise ExportError(f"global model tensors are unreadable: {exc}") from None
    _load_federated(model, arrays, f"global model of round {gm.round}")
    return model, ModelSource(factory=fac, factory_args=args, weights_format="fedge_model", global_round=gm.round,
                              job=gm.job)


def load_model(factory: str | None, factory_args: Mapping[str, Any] | None = None,
               weights: str | Path | None = None) -> tuple[nn.Module, ModelSource]:
    """Build the model and load ``weights`` (format detected from the file)."""
    if weights is None:
        if not factory:
            raise ExportError("name the model with --model module:factory (or give --weights with a fedge model "
                              "message, which names its factory)")
        return build(factory, factory_args), ModelSource(factory=factory, factory_args=dict(factory_args or {}))
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"weights file {str(path)!r} not found; check the path")
    digest = sha256_file(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"FEDG":
        model, src = model_from_global(path.read_bytes(), factory, factory_args if factory else None)
        return model, ModelSource(src.factory, src.factory_args, str(path), digest, "fedge_model", src.global_round,
                                  src.job)
    if not factory:
        raise ExportError(f"{path.name} is not a fedge model message, so name the model with --model module:factory")
    model = build(factory, factory_args)
    if path.suffix == ".safetensors":
        tensors = _read_safetensors(path)
        fmt = "safetensors"
    elif head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive (or a legacy pickle)
        tensors = _read_state_dict(path)
        fmt = "state_dict"
    else:
        raise ExportError(f"{path.name} is neither a PyTorch state dict (torch.save writes a zip archive), a "
                          ".safetensors file nor a fedge model message; save the weights with "
                          "torch.save(model.state_dict(), path)")
    _load_state(model, tensors, path.name)
    return model, ModelSource(factory, dict(factory_args or {}), str(path), digest, fmt)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path.name} is not a readable safetensors file: {exc}") from None


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on foreign files (IndexError on plain text)
        raise ExportError(f"{path.name} is not a plain state dict (torch.load with weights_only=True refused it: "
                          f"{first_line(exc, 160)}); save it with torch.save(model.state_dict(), path) or as "
                          ".safetensors") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path.name} does not hold a state dict (name -> tensor); save it with "
                          "torch.save(model.state_dict(), path)")
    return dict(obj)


def _load_state(model: nn.Module, tensors: Mapping[str, Any], what: str) -> None:
    """Copy ``tensors`` into the model. Every floating-point entry of the
    model's state dict must be present; integer buffers (BatchNorm's
    ``num_batches_tracked``) may be absent, as in federated tensors."""
    import torch

    state = model.state_dict()
    unexpected = [k for k in tensors if k not in state]
    missing = [k for k, t in state.items() if k not in tensors and t.is_floating_point()]
    if unexpected or missing:
        raise ExportError(f"weights in {what} do not match the model: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}; check --model and --model-args")
    with torch.no_grad():
        for name, value in tensors.items():
            src = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            if tuple(src.shape) != tuple(state[name].shape):
                raise ExportError(f"weights in {what}: tensor {name!r} has shape {tuple(src.shape)}, the model has "
                                  f"{tuple(state[name].shape)}; check --model-args")
            state[name].copy_(src.to(state[name].dtype))


def _load_federated(model: nn.Module, arrays: Mapping[str, np.ndarray], what: str) -> None:
    from fedge.torchkit import load_federated

    try:
        load_federated(model, arrays)
    except ValueError as exc:
        raise ExportError(f"{what} does not fit the model factory: {exc}") from None
