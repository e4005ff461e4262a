"""The fitted static tensors of one method for one model, saved to safetensors + JSON with a hash of the
model's config, checked when loaded into a compile."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from kvpass.errors import KVPassError

if TYPE_CHECKING:
    from kvpass.methods.base import MethodConfig


def config_hash(model) -> str:
    """A hash of what makes a calibration valid for a model: its config (transformers) or parameter shapes.
    ``model`` may also be a config."""
    config = model if hasattr(model, "to_dict") and not isinstance(model, torch.nn.Module) else getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = {k: v for k, v in config.to_dict().items()
                if k not in ("transformers_version", "_name_or_path", "name_or_path", "quantization_config",
                             "_attn_implementation_autoset", "dtype", "torch_dtype", "architectures")}
    else:
        data = {n: list(p.shape) for n, p in model.named_parameters()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CalibKey(NamedTuple):
    """Where a calibrated tensor belongs: a layer, its keys or values (``which``: "k" or "v"), the tensor's name."""

    layer: int
    which: str
    name: str

    def __str__(self) -> str:
        return f"{self.layer}.{self.which}.{self.name}"

    @classmethod
    def parse(cls, text: str | CalibKey) -> CalibKey:
        """``"3.k.lut"`` (the form a saved calibration's file holds) to ``CalibKey(3, "k", "lut")``."""
        if isinstance(text, CalibKey):
            return text
        layer, which, name = text.split(".", 2)
        if not layer.isdigit() or which not in ("k", "v") or not name:
            raise KVPassError(f"calibration key {text!r} is not '<layer>.<k|v>.<name>'")
        return cls(int(layer), which, name)


@dataclass
class Calibration:
    """Static tensors per layer, keyed by :class:`CalibKey`, for one method and one model; ``meta`` holds what is
    not a tensor (QAQ's eps, the chosen sensitive layers, their losses)."""

    method: str
    model_hash: str
    tensors: dict[CalibKey, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors = {CalibKey.parse(k): v for k, v in self.tensors.items()}

    def check_finite(self) -> None:
        bad = next((k for k, t in self.tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                   None)
        if bad is not None:
            raise KVPassError(f"calibration tensor {bad} holds NaN or inf; calibrate again (on finite activations)")

    def for_layer(self, layer: int, which: str) -> dict[str, torch.Tensor]:
        """The tensors of one layer's keys or values by name."""
        return {k.name: v for k, v in self.tensors.items() if k.layer == layer and k.which == which}

    def save(self, path: str | Path) -> None:
        """Write ``path.safetensors`` and ``path.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({str(k): v.contiguous() for k, v in self.tensors.items()}, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(
            {"method": self.method, "model_hash": self.model_hash, "meta": self.meta}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, tensor_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not meta_path.exists() or not tensor_path.exists():
            raise KVPassError(f"no calibration at {path}: expected {meta_path.name} and {tensor_path.name}")
        try:
            meta = json.loads(meta_path.read_text())
            method, model_hash = meta["method"], meta["model_hash"]
        except (ValueError, KeyError, TypeError) as err:
            raise KVPassError(f"{meta_path} is not a kvpass calibration ({type(err).__name__}: {err}); save one with "
                              "Calibration.save or calibrate again") from err
        try:
            tensors = load_file(str(tensor_path))
        except Exception as err:  # safetensors raises its own error type for a truncated or foreign file
            raise KVPassError(f"{tensor_path} cannot be read ({err}); the file is damaged or not a calibration: "
                              "calibrate again") from err
        try:
            calibration = cls(method, model_hash, tensors, meta.get("meta", {}))
            calibration.check_finite()
        except KVPassError as err:
            raise KVPassError(f"{tensor_path}: {err}") from err
        return calibration

    @property
    def promoted_layers(self) -> tuple[int, ...]:
        """The layers chosen as the most sensitive (stored in the method's ``sensitive_spec``)."""
        return tuple(self.meta.get("promoted_layers", ()))

    def check(self, model, method: MethodConfig) -> None:
        """Raise a :class:`KVPassError` unless this calibration fits ``method`` and ``model``, with finite tensors."""
        self.check_finite()
        if self.method != method.name:
            raise KVPassError(f"this calibration is for method {self.method!r}, not {method.name!r}; calibrate with "
                              f"kvpass.calibrate(model, texts, method={method.name!r})")
        # the quality guard may have promoted layers beyond the method's own (meta "guard_promoted")
        if len(self.promoted_layers) != method.sensitive_layers + self.meta.get("guard_promoted", 0):
            raise KVPassError(f"this calibration chose {len(self.promoted_layers)} sensitive layers, method "
                              f"{method.name!r} keeps {method.sensitive_layers}; calibrate again with this method")
        if model is not None and config_hash(model) != self.model_hash:  # a model or its config
            raise KVPassError(
                f"this calibration was made for another model (config hash {self.model_hash}, this model "
                f"{config_hash(model)}); calibrate this model with kvpass.calibrate(model, texts, method=...)"
            )
