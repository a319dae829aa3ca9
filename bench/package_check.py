"""Deployment packages of real model architectures, checked end to end (issue 12 acceptance).

For each model: quantize it with onnxcompress, `onnxcompress package` it (with the FP32 reference and test data
for the model card), then in fresh processes run the package with `onnxcompress run` in both runtimes and with
`onnxcompress.load_package` over several samples, and compare with direct runs of the packaged files: ONNX Runtime
must be bit-exact, OpenVINO within its own run-to-run difference. Then flip one byte in every packaged file (one
copy each) and check that `run` refuses it naming the file.

    .venv/bin/python bench/package_check.py --out bench/out/package_check.json

Needs the light models and their data made by `bench/run.py` (bench/out/light_models, bench/out/data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DEFAULT_OUT_DIR, log, write_json

CLI = [sys.executable, "-m", "onnxcompress.cli"]
SAMPLES = 8
_FRESH_PROCESS = """
import json, sys, numpy as np, onnxcompress
package, data, runtime = sys.argv[1:4]
predictor = onnxcompress.load_package(package, runtime=runtime)
arrays = dict(np.load(data))
count = len(next(iter(arrays.values())))
outputs = [predictor({k: v[i:i + 1] for k, v in arrays.items()})[predictor.outputs[0].name] for i in range(count)]
np.save(sys.argv[4], np.concatenate(outputs))
"""


def _models(out: Path) -> list[dict]:
    from onnxcompress.models import sample

    digits = sample("digits_cnn")
    inputs, labels = digits.load_test()
    models = [{"name": "digits_cnn", "fp32": digits.model_path, "calib": digits.calibration_path,
               "test": {**inputs, "labels": labels}}]
    for name in ("resnet50", "squeezenet"):
        fp32 = out / "light_models" / f"{name}_fp32.onnx"
        if not fp32.is_file():
            raise SystemExit(f"{fp32} is missing: run bench/run.py first")
        models.append({"name": name, "fp32": fp32, "calib": out / "data" / f"{name}_calib.npz",
                       "test": dict(np.load(out / "data" / f"{name}_test.npz"))})
    return models


def _direct(package: Path, manifest: dict, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    import onnxruntime as ort
    import openvino as ov

    session = ort.InferenceSession(str(package / manifest["onnx_model"]), providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(str(package / manifest["openvino_ir"]), "CPU")
    count = len(next(iter(feeds.values())))
    one = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(count)]
    return {"onnxruntime": [np.concatenate([session.run(None, f)[0] for f in one])],
            "openvino": [np.concatenate([compiled(f)[compiled.outputs[0]] for f in one]) for _ in range(2)]}


def check(model: dict, work: Path) -> dict:
    from onnxcompress import quantize
    from onnxcompress.runtime.model_io import save_model

    name = model["name"]
    int8 = save_model(quantize(model["fp32"], model["calib"], progress=False), work / f"{name}.int8.onnx")
    test = {k: v[:SAMPLES] for k, v in model["test"].items()}
    np.savez(work / "eval.npz", **test)
    feeds = {k: v for k, v in test.items() if k != "labels"}
    np.savez(work / "in.npz", **feeds)
    np.savez(work / "in1.npz", **{k: v[:1] for k, v in feeds.items()})
    started = time.perf_counter()
    subprocess.run([*CLI, "package", str(int8), "-o", str(work / "pkg"), "--name", name, "--reference",
                    str(model["fp32"]), "--data", str(work / "eval.npz")], check=True, capture_output=True)
    package_seconds = time.perf_counter() - started
    manifest = json.loads((work / "pkg" / "manifest.json").read_text())
    direct = _direct(work / "pkg", manifest, feeds)
    result = {"model": name, "package_seconds": round(package_seconds, 1), "files": len(manifest["files"]),
              "runtimes": {r: f"{v['int8_layers']}/{v['heavy_layers']} INT8" for r, v in manifest["runtimes"].items()},
              "safe_without_vnni": manifest["safe_without_vnni"]}
    for runtime in ("onnxruntime", "openvino"):
        subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(work / "pkg"), str(work / "in.npz"), runtime,
                        str(work / f"{runtime}.npy")], check=True)
        subprocess.run([*CLI, "run", str(work / "pkg"), "--input", str(work / "in1.npz"), "-o",
                        str(work / f"{runtime}-cli.npz"), "--runtime", runtime], check=True, capture_output=True)
        packaged = np.load(work / f"{runtime}.npy")
        cli = np.load(work / f"{runtime}-cli.npz")[manifest["outputs"][0]["name"]]
        reference = direct[runtime][0]
        result[runtime] = {
            "max_diff_vs_direct": float(np.abs(packaged - reference).max()),
            "cli_max_diff_vs_direct": float(np.abs(cli - reference[:1]).max()),
            "bit_exact": bool(np.array_equal(packaged, reference) and np.array_equal(cli, reference[:1]))}
        if runtime == "openvino":
            result[runtime]["direct_run_to_run"] = float(np.abs(direct[runtime][0] - direct[runtime][1]).max())
    result["tampered_files_refused"] = _tamper(work / "pkg", manifest, work / "in1.npz")
    return result


def _tamper(package: Path, manifest: dict, feed: Path) -> str:
    refused = 0
    for name in manifest["files"]:
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / "pkg"
            shutil.copytree(package, copy)
            data = bytearray((copy / name).read_bytes())
            data[len(data) // 2] ^= 1
            (copy / name).write_bytes(bytes(data))
            run = subprocess.run([*CLI, "run", str(copy), "--input", str(feed), "-o", str(Path(folder) / "o.npz")],
                                 capture_output=True, text=True)
            refused += run.returncode == 2 and f"package file {name} was changed" in run.stderr
    return f"{refused}/{len(manifest['files'])}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "package_check.json")
    args = parser.parse_args()
    results = []
    for model in _models(DEFAULT_OUT_DIR):
        log(f"{model['name']}: quantize, package, run in fresh processes, tamper")
        with tempfile.TemporaryDirectory(prefix=f"package-{model['name']}-") as folder:
            results.append(check(model, Path(folder)))
        log(json.dumps(results[-1]))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
