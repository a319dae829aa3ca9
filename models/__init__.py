"""Model zoo: builders and small bundled pretrained samples with their data."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["Sample", "available", "sample"]


@dataclass(frozen=True)
class Sample:
    """A bundled model with its calibration and held-out test data.

    ``calibration_path`` is an ``.npz`` whose arrays are keyed by model input name
    (axis 0 enumerates samples); ``test_path`` and ``train_path`` (fine-tuning data) additionally
    hold ``labels``.
    """

    name: str
    model_path: Path
    calibration_path: Path
    test_path: Path
    train_path: Path
    description: str

    def load_test(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return ``({input_name: array}, labels)`` of the held-out test set."""
        with np.load(self.test_path) as data:
            labels = data["labels"]
            inputs = {k: data[k] for k in data.files if k != "labels"}
        return inputs, labels

    def load_calibration(self) -> dict[str, np.ndarray]:
        """Return ``{input_name: array}`` of the calibration set."""
        with np.load(self.calibration_path) as data:
            return {k: data[k] for k in data.files}


# name -> (model file, calibration file, test file, training file, description); files live in data/.
_SAMPLES: dict[str, tuple[str, str, str, str, str]] = {
    "digits_cnn": (
        "digits_cnn.onnx",
        "digits_calib.npz",
        "digits_test.npz",
        "digits_train.npz",
        "ResNet-style CNN (Conv+BN+ReLU, residual Add) on sklearn digits upsampled to "
        "32x32; input 'input' [N,1,32,32] = pixel/16, output 'logits' [N,10]. "
        "Rebuild with `python -m onnxcompress.models.digits_cnn`.",
    ),
    "digits_mobile": (
        "digits_mobile.onnx",
        "digits_calib.npz",
        "digits_test.npz",
        "digits_train.npz",
        (
            "MobileNetV3-style classifier (inverted residuals with depthwise Conv, squeeze-excitation with "
            "HardSigmoid, HardSwish, unfolded BN, residual Add) on the digits_cnn data; input 'input' "
            "[N,1,32,32] = pixel/16, output 'logits' [N,10]. "
            "Rebuild with `python -m onnxcompress.models.digits_mobile`."
        ),
    ),
}


def _data_dir() -> Path:
    # The package is installed as a regular directory (also in editable mode), so the
    # resource traversable is a real filesystem path.
    return Path(str(resources.files(__name__).joinpath("data")))


def available() -> list[str]:
    """Names of the bundled samples."""
    return sorted(_SAMPLES)


def sample(name: str = "digits_cnn") -> Sample:
    """Look up a bundled sample by name; raises ``ValueError`` listing the known names."""
    try:
        model, calib, test, train, description = _SAMPLES[name]
    except KeyError:
        raise ValueError(f"unknown sample {name!r}; available: {', '.join(available())}") from None
    data = _data_dir()
    return Sample(
        name=name,
        model_path=data / model,
        calibration_path=data / calib,
        test_path=data / test,
        train_path=data / train,
        description=description,
    )


def sample_for_model(model_path: str | Path) -> Sample | None:
    """The bundled sample whose model file `model_path` is (so its calibration data can be used by default)."""
    try:
        resolved = Path(model_path).resolve()
    except OSError:
        return None
    for name in available():
        candidate = sample(name)
        if candidate.model_path.resolve() == resolved:
            return candidate
    return None
