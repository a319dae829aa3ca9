"""Detection-quality metrics for the YOLOv8-style ONNX detector made by bench/detector_prepare.py.

Pure numpy (importable with only numpy; onnxruntime/openvino are imported in __main__ only).

The model's raw output is [batch, 4 + nc, anchors]: rows 0-3 are the box centre x, y and width, height in
input pixels, rows 4.. the per-class scores (already sigmoid-ed). A detection here is a tuple
(box, score, cls) with box = np.array([x1, y1, x2, y2]) in input pixels.

    decode(output)                   -> per-image lists of detections after class-aware NMS
    kept(reference_dets, dets)       -> fraction of the reference's detections (score > 0.25) that `dets`
                                        reproduces (same class, IoU > 0.5, greedy one-to-one matching)
    box_error(reference_dets, dets)  -> mean |coordinate difference| in px over those matched pairs
    map50(dets, ground_truth)        -> mAP at IoU 0.5 (all-point interpolated AP, mean over the classes
                                        that have ground truth)

As a script (main venv: it has onnxruntime and openvino):

    .venv/bin/python bench/detector_eval.py [--model bench/out/detector/yolov8n.onnx]
                                            [--test-dir bench/out/detector/test]

runs the model in ONNX Runtime and in OpenVINO on every test input (one at a time: H/W vary) and prints
mAP50 against the ground truth for each runtime, and kept / box error of OpenVINO vs ONNX Runtime.
OpenVINO runs twice: with the CPU plugin's default precision (bf16 on CPUs with AVX512_BF16/AMX, as here)
and with INFERENCE_PRECISION_HINT=f32 (--ov-precision to pick one).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parent / "out" / "detector"
MAX_DET = 300
MAX_NMS_CANDIDATES = 30000
MAX_WH = 7680.0  # class offset for class-aware NMS in one pass (larger than any input side)

Detection = tuple  # (np.ndarray[4] x1y1x2y2, float score, int cls)


# --------------------------------------------------------------------------------------------- boxes
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N,4] with every box in b [M,4] (x1y1x2y2) -> [N,M]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; returns kept indices, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = iou_matrix(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, np.int64)


def decode(output: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.7,
           max_det: int = MAX_DET) -> list[list[Detection]]:
    """Raw [B, 4+nc, A] (or [4+nc, A]) output -> per image, a list of (box xyxy, score, class).

    Each anchor votes for its best class; anchors below score_threshold are dropped; NMS is class-aware
    (boxes of different classes never suppress each other); at most max_det detections, best first."""
    out = np.asarray(output, np.float32)
    if out.ndim == 2:
        out = out[None]
    result = []
    for pred in out:  # [4+nc, A]
        cls_scores = pred[4:]
        cls = cls_scores.argmax(0)
        score = cls_scores[cls, np.arange(cls_scores.shape[1])]
        m = score > score_threshold
        if not m.any():
            result.append([])
            continue
        xywh, score, cls = pred[:4, m].T.astype(np.float64), score[m].astype(np.float64), cls[m]
        if score.size > MAX_NMS_CANDIDATES:
            top = np.argsort(-score, kind="stable")[:MAX_NMS_CANDIDATES]
            xywh, score, cls = xywh[top], score[top], cls[top]
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        keep = nms(boxes + (cls[:, None] * MAX_WH), score, iou_threshold)[:max_det]
        result.append([(boxes[i], float(score[i]), int(cls[i])) for i in keep])
    return result


# --------------------------------------------------------------------------------------------- matching
def _arrays(dets: Sequence[Detection]):
    if len(dets) == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    return (np.stack([np.asarray(d[0], np.float64) for d in dets]), np.asarray([d[1] for d in dets], np.float64),
            np.asarray([d[2] for d in dets], np.int64))


def match(reference: Sequence[Detection], dets: Sequence[Detection], iou: float = 0.5,
          score_threshold: float = 0.25) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Greedy one-to-one matching of one image's detections.

    Reference detections with score > score_threshold are taken best first; each takes the not yet
    matched detection (any score) of the same class with the highest IoU, if that IoU is > iou.
    Returns (number of reference detections considered, [(reference box, matched box), ...])."""
    rb, rs, rc = _arrays(reference)
    sel = rs > score_threshold
    rb, rs, rc = rb[sel], rs[sel], rc[sel]
    db, _, dc = _arrays(dets)
    pairs: list = []
    if len(rb) == 0 or len(db) == 0:
        return len(rb), pairs
    ious = iou_matrix(rb, db)
    ious[rc[:, None] != dc[None, :]] = -1.0
    used = np.zeros(len(db), bool)
    for i in np.argsort(-rs, kind="stable"):
        row = np.where(used, -1.0, ious[i])
        j = int(row.argmax())
        if row[j] > iou:
            used[j] = True
            pairs.append((rb[i], db[j]))
    return len(rb), pairs


