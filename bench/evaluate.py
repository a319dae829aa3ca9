"""Evaluate FP32 + quantized variants of ONE model (run in a fresh process by bench/run.py).

    python bench/evaluate.py SPEC.json OUT.json

SPEC: {"model", "fp32", "test", "input_name", "variants": {tool: path}, "rounds", "tput_s", "lat_s",
       "work_dir", "max_test"}

Fidelity : logits of every variant on the test inputs (batch 1) vs the FP32 model in ONNX Runtime
           (the reference). SQNR dB = 10 log10(sum ref^2 / sum (ref-q)^2) over all test outputs, in
           ORT, in OpenVINO with the default CPU config (the precision OpenVINO picks on this CPU, recorded in the results)
           and in OpenVINO with INFERENCE_PRECISION_HINT=f32 (pure quantization error). Top-1 agreement
           with the reference, and top-1 accuracy when the test npz has "labels".
INT8 exec: OpenVINO: Convolution/GroupConvolution/Deconvolution/FullyConnected/MatMul layers of
           compiled.get_runtime_model() whose rt_info runtimePrecision is u8/i8 (default config).
           ORT: op types of the optimized graph saved by SessionOptions.optimized_model_filepath at
           ORT_ENABLE_ALL (ORT_ENABLE_EXTENDED if that fails), integer vs float compute ops.
Speed    : OpenVINO throughput (AsyncInferQueue, PERFORMANCE_HINT=THROUGHPUT, batch 1 requests),
           OpenVINO latency (sync, PERFORMANCE_HINT=LATENCY, batch 1) and ORT CPU latency (batch 1),
           variants interleaved in rounds (a new seeded order each round); medians across rounds.
           Variants: fp32_f32 (OV only, f32 hint), fp32 (OV default precision; ORT), each tool's file.
"""
from __future__ import annotations

import collections
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_INPUT_SEED, json_default, log, sqnr_db  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import openvino as ov  # noqa: E402

OV_COMPUTE = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}
ORT_INT_COMPUTE = {"QLinearConv", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul",
                   "ConvInteger", "MatMulInteger", "NhwcQLinearConv", "DynamicQuantizeLSTM", "QAttention"}
ORT_FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose",
                     "NhwcFusedConv"}


# ----------------------------------------------------------------------------------------- runners
def ort_session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ov_compile_raw(core, path, input_shape, hint, f32=False):
    m = core.read_model(str(path))
    if input_shape is not None and len(m.inputs) == 1 and m.inputs[0].get_partial_shape().is_dynamic:
        m.reshape({m.inputs[0]: ov.PartialShape(list(input_shape))})
    cfg = {"PERFORMANCE_HINT": hint}
    if f32:
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    return core.compile_model(m, "CPU", cfg)


_PROBES: dict = {}
OV_SHAPE_MODE: dict = {}  # "path|hint|f32" -> "static" | "dynamic (static compile crashed: ...)"


