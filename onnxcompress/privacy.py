"""Offline by default: the runtimes' usage telemetry is turned off before either runtime is imported.

A compression tool run on confidential models should make no network attempt and leave no usage record. ONNX
Runtime's POSIX telemetry writes a device id and an event database under ~/.cache/Microsoft and uploads events;
OpenVINO's model conversion imports `openvino_telemetry`, which writes ~/intel/* and sends events to Google
Analytics. Setting ONNXCOMPRESS_RUNTIME_TELEMETRY=1 leaves both as their packages ship them.

Matplotlib's font cache goes to the tool's own cache folder (unless MPLCONFIGDIR is set), so that besides the
paths a command is given, onnxcompress writes only under ~/.cache/onnxcompress.
"""

from __future__ import annotations

import os
import sys

OPT_IN = "ONNXCOMPRESS_RUNTIME_TELEMETRY"


def limit_footprint() -> None:
    """Keep matplotlib in our cache and, unless the user opted in, disable both runtimes' telemetry for this
    process and its children."""
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.expanduser("~"), ".cache", "onnxcompress",
                                                       "matplotlib"))
    if os.environ.get(OPT_IN) == "1":
        return
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # OpenVINO falls back to its built-in no-op stub when the telemetry package cannot be imported.
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
