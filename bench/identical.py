"""Post-training INT8 files of the ten bench models, made by this checkout and by an older commit, compared byte
for byte: a refactoring must not change what `onnxcompress quantize` writes unless it says why.

    .venv/bin/python bench/identical.py --base 9056f73 [--models resnet50,digits_cnn]

The older commit is checked out with `git worktree` into the output folder and imported from there (a copy of
its package layout, `transforms/` as `onnxcompress.transforms` and so on) with this venv's dependencies. Both
trees quantize every model with the same CLI command, one after the other; the table lists the SHA-256 of each
pair. Light models and their calibration data come from `bench/run.py`'s preparation (`bench/out`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BUNDLED_MODELS, DEFAULT_MATERIALIZE, DEFAULT_OUT_DIR, LIGHT_MODELS, REPO_DIR,  # noqa: E402
                    SUBSET_SIZE, log)
from run import prepare_bundled, prepare_light  # noqa: E402

#: Where each installed subpackage lives in the source tree (pyproject's package-dir).
_LAYOUT = {"transforms": "transforms", "runtime": "runtime", "models": "models"}


def import_root(tree: Path, root: Path) -> Path:
    """A folder that imports `onnxcompress` from `tree` with the installed layout: onnxcompress/ with transforms/,
    runtime/ and models/ linked inside it."""
    package = root / "onnxcompress"
    if not package.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(tree / "onnxcompress"), str(package)], check=True)
        for name, source in _LAYOUT.items():
            (package / name).symlink_to(tree / source, target_is_directory=True)
    return root


def base_tree(rev: str, out: Path) -> Path:
    tree = out / f"tree-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", str(tree), rev], check=True,
                       stdout=subprocess.DEVNULL)
    return tree


def quantize(model: dict, out: Path, pythonpath: Path | None) -> tuple[str, float]:
    """Quantize `model` with the CLI of the tree on `pythonpath` (None: this checkout); SHA-256 and seconds."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-c", "from onnxcompress.cli import main; main()", "quantize", model["fp32"],
           "-o", str(out), "--data", model["calib"], "--subset-size", str(SUBSET_SIZE)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    data = Path(str(out) + ".data")
    if data.exists():
        digest += "+" + hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    return digest, seconds


def check_import(root: Path) -> None:
    """Fail early when the base tree's package would not be the one imported."""
    probe = "import onnxcompress, onnxcompress.transforms as t; print(onnxcompress.__file__, t.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(root)), check=True,
                           capture_output=True, text=True, cwd="/").stdout
    if str(root) not in found.split()[0] or str(root) not in found.split()[1]:
        raise SystemExit(f"the base tree is not imported from {root}: {found}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="commit to compare against")
    parser.add_argument("--models", default=",".join(LIGHT_MODELS + BUNDLED_MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "identical")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prep = argparse.Namespace(out=DEFAULT_OUT_DIR / "results.json", light_dir=DEFAULT_OUT_DIR / "light_models",
                              materialize_script=DEFAULT_MATERIALIZE)
    root = import_root(base_tree(args.base, args.out), args.out / f"import-{args.base}")
    check_import(root)
    rows = []
    for name in args.models.split(","):
        model = prepare_light(name, prep) if name in LIGHT_MODELS else prepare_bundled(name, prep)
        base_hash, base_s = quantize(model, args.out / f"{name}.base.onnx", root)
        head_hash, head_s = quantize(model, args.out / f"{name}.head.onnx", None)
        rows.append({"model": name, "identical": base_hash == head_hash, "base": base_hash[:16],
                     "head": head_hash[:16], "base_s": round(base_s, 1), "head_s": round(head_s, 1)})
        log(f"{name}: {'identical' if base_hash == head_hash else 'DIFFERENT'} ({base_s:.0f} s / {head_s:.0f} s)")
    (args.out / "identical.json").write_text(json.dumps(rows, indent=1))
    print(f"\n| model | {args.base} vs HEAD | sha256 (first 16) | quantize s (base / head) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {'identical' if r['identical'] else 'different'} | {r['head']} "
              f"| {r['base_s']} / {r['head_s']} |")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
