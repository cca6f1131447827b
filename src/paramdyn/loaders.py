"""What every job that evaluates a trained network starts from: the run's model (with a
checkpoint's weights, when one is named) and its prepared dataset, on one device, with the
run's normalisation and input form and without augmentation.

The features, layer-similarity, curvature and interpolation jobs all build these the same
way; this is that one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import load_into
from .config import RunSpec
from .data import DeviceData
from .devices import resolve_device
from .models import build_model


@dataclass(frozen=True)
class ModelForm:
    """What builds a run's model and reads its data as it trained: the model and dataset
    names, the model's settings, the normalisation and the input form (``RunSpec``'s)."""

    model_name: str
    dataset: str
    model_settings: Mapping[str, Any] | None = None
    normalize: bool | Mapping[str, Any] = True
    inputs: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, spec: RunSpec) -> ModelForm:
        return cls(spec.model_name, spec.dataset, spec.model_settings, spec.normalize, spec.inputs)


def model_and_data(
    dataset_path: Path | str,
    form: ModelForm,
    checkpoint: Path | str | None = None,
    device: str = "cpu",
) -> tuple[Any, DeviceData]:
    """The model of ``form`` (``checkpoint``'s weights loaded when given) and the prepared
    dataset at ``dataset_path`` (``results/datasets/<name>.safetensors``) read as ``form``
    says, without augmentation, both on ``device`` (``auto``, ``cpu`` or ``cuda``)."""
    dev = resolve_device(device)
    inputs = dict(form.inputs or {})
    model = build_model(form.model_name, form.dataset, dict(form.model_settings or {}), inputs)
    if checkpoint is not None:
        load_into(model, checkpoint)
    model.to(dev)
    data = DeviceData.load(
        dataset_path, dev, normalize=form.normalize, augment=False, inputs=inputs
    )
    return model, data


def run_model_and_data(
    spec: RunSpec, dataset_path: Path | str, device: str = "cpu"
) -> tuple[Any, DeviceData]:
    """:func:`model_and_data` of a run (the model as built, no weights loaded)."""
    return model_and_data(dataset_path, ModelForm.of(spec), None, device)