def _probe(path, input_shape, hint, f32, static=True):
    """compile_model + one inference in a child process: OpenVINO can crash (SIGSEGV) inside compile_model on
    some files, which would take the whole evaluation down."""
    key = (str(path), tuple(input_shape), hint, f32, static)
    if key not in _PROBES:
        cmd = [sys.executable, __file__, "--probe", str(path), json.dumps(list(input_shape)), hint,
               "1" if f32 else "0", "static" if static else "dynamic"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            _PROBES[key] = (r.returncode, r.stderr[-300:])
        except subprocess.TimeoutExpired:
            _PROBES[key] = ("timeout", "")
    return _PROBES[key]


def ov_compile(core, path, input_shape, hint, f32=False):
    """Compile with a static batch-1 shape; if that crashes OpenVINO (probed in a child process), fall back to
    the model's own (dynamic) shape and record it in OV_SHAPE_MODE."""
    tag = f"{Path(path).name}|{hint}|{'f32' if f32 else 'default'}"
    rc, err = _probe(path, input_shape, hint, f32)
    if rc == 0:
        OV_SHAPE_MODE[tag] = "static"
        return _ov_compile_raw(core, path, input_shape, hint, f32)
    why = f"signal {-rc}" if isinstance(rc, int) and rc < 0 else f"rc={rc}: {err.strip().splitlines()[-1:] }"
    rc2, err2 = _probe(path, input_shape, hint, f32, static=False)
    if rc2 == 0:
        OV_SHAPE_MODE[tag] = f"dynamic (static-shape compile_model failed: {why})"
        log(f"  OpenVINO: static-shape compile of {Path(path).name} [{hint}, f32={f32}] failed ({why}); "
            f"using the dynamic-shape model")
        return _ov_compile_raw(core, path, None, hint, f32)
    OV_SHAPE_MODE[tag] = f"failed (static: {why}; dynamic: rc={rc2})"
    raise RuntimeError(f"OpenVINO compile_model failed for {Path(path).name} (static: {why}; dynamic: rc={rc2})")


def probe_main(path, shape_json, hint, f32, mode):
    shape = json.loads(shape_json)
    cm = _ov_compile_raw(ov.Core(), path, shape if mode == "static" else None, hint, f32 == "1")
    cm.create_infer_request().infer({0: np.zeros(shape, np.float32)})


def run_ort_all(sess, xs):
    name = sess.get_inputs()[0].name
    return np.stack([sess.run(None, {name: x})[0] for x in xs])


def run_ov_all(cm, xs):
    req = cm.create_infer_request()
    return np.stack([np.array(req.infer({0: x})[0], copy=True) for x in xs])


# ------------------------------------------------------------------------------------ int8 checks
def ov_int8_layers(cm):
    total, int8 = 0, 0
    prec = collections.Counter()
    for op in cm.get_runtime_model().get_ordered_ops():
        ri = op.get_rt_info()
        lt = ri["layerType"].astype(str)
        if lt in OV_COMPUTE:
            p = ri["runtimePrecision"].astype(str)
            total += 1
            prec[f"{lt}:{p}"] += 1
            if p in ("u8", "i8"):
                int8 += 1
    return {"compute_layers": total, "int8_layers": int8, "by_type_precision": dict(prec)}


def ort_int8_ops(path, work_dir, tag):
    out = {}
    for level_name, level in (("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                              ("ORT_ENABLE_EXTENDED", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)):
        opt = Path(work_dir) / f"{tag}.ort_opt.onnx"
        try:
            ort_session(path, level, opt)
            g = onnx.load(str(opt), load_external_data=False).graph
        except Exception as e:  # noqa: BLE001
            out.setdefault("errors", {})[level_name] = str(e)[:300]
            continue
        finally:
            for p in (opt, Path(str(opt) + ".data")):
                if p.exists():
                    p.unlink()
        ops = collections.Counter(
            (f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in g.node)
        int_ops = {k: v for k, v in ops.items() if k.split(":")[-1] in ORT_INT_COMPUTE}
        flt_ops = {k: v for k, v in ops.items() if k.split(":")[-1] in ORT_FLOAT_COMPUTE}
        out.update(level=level_name, int8_compute=sum(int_ops.values()), float_compute=sum(flt_ops.values()),
                   int8_ops=int_ops, float_ops=flt_ops,
                   dequantize_linear_left=ops.get("DequantizeLinear", 0),
                   quantize_linear_left=ops.get("QuantizeLinear", 0))
        return out
    out["level"] = None
    return out


# ------------------------------------------------------------------------------------------ speed
class OvThroughput:
    def __init__(self, cm, x):
        self.cm, self.x = cm, x
        self.nireq = int(cm.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(cm, self.nireq)
        self.done = 0

        def cb(_req, _ud):
            self.done += 1
        self.queue.set_callback(cb)

    def measure(self, seconds, min_iters=None):
        min_iters = min_iters or 2 * self.nireq
        self.done = 0
        started = 0
        t0 = time.perf_counter()
        while started < min_iters or time.perf_counter() - t0 < seconds:
            self.queue.start_async({0: self.x})
            started += 1
        self.queue.wait_all()
        dt = time.perf_counter() - t0
        return self.done / dt


def measure_latency(fn, seconds, min_iters=3):
    ts = []
    t_end = time.perf_counter() + seconds
    while len(ts) < min_iters or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    res = {"model": spec["model"], "versions": {"onnxruntime": ort.__version__, "openvino": ov.__version__}}

    with np.load(spec["test"]) as z:
        keys = [k for k in z.files if k != "labels"]
        xs_all = z[spec["input_name"]] if spec["input_name"] in z.files else z[keys[0]]
        labels = z["labels"] if "labels" in z.files else None
    n = min(len(xs_all), spec.get("max_test") or len(xs_all))
    xs = [np.ascontiguousarray(xs_all[i:i + 1]) for i in range(n)]
    labels = labels[:n] if labels is not None else None
    in_shape = xs[0].shape
    res["n_test"] = n
    core = ov.Core()

    def top1(y):
        return y.reshape(len(y), -1).argmax(1)

    # ---------------------------------------------------------------- fidelity + int8 execution
    log(f"  [{spec['model']}] fidelity: FP32 reference in ORT on {n} inputs")
    ref = run_ort_all(ort_session(spec["fp32"]), xs)
    ref_top1 = top1(ref)
    fid = {}
    if labels is not None:
        fid["fp32"] = {"top1_ort": float((ref_top1 == labels).mean())}
    else:
        fid["fp32"] = {}
    for tag, f32 in (("fp32_f32", True), ("fp32", False)):
        cm = ov_compile(core, spec["fp32"], in_shape, "LATENCY", f32=f32)
        y = run_ov_all(cm, xs)
        d = fid.setdefault(tag, {})
        d["sqnr_ov"] = sqnr_db(ref, y)
        d["top1_agree_ov"] = float((top1(y) == ref_top1).mean())
        d["ov_inference_precision"] = str(cm.get_property("INFERENCE_PRECISION_HINT"))
        if labels is not None:
            d["top1_ov"] = float((top1(y) == labels).mean())
        del cm
    int8 = {}
    for tool, path in spec["variants"].items():
        log(f"  [{spec['model']}] fidelity + int8 check: {tool}")
        d = fid.setdefault(tool, {})
        try:
            y = run_ort_all(ort_session(path), xs)
            d["sqnr_ort"] = sqnr_db(ref, y)
            d["top1_agree_ort"] = float((top1(y) == ref_top1).mean())
            if labels is not None:
                d["top1_ort"] = float((top1(y) == labels).mean())
        except Exception as e:  # noqa: BLE001
            d["ort_error"] = str(e)[:500]
        chk = int8.setdefault(tool, {})
        for f32 in (False, True):
            try:
                cm = ov_compile(core, path, in_shape, "LATENCY", f32=f32)
                y = run_ov_all(cm, xs)
                sfx = "_f32" if f32 else ""
                d["sqnr_ov" + sfx] = sqnr_db(ref, y)
                d["top1_agree_ov" + sfx] = float((top1(y) == ref_top1).mean())
                if labels is not None:
                    d["top1_ov" + sfx] = float((top1(y) == labels).mean())
                if not f32:
                    chk["ov"] = ov_int8_layers(cm)
                del cm
            except Exception as e:  # noqa: BLE001
                d["ov_error" + ("_f32" if f32 else "")] = str(e)[:500]
        chk["ort"] = ort_int8_ops(path, work, f"{spec['model']}_{tool}")
    res["fidelity"] = fid
    res["int8_exec"] = int8
    # fp32 baseline int8-check (sanity: must be 0 int8 layers)
    cm = ov_compile(core, spec["fp32"], in_shape, "LATENCY")
    res["int8_exec_fp32_ov"] = ov_int8_layers(cm)
    del cm

    # ------------------------------------------------------------------------------------ speed
    rounds = int(spec.get("rounds", 5))
    if rounds <= 0:
        res["ov_shape_mode"] = dict(OV_SHAPE_MODE)
        write(out_path, res)
        return
    x = np.random.default_rng(BENCH_INPUT_SEED).standard_normal(in_shape).astype(np.float32)
    if spec.get("speed_input") == "test":
        x = xs[0]
    variants = {"fp32_f32": (spec["fp32"], True), "fp32": (spec["fp32"], False)}
    variants.update({t: (p, False) for t, p in spec["variants"].items()})
    meas = []  # (kind, variant, callable(seconds)->value)
    info = {}
    log(f"  [{spec['model']}] speed: compiling {len(variants)} variants")
    for v, (path, f32) in variants.items():
        try:
            cm_t = ov_compile(core, path, in_shape, "THROUGHPUT", f32=f32)
            tp = OvThroughput(cm_t, x)
            cm_l = ov_compile(core, path, in_shape, "LATENCY", f32=f32)
            req = cm_l.create_infer_request()
            info[v] = {"ov_tput_nireq": tp.nireq, "ov_tput_streams": int(cm_t.get_property("NUM_STREAMS")),
                       "ov_inference_precision": str(cm_l.get_property("INFERENCE_PRECISION_HINT"))}
            meas.append(("ov_tput_fps", v, tp.measure, spec.get("tput_s", 1.5)))
            meas.append(("ov_lat_ms", v, (lambda r: (lambda s: measure_latency(lambda: r.infer({0: x}), s)))(req),
                         spec.get("lat_s", 1.0)))
        except Exception as e:  # noqa: BLE001
            info.setdefault(v, {})["ov_error"] = str(e)[:500]
        if v == "fp32_f32":
            continue
        try:
            sess = ort_session(path)
            feed = {sess.get_inputs()[0].name: x}
            meas.append(("ort_lat_ms", v,
                         (lambda s_, f_: (lambda sec: measure_latency(lambda: s_.run(None, f_), sec)))(sess, feed),
                         spec.get("lat_s", 1.0)))
        except Exception as e:  # noqa: BLE001
            info.setdefault(v, {})["ort_error"] = str(e)[:500]
    # warm-up
    for _kind, _v, fn, _s in meas:
        fn(0.2)
    samples = collections.defaultdict(list)
    # A new (seeded) order each round: in a fixed or rotated cycle every measurement follows the same neighbour,
    # whose after-effects (ORT threads spinning down, caches full of its weights) would then hit it every round.
    shuffler = random.Random(BENCH_INPUT_SEED)
    for r in range(rounds):
        for kind, v, fn, sec in shuffler.sample(meas, len(meas)):
            samples[(kind, v)].append(fn(sec))
        log(f"  [{spec['model']}] speed round {r + 1}/{rounds} done")
    speed = {v: dict(info.get(v, {})) for v in variants}
    for (kind, v), vals in samples.items():
        speed[v][kind] = statistics.median(vals)
        speed[v][kind + "_rounds"] = vals
    res["speed"] = speed
    res["ov_shape_mode"] = dict(OV_SHAPE_MODE)
    res["speed_config"] = {"rounds": rounds, "tput_s": spec.get("tput_s", 1.5), "lat_s": spec.get("lat_s", 1.0),
                           "input_shape": list(in_shape), "ort_threads_default": True}
    write(out_path, res)


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=json_default)


if __name__ == "__main__":
    if sys.argv[1] == "--probe":
        probe_main(*sys.argv[2:7])
    else:
        main(sys.argv[1], sys.argv[2])
