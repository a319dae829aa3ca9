"""Weight-only compression of one ONNX model with a peer tool, in a fresh process (run with the peers venv's python).

    python bench/compress_weights_peer.py --tool nncf|ort MODEL.onnx -o OUT.onnx --mode int8|int4_sym \
        [--group-size 128] [--data CALIB.npz]

  nncf: nncf.compress_weights(onnx.ModelProto, mode=INT8_SYM | INT4_SYM, group_size, ratio=1)   (ONNX backend,
        data-free; embeddings and the last layer INT8, its default); with --data CALIB.npz (int4): its dataset,
        awq=True and scale_estimation=True
  ort : onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(bits=8 | 4, block_size, symmetric),
        which writes MatMulNBits (a contrib op: ONNX Runtime only)
Files over 2 GB are written with external data beside OUT.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", required=True, choices=["nncf", "ort"])
    parser.add_argument("model")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--mode", choices=["int8", "int4_sym"], required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--data", help="nncf int4: calibration .npz (an array per input, samples on axis 0)")
    args = parser.parse_args(argv)

    import onnx

    model = onnx.load(args.model)
    if args.tool == "nncf":
        os.environ.setdefault("NNCF_CI", "1")
        import nncf

        mode = nncf.CompressWeightsMode.INT8_SYM if args.mode == "int8" else nncf.CompressWeightsMode.INT4_SYM
        options = {} if args.mode == "int8" else {"group_size": args.group_size, "ratio": 1.0}
        if args.data:
            import numpy as np

            with np.load(args.data) as arrays:
                samples = [{k: arrays[k][i:i + 1] for k in arrays.files} for i in range(len(arrays[arrays.files[0]]))]
            options.update(dataset=nncf.Dataset(samples), awq=True, scale_estimation=True, subset_size=len(samples))
        compressed = nncf.compress_weights(model, mode=mode, **options)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        options = {"block_size": args.group_size, "is_symmetric": True}
        if "bits" in inspect.signature(MatMulNBitsQuantizer).parameters:
            options["bits"] = 8 if args.mode == "int8" else 4
        elif args.mode == "int8":
            print("this onnxruntime's MatMulNBitsQuantizer has no 8-bit mode", file=sys.stderr)
            return 3
        quantizer = MatMulNBitsQuantizer(model, **options)
        quantizer.process()
        compressed = quantizer.model.model
    large = compressed.ByteSize() > 1_900_000_000 if hasattr(compressed, "ByteSize") else True
    onnx.save(compressed, args.output, save_as_external_data=large, all_tensors_to_one_file=True,
              location=os.path.basename(args.output) + ".data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
