"""Build a small *trained* YOLOv8n detector (ONNX, dynamic H/W) plus real calibration/test inputs.

Bench-only, nothing here downloads anything. Run it with the detector venv (bash bench/detector_setup.sh):

    bench/.venv-detector/bin/python bench/detector_prepare.py            # everything (~15 min on 2 cores)
    bench/.venv-detector/bin/python bench/detector_prepare.py --epochs 3 # quicker, weaker model

Steps (each one reuses its output when it is already there; --fresh redoes all of them):
  1. data set: synthetic but photo-like scenes (gradient / low-frequency-noise / cluttered backgrounds,
     sensor noise, blur, JPEG) with 5 object classes pasted at random positions, scales, rotations and
     colours: circle, rectangle, triangle, star (each filled or outlined) and glyph (a letter or digit
     rendered with matplotlib's bundled DejaVu Sans Bold). 2-8 objects per image, image sizes 256-800 px
     per side. YOLO format under out/detector/dataset/ (train 600, val 100) with dataset.yaml.
  2. training: YOLO("yolov8n.yaml") (built from its config: random init, no weights fetched), CPU, imgsz 320.
  3. export: ONNX, dynamic=True (input [batch,3,height,width], output [batch,4+nc,anchors]), opset 17,
     simplify=False; copied to out/detector/yolov8n.onnx and checked in onnxruntime at two sizes against torch.
  4. inputs: out/detector/calib/NNN.npy (train split) and out/detector/test/NNN.npy (val split), float32
     [1,3,H,W], RGB/255, letterboxed (grey 114 padding, centred) to H, W multiples of 32 in [320, 640];
     out/detector/test/boxes.json holds each test input's ground truth in that input's pixel coordinates.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "detector"

# ultralytics reads these at import time: no network, settings/fonts kept under bench/out
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", str(DEFAULT_OUT / "ultralytics-config"))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

CLASSES = ["circle", "rectangle", "triangle", "star", "glyph"]
GLYPHS = "ABCDEFGHJKLMNPRSTUVWXYZ2345679"  # no O/0/I/1/8 look-alikes of the other classes
PAD_VALUE = 114
STRIDE = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


# --------------------------------------------------------------------------------------------- data set
def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """float32 HxWx3 in [0, 255]."""
    kind = rng.choice(["gradient", "noise", "clutter"], p=[0.3, 0.35, 0.35])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(ang) + yy * math.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    if kind != "gradient":
        # low-frequency colour noise: a tiny random image upsampled bicubically
        gw, gh = int(rng.integers(3, 12)), int(rng.integers(3, 12))
        small = rng.uniform(0, 255, (gh, gw, 3)).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
        a = rng.uniform(0.3, 0.8)
        img = img * (1 - a) + big * a
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if kind == "clutter":  # distractors that are none of the classes: lines, arcs, speckles, stripes
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 15))):
            col = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(0.05, 0.5) * min(w, h)
            what = rng.integers(0, 3)
            if what == 0:
                d.line([x0, y0, x0 + rng.uniform(-r, r) * 2, y0 + rng.uniform(-r, r) * 2], fill=col,
                       width=int(rng.integers(1, 4)))
            elif what == 1:
                a0 = rng.uniform(0, 360)
                d.arc([x0 - r, y0 - r, x0 + r, y0 + r], a0, a0 + rng.uniform(30, 150), fill=col,
                      width=int(rng.integers(1, 3)))
            else:
                for _ in range(int(rng.integers(10, 40))):
                    px, py = x0 + rng.normal(0, r / 2), y0 + rng.normal(0, r / 2)
                    d.point([px, py], fill=col)
    arr = np.asarray(img, np.float32)
    return arr + rng.normal(0, rng.uniform(1, 8), arr.shape).astype(np.float32)


def _star(cx: float, cy: float, r: float, inner: float, rot: float, points: int = 5) -> list:
    pts = []
    for i in range(points * 2):
        rr = r if i % 2 == 0 else r * inner
        a = rot + i * math.pi / points
        pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
    return pts


def _object_patch(rng: np.random.Generator, cls: int, size: float, colour: tuple, font_path: Path) -> Image.Image:
    """RGBA patch, tightly cropped to the drawn pixels."""
    S = int(size * 1.6) + 8
    im = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    c = S / 2
    filled = rng.random() < 0.6
    lw = max(2, int(size * rng.uniform(0.05, 0.12)))
    fill = colour + (255,) if filled else None
    outline = colour + (255,)
    r = size / 2
    if cls == 0:  # circle (slightly elliptical at most)
        ar = rng.uniform(0.85, 1.15)
        box = [c - r * ar, c - r / ar, c + r * ar, c + r / ar]
        d.ellipse(box, fill=fill, outline=outline, width=lw)
    elif cls == 1:  # rectangle / square
        ar = rng.uniform(0.45, 1.0)
        if rng.random() < 0.5:
            ar = 1 / ar
        hw, hh = r * min(1.0, ar), r * min(1.0, 1 / ar)
        d.rectangle([c - hw, c - hh, c + hw, c + hh], fill=fill, outline=outline, width=lw)
    elif cls == 2:  # triangle: three vertices spread around the centre
        base = rng.uniform(0, 2 * math.pi)
        angs = [base, base + rng.uniform(1.7, 2.5), base + rng.uniform(3.8, 4.6)]
        pts = [(c + r * math.cos(a), c + r * math.sin(a)) for a in angs]
        d.polygon(pts, fill=fill, outline=outline, width=lw)
    elif cls == 3:  # star
        pts = _star(c, c, r, rng.uniform(0.38, 0.55), rng.uniform(0, 2 * math.pi), int(rng.choice([5, 5, 6])))
        d.polygon(pts, fill=fill, outline=outline, width=max(2, lw // 2))
    else:  # glyph
        ch = GLYPHS[int(rng.integers(len(GLYPHS)))]
        font = ImageFont.truetype(str(font_path), max(8, int(size * 1.1)))
        d.text((c, c), ch, fill=outline, font=font, anchor="mm")
    if cls in (1, 4):
        im = im.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC, expand=True)
    alpha = np.asarray(im)[..., 3]
    ys, xs = np.nonzero(alpha > 96)
    return im.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def _iou_and_cover(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    aa = (a[2] - a[0]) * (a[3] - a[1])
    ab = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (aa + ab - inter + 1e-9), inter / min(aa, ab)


def make_image(rng: np.random.Generator, font_path: Path):
    """Returns (PIL RGB image, [(cls, x1, y1, x2, y2), ...] in pixels)."""
    w, h = int(rng.integers(256, 801)), int(rng.integers(256, 801))
    if max(w, h) / min(w, h) > 2.0:  # keep aspect ratio <= 2 so letterboxed sides stay in range
        h = int(min(max(h, w / 2), w * 2))
    bg = _background(rng, w, h)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    boxes: list = []
    for _ in range(int(rng.integers(2, 9))):
        for _try in range(20):
            cls = int(rng.integers(len(CLASSES)))
            size = rng.uniform(0.10, 0.40) * min(w, h)
            patch_alpha_colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            patch = _object_patch(rng, cls, size, patch_alpha_colour, font_path)
            pw, ph = patch.size
            if pw >= w - 2 or ph >= h - 2:
                continue
            x, y = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
            box = (x, y, x + pw, y + ph)
            if any(max(_iou_and_cover(box, b[1:])) > 0.2 for b in boxes):
                continue
            # contrast against what is under the patch, so every object is visible
            under = bg[y:y + ph, x:x + pw].reshape(-1, 3).mean(0)
            if np.abs(under - np.asarray(patch_alpha_colour)).sum() < 120:
                continue
            img.paste(patch, (x, y), patch)
            boxes.append((cls, *box))
            break
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0.5, 5), (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), boxes


def build_dataset(root: Path, n_train: int, n_val: int, seed: int) -> Path:
    yaml_path = root / "dataset.yaml"
    counts = {"train": n_train, "val": n_val}
    if yaml_path.exists() and all(len(list((root / "labels" / s).glob("*.txt"))) == n for s, n in counts.items()):
        log(f"data set already there: {root}")
        return yaml_path
    shutil.rmtree(root, ignore_errors=True)
    font_path = font_dir() / "DejaVuSans-Bold.ttf"
    stats = {c: 0 for c in CLASSES}
    for split, n in counts.items():
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img, boxes = make_image(rng, font_path)
            stem = f"{split}_{i:04d}"
            img.save(root / "images" / split / f"{stem}.jpg", quality=int(rng.integers(70, 96)))
            W, H = img.size
            lines = []
            for c, x1, y1, x2, y2 in boxes:
                stats[CLASSES[c]] += 1
                lines.append(f"{c} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} {(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}")
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    yaml_path.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnc: {len(CLASSES)}\nnames:\n{names}\n")
    log(f"data set written: {root} (train {n_train}, val {n_val}; objects per class {stats})")
    return yaml_path


# --------------------------------------------------------------------------------------------- training
def prepare_ultralytics_config() -> None:
    """Pre-place the fonts ultralytics would otherwise download (a copy of DejaVu Sans named Arial)."""
    cfg = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    cfg.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (cfg / name).exists():
            shutil.copy(font_dir() / "DejaVuSans.ttf", cfg / name)


def train(yaml_path: Path, out: Path, args) -> Path:
    best = out / "runs" / "train" / "weights" / "best.pt"
    done = out / "runs" / "train" / "finished.json"  # written only once training ran to its end
    if best.exists() and done.exists() and not args.retrain:
        log(f"trained weights already there: {best} ({done.read_text().strip()}; --retrain to train again)")
        return best
    from ultralytics import YOLO, settings

    wanted = {"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False, "raytune": False,
              "tensorboard": False, "wandb": False, "vscode_msg": False, "openvino_msg": False,
              "datasets_dir": str(out), "weights_dir": str(out / "runs" / "weights"), "runs_dir": str(out / "runs")}
    settings.update({k: v for k, v in wanted.items() if k in settings})
    shutil.rmtree(out / "runs" / "train", ignore_errors=True)
    model = YOLO("yolov8n.yaml")  # architecture from the bundled config; random init
    t0 = time.time()
    model.train(data=str(yaml_path), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device="cpu",
                workers=args.workers, cache="ram", plots=False, amp=False, val=True, project=str(out / "runs"),
                name="train", exist_ok=True, seed=args.seed, deterministic=False, close_mosaic=args.close_mosaic,
                # few, small batches: step the optimizer on every batch (nbs = batch) with a fixed AdamW lr
                nbs=args.batch, optimizer="AdamW", lr0=args.lr0, cos_lr=True,
                warmup_epochs=min(3.0, max(0.5, args.epochs / 5)), patience=args.epochs, verbose=True)
    log(f"training took {time.time() - t0:.0f} s")
    done.write_text(json.dumps({"epochs": args.epochs, "batch": args.batch, "imgsz": args.imgsz, "lr0": args.lr0,
                                "train_s": round(time.time() - t0, 1)}) + "\n")
    return best


def validate(best: Path, yaml_path: Path, out: Path, imgsz: int) -> dict:
    from ultralytics import YOLO

    m = YOLO(str(best)).val(data=str(yaml_path), imgsz=imgsz, batch=16, device="cpu", plots=False, workers=0,
                            project=str(out / "runs"), name="val", exist_ok=True, verbose=True)
    res = {"map50": float(m.box.map50), "map50_95": float(m.box.map), "imgsz": imgsz,
           "per_class_ap50": {CLASSES[int(c)]: float(v) for c, v in zip(m.box.ap_class_index, m.box.ap50)}}
    log(f"ultralytics val @ {imgsz}: mAP50 {res['map50']:.3f}  mAP50-95 {res['map50_95']:.3f}  {res['per_class_ap50']}")
    return res


# --------------------------------------------------------------------------------------------- export
def export_onnx(best: Path, out: Path, imgsz: int) -> Path:
    from ultralytics import YOLO

    dst = out / "yolov8n.onnx"
    f = YOLO(str(best)).export(format="onnx", dynamic=True, opset=17, simplify=False, imgsz=imgsz, device="cpu",
                               batch=1)
    import onnx

    m = onnx.load(f)
    # the exporter leaves the output's channel dim symbolic ("Concatoutput0_dim_1"); it is always 4 + nc
    ch = m.graph.output[0].type.tensor_type.shape.dim[1]
    if not ch.dim_value:
        ch.Clear()
        ch.dim_value = 4 + len(CLASSES)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    log(f"exported {f} -> {dst} (output dim 1 fixed to {4 + len(CLASSES)})")
    return dst


def check_onnx(onnx_path: Path, best: Path) -> dict:
    import onnx
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    m = onnx.load(str(onnx_path))
    onnx.checker.check_model(m)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    info = {"inputs": {i.name: dims(i) for i in m.graph.input},
            "outputs": {o.name: dims(o) for o in m.graph.output},
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}}
    torch_model = YOLO(str(best)).model.float().eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for h, w in ((320, 320), (416, 640)):
        x = rng.random((1, 3, h, w), dtype=np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            yt = torch_model(torch.from_numpy(x))
        yt = (yt[0] if isinstance(yt, (list, tuple)) else yt).numpy()
        anchors = sum((h // s) * (w // s) for s in (8, 16, 32))
        assert y.shape == (1, 4 + len(CLASSES), anchors), y.shape
        diff = float(np.abs(y - yt).max())
        info[f"ort_vs_torch_maxabs_{h}x{w}"] = diff
        log(f"onnxruntime {h}x{w}: output {list(y.shape)}, max |ORT - torch| = {diff:.2e}")
    log(f"ONNX inputs {info['inputs']} outputs {info['outputs']} opset {info['opset']}")
    return info


# --------------------------------------------------------------------------------------------- inputs
def letterbox(img: Image.Image, long_side: int):
    """Resize so the long side is `long_side`, pad (centred, grey) so both sides are multiples of 32, >= 320.

    Returns (float32 [1,3,H,W] RGB/255, scale, (pad_x, pad_y))."""
    w0, h0 = img.size
    r = long_side / max(w0, h0)
    nw, nh = max(1, round(w0 * r)), max(1, round(h0 * r))
    W = max(320, int(math.ceil(nw / STRIDE)) * STRIDE)
    H = max(320, int(math.ceil(nh / STRIDE)) * STRIDE)
    px, py = (W - nw) // 2, (H - nh) // 2
    canvas = np.full((H, W, 3), PAD_VALUE, np.uint8)
    canvas[py:py + nh, px:px + nw] = np.asarray(img.convert("RGB").resize((nw, nh), Image.BILINEAR))
    x = (canvas.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(x), r, (px, py)


def write_inputs(root: Path, out: Path, n_calib: int, n_test: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 2])
    sides = np.arange(320, 641, STRIDE)
    summary = {}
    for name, split, n in (("calib", "train", n_calib), ("test", "val", n_test)):
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        imgs = sorted((root / "images" / split).glob("*.jpg"))
        if len(imgs) < n:
            raise SystemExit(f"{split} split has {len(imgs)} images, need {n}")
        gt, shapes = {}, []
        for i, p in enumerate(imgs[:n]):
            img = Image.open(p)
            x, r, (px, py) = letterbox(img, int(rng.choice(sides)))
            np.save(d / f"{i:03d}.npy", x)
            shapes.append(x.shape[2:])
            if name == "test":
                W0, H0 = img.size
                boxes = []
                for line in (root / "labels" / split / f"{p.stem}.txt").read_text().split("\n"):
                    if not line.strip():
                        continue
                    c, cx, cy, bw, bh = line.split()
                    cx, cy, bw, bh = float(cx) * W0, float(cy) * H0, float(bw) * W0, float(bh) * H0
                    boxes.append({"class": int(c),
                                  "box": [round((cx - bw / 2) * r + px, 2), round((cy - bh / 2) * r + py, 2),
                                          round((cx + bw / 2) * r + px, 2), round((cy + bh / 2) * r + py, 2)]})
                gt[f"{i:03d}"] = {"source": p.name, "shape": list(x.shape[2:]), "boxes": boxes}
        if name == "test":
            (d / "boxes.json").write_text(json.dumps({"classes": CLASSES, "format": "class, x1 y1 x2 y2 in the "
                                                      "letterboxed input's pixels", "images": gt}, indent=1))
        hs, ws = [s[0] for s in shapes], [s[1] for s in shapes]
        summary[name] = {"n": n, "split": split, "H": [min(hs), max(hs)], "W": [min(ws), max(ws)],
                         "distinct_shapes": len(set(map(tuple, shapes)))}
        log(f"{name}: {n} inputs from {split} in {d}, H {min(hs)}-{max(hs)}, W {min(ws)}-{max(ws)}, "
            f"{summary[name]['distinct_shapes']} distinct shapes")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr0", type=float, default=0.002)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--close-mosaic", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true", help="train again even if weights exist")
    ap.add_argument("--fresh", action="store_true", help="regenerate the data set and retrain")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        shutil.rmtree(out / "dataset", ignore_errors=True)
        args.retrain = True
    times, t = {}, time.time()
    yaml_path = build_dataset(out / "dataset", args.n_train, args.n_val, args.seed)
    times["dataset_s"], t = time.time() - t, time.time()
    prepare_ultralytics_config()
    best = train(yaml_path, out, args)
    times["train_s"], t = time.time() - t, time.time()
    done = json.loads((best.parent.parent / "finished.json").read_text())
    times["train_s"] = max(times["train_s"], done["train_s"])  # reused weights: the time they took
    val = validate(best, yaml_path, out, args.imgsz)
    times["val_s"], t = time.time() - t, time.time()
    onnx_path = export_onnx(best, out, args.imgsz)
    info = check_onnx(onnx_path, best)
    times["export_check_s"], t = time.time() - t, time.time()
    inputs = write_inputs(out / "dataset", out, args.n_calib, args.n_test, args.seed)
    times["inputs_s"] = time.time() - t
    manifest = {"model": str(onnx_path), "classes": CLASSES, "train_args": {k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()}, "val": val, "onnx": info, "inputs": inputs,
                "times_s": {k: round(v, 1) for k, v in times.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log(f"done: {out / 'manifest.json'}  times {manifest['times_s']}")


if __name__ == "__main__":
    sys.exit(main())
