"""What the int16 headroom costs: logit SQNR vs FP32 (dB) of each weight scheme, the files evaluated in float
(ORT_DISABLE_ALL, the same on every CPU), on bench models whose `bench/run.py` data exist.

Schemes, all but the first exact on CPUs without VNNI: full range (`--target vnni`); the shipped rule
(`--target portable`: a channel whose two largest same-sign levels exceed 128 gets levels within ±64, the others
keep full range); a step just coarse enough for each channel's own top pair, (w1 + w2) / 128; that step over
adjacent input channels of one tap only (the pairing ONNX Runtime's kernels use today, measured with
bench/isa_probe.py; it rests on ORT's internal packing); 7-bit levels on every channel of those layers (what ORT's
reduce_range and NNCF's overflow fix do). The alternatives replace the budget function for the measurement
only.

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

SHIPPED = scheme._fit_pair_budget


def tight_pair_step(weight, axis, params, budget):
    """Each channel's step just coarse enough for its own two largest same-sign weights."""
    positive, negative = scheme.top_pairs(weight.astype(np.float32), axis)
    pair = np.maximum(positive.sum(axis=1), negative.sum(axis=1))
    scale = np.maximum(params.scale, (pair / np.float32(budget - 1)).astype(np.float32))
    return scheme.QuantParams(scale, params.zero_point, params.levels, axis)


def adjacent_channels(weight, axis, params, budget):
    """Budget over pairs (c, c+1) of one tap (Conv) or (k, k+1) (Gemm/MatMul); odd widths use the tight step."""
    rows = np.moveaxis(weight, axis, 0)
    if rows.ndim not in (2, 4) or rows.shape[1] % 2:
        return tight_pair_step(weight, axis, params, budget)
    pairs = rows.reshape(rows.shape[0], rows.shape[1] // 2, 2, -1)
    positive = np.maximum(pairs, 0).sum(axis=2).reshape(rows.shape[0], -1).max(axis=1)
    negative = np.maximum(-pairs, 0).sum(axis=2).reshape(rows.shape[0], -1).max(axis=1)
    scale = np.maximum(params.scale, (np.maximum(positive, negative) / np.float32(budget - 1)).astype(np.float32))
    return scheme.QuantParams(scale, params.zero_point, params.levels, axis)


def seven_bit(weight, axis, params, budget):
    return scheme.QuantParams((params.scale * 127 / 64).astype(np.float32), params.zero_point, params.levels, axis)


SCHEMES = {"full range (vnni)": None, "shipped (portable)": SHIPPED, "tight pair step": tight_pair_step,
           "tight step, adjacent channels": adjacent_channels, "7-bit every channel": seven_bit}


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
            scheme._fit_pair_budget = budget or SHIPPED
            try:
                quantized = onnxcompress.quantize(fp32, str(calib), progress=False,
                                                  target="vnni" if budget is None else "portable")
            finally:
                scheme._fit_pair_budget = SHIPPED
            path = OUT / "weight_scheme.onnx"
            save_model(quantized, path)
            results[model][name] = sqnr_db(reference, _logits(str(path), feeds,
                                                                ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
        print(model, {k: round(v, 1) for k, v in results[model].items()}, flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
