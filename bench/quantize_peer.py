"""Quantize one ONNX model with a peer tool, in a fresh process (run with the peers venv's python).

    python bench/quantize_peer.py --tool nncf|ort MODEL.onnx -o OUT.onnx --data CALIB.npz \
        [--subset-size 300] [--report phases.json]

The calibration npz holds one array per model input, axis 0 enumerating samples; sample i is fed as
x[i:i+1] (batch of one). The report JSON has per-phase wall times (import, load, preprocess,
quantize, save) and this process's own peak RSS; the parent measures the whole process too.

  nncf: nncf.quantize(onnx.ModelProto, nncf.Dataset([...]), subset_size=N)   (ONNX backend,
        default preset / target device / fast bias correction)
  ort : quant_pre_process(MODEL -> pre.onnx), then quantize_static(pre.onnx, OUT, reader,
        quant_format=QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8,
        calibrate_method=MinMax) with the same N samples
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

T_START = time.perf_counter()


def _samples(npz_path, input_names, n):
    import numpy as np

    if os.path.isdir(npz_path):  # a folder of .npy files: one complete feed of a single-input model each
        files = sorted(f for f in os.listdir(npz_path) if f.endswith(".npy"))[:n]
        return [{input_names[0]: np.load(os.path.join(npz_path, f))} for f in files]
    with np.load(npz_path) as z:
        arrays = {}
        keys = [k for k in z.files if k != "labels"]
        for name in input_names:
            if name in z.files:
                arrays[name] = z[name]
            elif len(input_names) == 1 and len(keys) == 1:
                arrays[name] = z[keys[0]]
            else:
                raise KeyError(f"{npz_path} has no array for model input {name!r} (has {z.files})")
    total = min(a.shape[0] for a in arrays.values())
    n = min(n, total)
    return [{k: np.ascontiguousarray(a[i:i + 1]) for k, a in arrays.items()} for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", required=True, choices=["nncf", "ort"])
    ap.add_argument("model")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--subset-size", type=int, default=300)
    ap.add_argument("--report")
    ap.add_argument("--model-type", choices=["cnn", "transformer"], default="cnn",
                    help="nncf: model_type=nncf.ModelType.TRANSFORMER for transformer (its SmoothQuant included)")
    args = ap.parse_args(argv)

    phases = {}
    info = {"tool": args.tool}
    t = time.perf_counter()
    import numpy as np  # noqa: F401
    import onnx

    if args.tool == "nncf":
        os.environ.setdefault("NNCF_CI", "1")  # telemetry stub (no network here anyway)
        import nncf
        info["version"] = nncf.__version__
    else:
        import onnxruntime
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        info["version"] = onnxruntime.__version__
    phases["import_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = onnx.load(args.model)
    input_names = [i.name for i in model.graph.input
                   if i.name not in {x.name for x in model.graph.initializer}]
    samples = _samples(args.data, input_names, args.subset_size)
    info["n_samples"] = len(samples)
    phases["load_s"] = time.perf_counter() - t

    if args.tool == "nncf":
        t = time.perf_counter()
        options = {"model_type": nncf.ModelType.TRANSFORMER} if args.model_type == "transformer" else {}
        qmodel = nncf.quantize(model, nncf.Dataset(samples), subset_size=args.subset_size, **options)
        phases["quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        onnx.save(qmodel, args.output)
        phases["save_s"] = time.perf_counter() - t
    else:
        class Reader(CalibrationDataReader):
            def __init__(self, items):
                self._items = items
                self._it = iter(items)

            def get_next(self):
                return next(self._it, None)

            def __len__(self):
                return len(self._items)

            def rewind(self):
                self._it = iter(self._items)

        del model  # quantize_static works from paths
        with tempfile.TemporaryDirectory(prefix="ortq_", dir=os.path.dirname(os.path.abspath(args.output))) as td:
            pre = os.path.join(td, "pre.onnx")
            t = time.perf_counter()
            # quant_pre_process leaves temporary files in the working directory when it fails: run it in `td`.
            source, cwd = os.path.abspath(args.model), os.getcwd()
            os.chdir(td)
            try:
                quant_pre_process(source, pre)
            except Exception as error:  # noqa: BLE001 - ORT's symbolic shape inference raises a bare Exception
                # What ORT's own error advises for models it cannot infer (YOLO exports with dynamic H/W).
                print(f"quant_pre_process failed ({error}); retrying with skip_symbolic_shape=True", flush=True)
                quant_pre_process(source, pre, skip_symbolic_shape=True)
            finally:
                os.chdir(cwd)
            phases["preprocess_s"] = time.perf_counter() - t
            t = time.perf_counter()
            # quantize_static loads, calibrates (augmented model + ORT), quantizes and saves in one call
            quantize_static(pre, args.output, Reader(samples), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            phases["quantize_s"] = time.perf_counter() - t  # includes ORT's own save
    phases["total_in_process_s"] = time.perf_counter() - T_START
    info["phases"] = phases
    info["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if args.report:
        with open(args.report, "w") as f:
            json.dump(info, f, indent=1)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
