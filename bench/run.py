"""Peer-comparison benchmark: onnxcompress vs NNCF 3.4.0 vs ONNX Runtime quantize_static, in ONE run.

Run with the main venv (it needs onnx, onnxruntime, openvino, numpy, psutil, matplotlib); the peers
run from bench/.venv-peers (create it with bench/setup.sh) and onnxcompress runs as its CLI:

    .venv/bin/python bench/run.py --models squeezenet,digits_cnn --tools nncf,ort
    .venv/bin/python bench/run.py --models all --tools onnxcompress,nncf,ort --rounds 5

For each model, sequentially (never two heavy processes at once):
  1. data: light models are materialized with /work/shared/tools/materialize_light_models.py if missing;
     calibration npz = 300 N(0,1) float32 samples (seed 20240), test npz = 100 more (seed 20241), stored
     under the model's input name with axis 0 enumerating samples (sample i is fed as x[i:i+1]);
     bundled models use their own calibration/test data from onnxcompress.models.
  2. quantization: one fresh process per tool -> process wall time (interpreter start, imports, model
     load, calibration, quantization, save) and peak RSS of that process (os.wait4 rusage ru_maxrss, plus
     psutil sampling of the whole process tree), output size; the peers also report phase times.
  3. evaluation: bench/evaluate.py in a fresh process (fidelity, INT8 execution checks, speed with all
     variants interleaved in rounds).
Results are merged per model into --out (JSON), and the markdown tables + plot are regenerated.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, BUNDLED_MODELS, CALIB_SEED, DEFAULT_MATERIALIZE, DEFAULT_OUT_DIR,  # noqa: E402
                    DEFAULT_PEERS_PYTHON, LIGHT_MODELS, N_CALIB, N_TEST, REPO_DIR, SUBSET_SIZE, TEST_SEED, TOOLS,
                    log, write_json)

PEER_SCRIPT = BENCH_DIR / "quantize_peer.py"
EVAL_SCRIPT = BENCH_DIR / "evaluate.py"


# ------------------------------------------------------------------------------------------- data
def bundled_models() -> list[str]:
    names = list(BUNDLED_MODELS)
    try:
        import onnxcompress.models as zoo
        for fn in ("available", "list_samples", "available_samples", "samples"):
            f = getattr(zoo, fn, None)
            if callable(f):
                got = [getattr(s, "name", s) for s in f()]
                names = list(dict.fromkeys([str(g) for g in got] + names))
                break
    except Exception:  # noqa: BLE001
        pass
    return names


def model_input(path: Path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if len(ins) != 1:
        raise ValueError(f"{path}: benchmark supports single-input models (got {[i.name for i in ins]})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ins[0].type.tensor_type.shape.dim]
    return ins[0].name, dims


def prepare_light(name: str, args) -> dict:
    light_dir = Path(args.light_dir)
    fp32 = light_dir / f"{name}_fp32.onnx"
    if not fp32.exists():
        log(f"[{name}] materializing with {args.materialize_script}")
        env = dict(os.environ, LIGHT_MODELS_DIR=str(light_dir))
        subprocess.run([sys.executable, str(args.materialize_script), name], env=env, check=True)
    input_name, dims = model_input(fp32)
    sample_shape = [1] + [d if d else 224 for d in dims[1:]]
    data_dir = Path(args.out).parent / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    calib = data_dir / f"{name}_calib.npz"
    test = data_dir / f"{name}_test.npz"
    for path, seed, n in ((calib, CALIB_SEED, N_CALIB), (test, TEST_SEED, N_TEST)):
        if not path.exists():
            x = np.random.default_rng(seed).standard_normal([n] + sample_shape[1:], dtype=np.float32)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **{input_name: x})
            os.replace(tmp, path)
    return {"name": name, "kind": "light", "fp32": str(fp32), "calib": str(calib), "test": str(test),
            "input_name": input_name, "sample_shape": sample_shape}


def prepare_bundled(name: str, args) -> dict:
    try:
        from onnxcompress.models import sample
        s = sample(name)
        fp32, calib, test = Path(s.model_path), Path(s.calibration_path), Path(s.test_path)
    except Exception as e:  # noqa: BLE001  (API not there yet: fall back to the documented file layout)
        stem = name.split("_")[0]
        data = REPO_DIR / "models" / "data"
        fp32, calib, test = data / f"{name}.onnx", data / f"{stem}_calib.npz", data / f"{stem}_test.npz"
        if not fp32.exists():
            raise FileNotFoundError(f"bundled model {name!r}: onnxcompress.models.sample failed ({e}) "
                                    f"and {fp32} does not exist") from e
    input_name, dims = model_input(fp32)
    with np.load(calib) as z:
        key = input_name if input_name in z.files else [k for k in z.files if k != "labels"][0]
        sample_shape = [1] + list(z[key].shape[1:])
    return {"name": name, "kind": "bundled", "fp32": str(fp32), "calib": str(calib), "test": str(test),
            "input_name": input_name, "sample_shape": sample_shape}


# ------------------------------------------------------------------------------------ quantization
def onnxcompress_cmd(args) -> list[str] | None:
    if args.onnxcompress_cmd:
        return args.onnxcompress_cmd.split()
    cand = REPO_DIR / ".venv" / "bin" / "onnxcompress"
    if cand.exists():
        return [str(cand)]
    w = shutil.which("onnxcompress")
    return [w] if w else None


def run_measured(cmd: list[str], log_path: Path, timeout: float, env=None) -> dict:
    """Run cmd in a fresh process; wall time, peak RSS (wait4 ru_maxrss; psutil tree sampling)."""
    import psutil
    # Linux keeps ru_maxrss across the spawn: a child's value is at least this process's own peak (subprocess
    # spawns with vfork, sharing our memory until exec). When it is no larger, the child never exceeded it and
    # the sampled tree peak is the real figure.
    import resource
    inherited = max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    t0 = time.perf_counter()
    with open(log_path, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env)
        peak_tree = 0
        timed_out = False
        try:
            ps = psutil.Process(p.pid)
        except psutil.Error:
            ps = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if ps is not None:
                try:
                    procs = [ps] + ps.children(recursive=True)
                    peak_tree = max(peak_tree, sum(q.memory_info().rss for q in procs))
                except psutil.Error:
                    pass
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.1)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    peak = ru.ru_maxrss * 1024 if ru.ru_maxrss * 1024 > inherited * 1.01 else peak_tree
    return {"returncode": p.returncode, "timed_out": timed_out, "wall_s": wall,
            "peak_rss_mb": peak / 2 ** 20, "peak_rss_tree_sampled_mb": peak_tree / 2 ** 20,
            "ru_maxrss_mb": ru.ru_maxrss / 1024.0,
            "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime}


def run_interleaved(commands: dict[str, list[str]], repeats: int, log_dir: Path, timeout: float) -> dict[str, list]:
    """Run each tool's command `repeats` times, tools interleaved (same-run conditions), in fresh processes;
    returns every run_measured record per tool. A failing tool stops the run, naming its log."""
    runs: dict[str, list[dict]] = {tool: [] for tool in commands}
    env = {**os.environ, "NNCF_CI": "1"}  # NNCF telemetry stub
    for _ in range(repeats):
        for tool, cmd in commands.items():
            run = run_measured(cmd, log_dir / f"{tool}.log", timeout, env=env)
            if run["returncode"] != 0:
                raise SystemExit(f"{tool} failed, see {log_dir / f'{tool}.log'}")
            runs[tool].append(run)
            log(f"{tool}: {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB")
    return runs


def quantize(tool: str, m: dict, args, qdir: Path) -> dict:
    out = qdir / f"{tool}.onnx"
    for p in (out, Path(str(out) + ".data")):
        if p.exists():
            p.unlink()
    logp = qdir / f"{tool}.log"
    rec = {"tool": tool, "output": str(out), "log": str(logp)}
    env = dict(os.environ)
    if tool == "onnxcompress":
        base = onnxcompress_cmd(args)
        if base is None:
            return {**rec, "status": "skipped", "reason": "onnxcompress CLI not found"}
        cmd = base + ["quantize", m["fp32"], "-o", str(out), "--data", m["calib"],
                      "--subset-size", str(args.subset_size)]
    else:
        py = Path(args.peers_python)
        if not py.exists():
            return {**rec, "status": "skipped", "reason": f"{py} missing: run bench/setup.sh"}
        report = qdir / f"{tool}.phases.json"
        if report.exists():
            report.unlink()
        cmd = [str(py), str(PEER_SCRIPT), "--tool", tool, m["fp32"], "-o", str(out), "--data", m["calib"],
               "--subset-size", str(args.subset_size), "--report", str(report)]
        env["NNCF_CI"] = "1"  # NNCF telemetry stub
        env.pop("VIRTUAL_ENV", None)
    rec["cmd"] = cmd
    log(f"[{m['name']}] quantize with {tool}: {' '.join(cmd)}")
    r = run_measured(cmd, logp, args.quant_timeout, env=env)
    rec.update(r)
    if r["returncode"] != 0 or not out.exists():
        tail = logp.read_text(errors="replace")[-1500:]
        last = [ln for ln in tail.splitlines() if ln.strip()][-1:] or [f"exit code {r['returncode']}"]
        rec.update(status="failed", error_tail=tail, reason=("timeout; " if r["timed_out"] else "") + last[0][:200])
        log(f"[{m['name']}] {tool} FAILED (rc={r['returncode']}, {r['wall_s']:.1f}s); log: {logp}")
        return rec
    rec["status"] = "ok"
    rec["size_bytes"] = out.stat().st_size + (Path(str(out) + ".data").stat().st_size
                                              if Path(str(out) + ".data").exists() else 0)
    rec["size_ratio_vs_fp32"] = rec["size_bytes"] / Path(m["fp32"]).stat().st_size
    if tool != "onnxcompress":
        try:
            rep = json.load(open(qdir / f"{tool}.phases.json"))
            rec["phases"] = rep.get("phases")
            rec["tool_version"] = rep.get("version")
            rec["n_calib_samples"] = rep.get("n_samples")
        except Exception:  # noqa: BLE001
            pass
    log(f"[{m['name']}] {tool}: {r['wall_s']:.1f}s wall, peak RSS {r['peak_rss_mb']:.0f} MB, "
        f"{rec['size_bytes'] / 2 ** 20:.1f} MB ({rec['size_ratio_vs_fp32']:.3f}x fp32)")
    return rec


def best_run(runs: list[dict]) -> dict:
    """One record for repeated quantizations: the fastest run's wall time, the highest peak RSS of all runs.

    The minimum is the wall time least disturbed by the rest of the machine; memory is reported at its worst.
    A failure in any run is the result.
    """
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["wall_s_runs"] = [r["wall_s"] for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


# ---------------------------------------------------------------------------------------- ratios
PAIRS = [("onnxcompress", "nncf"), ("onnxcompress", "ort"), ("nncf", "ort")]


def compute_ratios(rec: dict) -> dict:
    q, ev = rec.get("quant", {}), rec.get("eval", {})
    sp, fid = ev.get("speed", {}), ev.get("fidelity", {})
    out = {"vs_fp32": {}, "pairs": {}}
    fp = sp.get("fp32", {})
    fpf = sp.get("fp32_f32", {})
    for t, s in sp.items():
        if t in ("fp32", "fp32_f32"):
            continue
        d = {}
        if s.get("ov_tput_fps") and fp.get("ov_tput_fps"):
            d["ov_tput_vs_fp32"] = s["ov_tput_fps"] / fp["ov_tput_fps"]
        if s.get("ov_tput_fps") and fpf.get("ov_tput_fps"):
            d["ov_tput_vs_fp32_f32"] = s["ov_tput_fps"] / fpf["ov_tput_fps"]
        if s.get("ov_lat_ms") and fp.get("ov_lat_ms"):
            d["ov_lat_speedup_vs_fp32"] = fp["ov_lat_ms"] / s["ov_lat_ms"]
        if s.get("ort_lat_ms") and fp.get("ort_lat_ms"):
            d["ort_lat_speedup_vs_fp32"] = fp["ort_lat_ms"] / s["ort_lat_ms"]
        out["vs_fp32"][t] = d
    for a, b in PAIRS:
        qa, qb = q.get(a, {}), q.get(b, {})
        if qa.get("status") != "ok" or qb.get("status") != "ok":
            continue
        d = {"quant_wall": qa["wall_s"] / qb["wall_s"], "quant_peak_rss": qa["peak_rss_mb"] / qb["peak_rss_mb"],
             "size": qa["size_bytes"] / qb["size_bytes"]}
        sa, sb = sp.get(a, {}), sp.get(b, {})
        for k in ("ov_tput_fps", "ov_lat_ms", "ort_lat_ms"):
            if sa.get(k) and sb.get(k):
                d[k] = sa[k] / sb[k]
        fa, fb = fid.get(a, {}), fid.get(b, {})
        for k in ("sqnr_ort", "sqnr_ov", "sqnr_ov_f32"):
            if k in fa and k in fb:
                d[k + "_diff_db"] = fa[k] - fb[k]
        out["pairs"][f"{a}/{b}"] = d
    return out


# ------------------------------------------------------------------------------------------ main
def versions(peers_python: str) -> dict:
    import onnx
    import onnxruntime
    import openvino
    v = {"main": {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}}
    if Path(peers_python).exists():
        code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
                "['nncf','onnx','onnxruntime','openvino','numpy']}))")
        try:
            v["peers"] = json.loads(subprocess.run([peers_python, "-c", code], capture_output=True, text=True,
                                                   check=True).stdout)
        except Exception as e:  # noqa: BLE001
            v["peers"] = {"error": str(e)}
    return v


def host_info() -> dict:
    import psutil
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    from onnxcompress.runtime.cpu import cpu_features
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "platform": platform.platform(), "cpu_features": cpu_features().describe()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="squeezenet,digits_cnn",
                    help=f"comma list or 'all' (= {','.join(LIGHT_MODELS)} + bundled samples) or 'light'")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of onnxcompress,nncf,ort")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (0 = skip speed)")
    ap.add_argument("--tput-seconds", type=float, default=1.5, help="OV throughput time per variant per round")
    ap.add_argument("--lat-seconds", type=float, default=1.0, help="latency time per variant per round")
    ap.add_argument("--out", default=str(DEFAULT_OUT_DIR / "results.json"))
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of merging per model")
    ap.add_argument("--skip-quantize", action="store_true",
                    help="reuse the quantized files and quantization metrics already in --out")
    ap.add_argument("--subset-size", type=int, default=SUBSET_SIZE)
    ap.add_argument("--quant-repeats", type=int, default=1,
                    help="quantize with every tool this many times, tools interleaved; the fastest wall time and "
                         "the highest peak RSS are reported")
    ap.add_argument("--quant-timeout", type=float, default=3 * 3600)
    ap.add_argument("--max-test", type=int, default=0, help="cap on test inputs for fidelity (0 = all)")
    ap.add_argument("--peers-python", default=str(DEFAULT_PEERS_PYTHON))
    ap.add_argument("--onnxcompress-cmd", default=None,
                    help="command prefix for the CLI (default: .venv/bin/onnxcompress, else PATH)")
    ap.add_argument("--light-dir", default=str(DEFAULT_OUT_DIR / "light_models"))
    ap.add_argument("--materialize-script", default=str(DEFAULT_MATERIALIZE))
    ap.add_argument("--no-report", action="store_true", help="do not regenerate markdown/plot")
    args = ap.parse_args(argv)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = set(tools) - set(TOOLS)
    if bad:
        ap.error(f"unknown tools {sorted(bad)}; choose from {TOOLS}")
    if args.models in ("all", "light"):
        models = list(LIGHT_MODELS) + (bundled_models() if args.models == "all" else [])
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    if out.exists() and not args.fresh:
        results = json.load(open(out))
    results.setdefault("models", {})
    results["meta"] = {"host": host_info(), "versions": versions(args.peers_python),
                       "subset_size": args.subset_size, "last_command": " ".join([sys.executable] + sys.argv),
                       "last_updated": _dt.datetime.now().isoformat(timespec="seconds")}
    run_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log(f"models={models} tools={tools} rounds={args.rounds} -> {out}")

    t_all = time.perf_counter()
    for i, name in enumerate(models, 1):
        t_model = time.perf_counter()
        log(f"===== [{i}/{len(models)}] {name}")
        try:
            m = prepare_light(name, args) if name in LIGHT_MODELS else prepare_bundled(name, args)
        except Exception as e:  # noqa: BLE001
            log(f"[{name}] cannot prepare: {e}")
            results["models"][name] = {"error": f"prepare: {e}", "run_id": run_id}
            write_json(out, results)
            continue
        # one quantized/ tree per results file, so runs with different --out never overwrite each other's files
        qdir = out.parent / ("quantized" if out.stem == "results" else f"quantized-{out.stem}") / name
        qdir.mkdir(parents=True, exist_ok=True)
        prev = results["models"].get(name, {})
        rec = {"run_id": run_id, "tools": tools, "fp32": {**m, "size_bytes": Path(m["fp32"]).stat().st_size},
               "quant": {}}
        runs = {tool: [] for tool in tools}
        for repeat in range(args.quant_repeats):
            for tool in tools[repeat % len(tools):] + tools[:repeat % len(tools)]:
                if args.skip_quantize and prev.get("quant", {}).get(tool, {}).get("status") == "ok" \
                        and Path(prev["quant"][tool]["output"]).exists():
                    rec["quant"][tool] = {**prev["quant"][tool], "reused": True}
                    continue
                runs[tool].append(quantize(tool, m, args, qdir))
        for tool, tool_runs in runs.items():
            if tool_runs:
                rec["quant"][tool] = best_run(tool_runs)
        ok = {t: r["output"] for t, r in rec["quant"].items() if r.get("status") == "ok"}
        spec = {"model": name, "fp32": m["fp32"], "test": m["test"], "input_name": m["input_name"],
                "variants": ok, "rounds": args.rounds, "tput_s": args.tput_seconds, "lat_s": args.lat_seconds,
                "work_dir": str(qdir), "max_test": args.max_test}
        spec_p, eval_p = qdir / "eval_spec.json", qdir / "eval.json"
        write_json(spec_p, spec)
        if eval_p.exists():
            eval_p.unlink()
        log(f"[{name}] evaluating fp32 + {list(ok)} (fresh process)")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, str(EVAL_SCRIPT), str(spec_p), str(eval_p)])
        if r.returncode == 0 and eval_p.exists():
            rec["eval"] = json.load(open(eval_p))
        else:
            rec["eval_error"] = f"evaluate.py exited {r.returncode}"
            log(f"[{name}] evaluation FAILED (rc={r.returncode})")
        rec["eval_wall_s"] = time.perf_counter() - t
        rec["ratios"] = compute_ratios(rec)
        rec["model_wall_s"] = time.perf_counter() - t_model
        results["models"][name] = rec
        write_json(out, results)
        log(f"[{name}] done in {rec['model_wall_s']:.0f}s")
        summarize(name, rec)
        if not args.no_report:
            regenerate_report(out)
    log(f"all done in {time.perf_counter() - t_all:.0f}s -> {out}")
    return 0


def summarize(name: str, rec: dict) -> None:
    ev = rec.get("eval", {})
    for t, q in rec["quant"].items():
        f = ev.get("fidelity", {}).get(t, {})
        s = ev.get("speed", {}).get(t, {})
        if q.get("status") != "ok":
            log(f"  {name:14s} {t:13s} {q.get('status')}: {q.get('reason', '')}")
            continue
        log(f"  {name:14s} {t:13s} quant {q['wall_s']:7.1f}s {q['peak_rss_mb']:7.0f}MB | "
            f"SQNR ort {f.get('sqnr_ort', float('nan')):5.1f} ov {f.get('sqnr_ov', float('nan')):5.1f} dB | "
            f"OV {s.get('ov_tput_fps', float('nan')):8.1f} fps {s.get('ov_lat_ms', float('nan')):7.2f} ms | "
            f"ORT {s.get('ort_lat_ms', float('nan')):7.2f} ms")


def regenerate_report(out: Path) -> None:
    try:
        import report
        report.write_all(out)
    except Exception as e:  # noqa: BLE001
        log(f"report generation failed: {e!r}")


if __name__ == "__main__":
    sys.exit(main())
