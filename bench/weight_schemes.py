"""What the int16 headroom costs: logit SQNR vs FP32 (dB) of each weight scheme, the files evaluated in float
(ORT_DISABLE_ALL, the same on every CPU), on bench models whose `bench/run.py` data exist.

Schemes, all but the first exact on CPUs without VNNI: full range (`--target vnni`); the shipped rule
(`--target portable`: each channel's step just coarse enough that the pairs ONNX Runtime's kernel forms, neighbours
in `op_table.int16_pair_order`, stay within 128 levels); the rule that holds for any pairing (a channel whose two
largest same-sign levels exceed 128 gets levels within ±64, the earlier default, still used where the pairing is
not known); 7-bit levels on every channel of those layers (what ORT's reduce_range and NNCF's overflow fix do).
The alternatives replace the shipped step function for the measurement only.

    .venv/bin/python bench/weight_schemes.py --models squeezenet,bvlc_alexnet,inception_v1,shufflenet,digits_cnn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa_check import OUT, _logits, _model_files  # noqa: E402

import onnxcompress  # noqa: E402
import onnxcompress.algorithms.quantization.scheme as scheme  # noqa: E402
from onnxcompress.runtime.evaluate import sqnr_db  # noqa: E402
from onnxcompress.runtime.model_io import save_model  # noqa: E402

SHIPPED = scheme._fit_kernel_pairs


def any_pair(weight, axis, order, params, budget):
    return scheme._fit_any_pair(weight, axis, params, budget)


def seven_bit(weight, axis, order, params, budget):
    return scheme.QuantParams((params.scale * 127 / 64).astype(np.float32), params.zero_point, params.levels, axis)


SCHEMES = {"full range (vnni)": None, "shipped (portable, kernel pairs)": SHIPPED, "any pair (±64)": any_pair,
           "7-bit every channel": seven_bit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT / "weight_schemes.json")
    args = parser.parse_args(argv)
    results = {}
    for model in args.models.split(","):
        fp32, calib, test = _model_files(model)
        with np.load(test) as data:
            names = [k for k in data.files if k != "labels"]
            feeds = [{k: data[k][i:i + 1] for k in names} for i in range(min(args.samples, len(data[names[0]])))]
        reference = _logits(str(fp32), feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        results[model] = {}
        for name, budget in SCHEMES.items():
            scheme._fit_kernel_pairs = budget or SHIPPED
            try:
                quantized = onnxcompress.quantize(fp32, str(calib), progress=False,
                                                  target="vnni" if budget is None else "portable")
            finally:
                scheme._fit_kernel_pairs = SHIPPED
            path = OUT / "weight_scheme.onnx"
            save_model(quantized, path)
            results[model][name] = sqnr_db(reference, _logits(str(path), feeds,
                                                                ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
        print(model, {k: round(v, 1) for k, v in results[model].items()}, flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
