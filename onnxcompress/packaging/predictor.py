"""Load a verified package and run it: `onnxcompress.load_package(DIR)` and `onnxcompress run`.

The runtime gets the bytes that were hashed, not the path read again: OpenVINO the IR's .xml and .bin, ONNX Runtime
the .onnx (a model with external data is read by path after its files were verified).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxcompress.errors import DatasetError, PackageError
from onnxcompress.packaging.manifest import Manifest, TensorSpec, verify_package

RUNTIMES = ("openvino", "onnxruntime")


class Predictor:
    """A packaged model ready to run: `predictor({input name: array}) -> {output name: array}`."""

    def __init__(self, folder: str | os.PathLike, runtime: str = "openvino") -> None:
        if runtime not in RUNTIMES:
            raise PackageError(f"unknown runtime {runtime!r}: use {' or '.join(RUNTIMES)}")
        self.folder = Path(folder)
        self.manifest = verify_package(self.folder)
        self.runtime = runtime
        self._run = self._open_openvino() if runtime == "openvino" else self._open_onnxruntime()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.outputs

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(check_feeds(self.manifest, feeds))

    def _verified_bytes(self, name: str) -> bytes:
        data = (self.folder / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest.files[name]:
            raise PackageError(f"package file {name} was changed: its SHA-256 differs from the manifest's")
        return data

    def _open_openvino(self):
        import openvino as ov

        xml = self.manifest.openvino_ir
        if xml is None:
            raise PackageError(f"{self.folder} has no OpenVINO IR (it was packaged without openvino)")
        weights = self._verified_bytes(str(Path(xml).with_suffix(".bin")))
        model = ov.Core().read_model(model=self._verified_bytes(xml).decode(),
                                     weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
        compiled = ov.Core().compile_model(model, "CPU")
        names = [o.name for o in self.manifest.outputs]

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            results = compiled(feeds)
            by_name = {name: results[port] for port in compiled.outputs for name in port.get_names()}
            return {name: np.asarray(by_name[name]) for name in names}
        return run

    def _open_onnxruntime(self):
        import onnxruntime as ort

        model = self.manifest.onnx_model
        external = any(name.startswith(model + ".") for name in self.manifest.files)
        source = str(self.folder / model) if external else self._verified_bytes(model)
        try:
            session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises several unrelated types
            raise PackageError(f"ONNX Runtime cannot load {model}: {error}") from error
        names = [o.name for o in self.manifest.outputs]
        return lambda feeds: dict(zip(names, session.run(names, feeds)))


def load_package(folder: str | os.PathLike, runtime: str = "openvino") -> Predictor:
    """Verify every checksum of the package in `folder`, then load it for `runtime` (openvino or onnxruntime)."""
    return Predictor(folder, runtime)


def check_feeds(manifest: Manifest, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds as arrays, after checking names, dtypes and static dimensions against the manifest."""
    expected = {spec.name: spec for spec in manifest.inputs}
    unknown, missing = sorted(set(feeds) - set(expected)), sorted(set(expected) - set(feeds))
    if unknown or missing:
        raise DatasetError(f"inputs do not match the package: unknown {unknown}, missing {missing} "
                           f"(it takes {sorted(expected)})")
    checked = {}
    for name, spec in expected.items():
        array = np.asarray(feeds[name])
        if array.dtype.name != spec.dtype:
            raise DatasetError(f"input {name!r} is {array.dtype}, the package takes {spec.dtype}")
        if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, array.shape)):
            shape = ", ".join(str(d) if isinstance(d, int) else "?" for d in spec.shape)
            raise DatasetError(f"input {name!r} has shape {list(array.shape)}, the package takes [{shape}]")
        checked[name] = np.ascontiguousarray(array)
    return checked


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` as an .npz, atomically."""
    import io

    from onnxcompress.runtime.outputs import write_bytes_atomic

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())