def kept(reference_dets: Sequence[Sequence[Detection]], dets: Sequence[Sequence[Detection]],
         iou: float = 0.5, score_threshold: float = 0.25) -> float:
    """Fraction (pooled over images) of the reference's detections with score > score_threshold that
    `dets` reproduces: same class, IoU > iou, greedy one-to-one matching. nan if the reference has none."""
    if len(reference_dets) != len(dets):
        raise ValueError(f"{len(reference_dets)} reference images vs {len(dets)}")
    total = matched = 0
    for r, d in zip(reference_dets, dets):
        n, pairs = match(r, d, iou, score_threshold)
        total += n
        matched += len(pairs)
    return matched / total if total else float("nan")


def box_error(reference_dets: Sequence[Sequence[Detection]], dets: Sequence[Sequence[Detection]],
              iou: float = 0.5, score_threshold: float = 0.25) -> float:
    """Mean absolute coordinate difference (px, over x1 y1 x2 y2 of every matched pair, pooled over images);
    pairs as in kept(). nan if nothing matched."""
    if len(reference_dets) != len(dets):
        raise ValueError(f"{len(reference_dets)} reference images vs {len(dets)}")
    diffs = [np.abs(a - b) for r, d in zip(reference_dets, dets) for a, b in match(r, d, iou, score_threshold)[1]]
    return float(np.mean(np.concatenate(diffs))) if diffs else float("nan")


# --------------------------------------------------------------------------------------------- mAP
def _gt_arrays(gt) -> tuple[np.ndarray, np.ndarray]:
    """One image's ground truth: a list of (cls, box) / {"class", "box"} / (cls, x1, y1, x2, y2)."""
    if isinstance(gt, dict) and "boxes" in gt:
        gt = gt["boxes"]
    cls, boxes = [], []
    for g in gt:
        if isinstance(g, dict):
            c, b = g["class"], g["box"]
        elif len(g) == 2:
            c, b = g
        else:
            c, b = g[0], g[1:5]
        cls.append(int(c))
        boxes.append(np.asarray(b, np.float64))
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    return np.stack(boxes), np.asarray(cls, np.int64)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP: area under the monotone (non-increasing) precision envelope."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.flip(np.maximum.accumulate(np.flip(p)))
    i = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[i + 1] - r[i]) * p[i + 1]))


def per_class_ap50(dets: Sequence[Sequence[Detection]], ground_truth: Iterable, iou: float = 0.5) -> dict[int, float]:
    """AP at IoU `iou` per class with ground truth (detections matched to ground truth best-score first,
    each ground-truth box at most once, standard VOC/COCO protocol)."""
    gts = [_gt_arrays(g) for g in ground_truth]
    if len(gts) != len(dets):
        raise ValueError(f"{len(dets)} detection images vs {len(gts)} ground-truth images")
    records: dict[int, list] = {}  # cls -> [(score, is_tp)]
    n_gt: dict[int, int] = {}
    for (gb, gc), d in zip(gts, dets):
        for c in gc:
            n_gt[int(c)] = n_gt.get(int(c), 0) + 1
        db, ds, dc = _arrays(d)
        for c in np.unique(np.concatenate([gc, dc])):
            gsel, dsel = gc == c, dc == c
            if not dsel.any():
                continue
            order = np.argsort(-ds[dsel], kind="stable")
            boxes, scores = db[dsel][order], ds[dsel][order]
            ious = iou_matrix(boxes, gb[gsel]) if gsel.any() else np.zeros((len(boxes), 0))
            taken = np.zeros(ious.shape[1], bool)
            rec = records.setdefault(int(c), [])
            for k in range(len(boxes)):
                tp = False
                if ious.shape[1]:
                    row = np.where(taken, -1.0, ious[k])
                    j = int(row.argmax())
                    if row[j] >= iou:
                        taken[j] = tp = True
                rec.append((scores[k], tp))
    aps = {}
    for c, n in sorted(n_gt.items()):
        rec = records.get(c, [])
        if not rec:
            aps[c] = 0.0
            continue
        rec.sort(key=lambda t: -t[0])
        tp = np.cumsum([t[1] for t in rec], dtype=np.float64)
        fp = np.cumsum([not t[1] for t in rec], dtype=np.float64)
        aps[c] = average_precision(tp / n, tp / np.maximum(tp + fp, 1e-12))
    return aps


def map50(dets: Sequence[Sequence[Detection]], ground_truth: Iterable) -> float:
    """mAP at IoU 0.5 over the classes that have ground truth (decode with a low score_threshold, e.g.
    0.001, for a full precision/recall curve)."""
    aps = per_class_ap50(dets, ground_truth)
    return float(np.mean(list(aps.values()))) if aps else float("nan")


# --------------------------------------------------------------------------------------------- data
def load_test_set(test_dir: Path) -> tuple[list[str], list[np.ndarray], list]:
    """-> (names, inputs [1,3,H,W] float32, ground truth per input) from detector_prepare.py's test/."""
    meta = json.loads((Path(test_dir) / "boxes.json").read_text())
    names = sorted(meta["images"])
    inputs = [np.load(Path(test_dir) / f"{n}.npy") for n in names]
    return names, inputs, [meta["images"][n]["boxes"] for n in names]


def main() -> None:
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR / "yolov8n.onnx")
    ap.add_argument("--test-dir", type=Path, default=DEFAULT_DIR / "test")
    ap.add_argument("--ov-precision", choices=["default", "f32", "both"], default="both",
                    help="OpenVINO CPU inference precision: the plugin's default (bf16 where the CPU has it), "
                         "f32 pinned, or both (default)")
    args = ap.parse_args()

    import onnxruntime as ort
    import openvino as ov

    names, inputs, gt = load_test_set(args.test_dir)
    shapes = sorted({x.shape[2:] for x in inputs})
    print(f"{len(inputs)} test inputs, {len(shapes)} distinct H x W from {shapes[0]} to {shapes[-1]}; "
          f"{sum(len(g) for g in gt)} ground-truth boxes")

    raw: dict[str, list[np.ndarray]] = {}
    t = time.perf_counter()
    sess = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    raw["ort"] = [sess.run(None, {iname: x})[0] for x in inputs]
    print(f"ORT {ort.__version__}: {time.perf_counter() - t:.1f} s for {len(inputs)} inputs")

    core = ov.Core()
    # On CPUs with bf16 support (e.g. AVX512_BF16) OpenVINO's CPU plugin computes in bf16 by default:
    # "openvino" is that default, "openvino-f32" pins INFERENCE_PRECISION_HINT=f32 (true FP32 execution).
    ov_configs = {"default": ("openvino", {}), "f32": ("openvino-f32", {"INFERENCE_PRECISION_HINT": "f32"})}
    for which in (["default", "f32"] if args.ov_precision == "both" else [args.ov_precision]):
        key, config = ov_configs[which]
        t = time.perf_counter()
        compiled = core.compile_model(str(args.model), "CPU", config)
        try:
            prec = compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception as e:  # pragma: no cover - property name differs between releases
            prec = f"? ({e})"
        out0 = compiled.output(0)
        raw[key] = [compiled([x])[out0] for x in inputs]
        print(f"{key}: OpenVINO {ov.__version__}, CPU inference precision {prec}, "
              f"{time.perf_counter() - t:.1f} s for {len(inputs)} inputs")

    dets = {k: [decode(y)[0] for y in v] for k, v in raw.items()}  # score > 0.25, NMS IoU 0.7
    dets_low = {k: [decode(y, score_threshold=0.001)[0] for y in v] for k, v in raw.items()}
    print(f"\n{'runtime':13s} {'mAP50':>7s} {'mAP50':>7s} {'dets':>5s}   per-class AP50 (score > 0.001)")
    print(f"{'':13s} {'>0.001':>7s} {'>0.25':>7s} {'>0.25':>5s}")
    for k in raw:
        aps = per_class_ap50(dets_low[k], gt)
        m25 = map50(dets[k], gt)
        print(f"{k:13s} {np.mean(list(aps.values())):7.4f} {m25:7.4f} {sum(map(len, dets[k])):5d}   "
              + " ".join(f"{c}:{a:.3f}" for c, a in aps.items()))
    print()
    for k in raw:
        if k == "ort":
            continue
        d = max(float(np.abs(a - b).max()) for a, b in zip(raw["ort"], raw[k]))
        print(f"{k} vs ort (reference): kept {kept(dets['ort'], dets[k]):.4f}, "
              f"box error {box_error(dets['ort'], dets[k]):.4f} px, max |raw output diff| {d:.3g}")


if __name__ == "__main__":
    main()
