"""Where candidate models are scored: in this process, in local worker processes, or on a Ray cluster.

Sensitivity, accuracy control's measured gains and mixed precision's 4-bit drops score candidate files that do not
depend on each other; an evaluator scores a batch of them and returns the scores in the batch's order, so a search
makes the same choices whichever evaluator ran it. The metric travels to the workers once per pool (a `FILE.py:FUNC`
metric as its spec, imported again there); a Ray task receives the model's bytes, so cluster nodes need no shared
disk, only the metric's file and data at the same paths.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Protocol

from onnxcompress.errors import ConfigError, EvaluationError

_log = logging.getLogger(__name__)

Metric = Callable[[str], float]


class Evaluator(Protocol):
    #: How many candidates it scores at once.
    workers: int
    #: How many candidates a search hands it per call (and so writes to disk at a time).
    batch: int

    def scores(self, metric: Metric, paths: Sequence[Path]) -> list[float]: ...

    def close(self) -> None: ...


class SerialEvaluator:
    """Scores in this process, one candidate after another."""

    workers = batch = 1

    def scores(self, metric: Metric, paths: Sequence[Path]) -> list[float]:
        return [metric(str(path)) for path in paths]

    def close(self) -> None:
        pass


_worker_metric: Metric | None = None


def _install(metric: Metric) -> None:
    global _worker_metric  # one metric per worker process, set once by the pool's initializer
    _worker_metric = metric


def _score_in_worker(path: str) -> float:
    assert _worker_metric is not None
    return _worker_metric(path)


class ProcessEvaluator:
    """Scores in `workers` local processes (spawned, so nothing of this process's state leaks into them), started
    by the first batch of at least two candidates per worker; smaller batches before that run in this process."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be 1 or more, got {workers}")
        self.workers = workers
        self.batch = 2 * workers  # two candidates per worker in flight: none waits while another is written
        self._pool: ProcessPoolExecutor | None = None
        self._metric: Metric | None = None
        self._checked: Metric | None = None  # the last metric checked for pickling, and whether it pickles
        self._sendable = False

    def scores(self, metric: Metric, paths: Sequence[Path]) -> list[float]:
        if self._checked is not metric:
            self._checked, self._sendable = metric, _picklable(metric)
        if (len(paths) < self.batch and self._pool is None) or not self._sendable:
            # Starting the workers (each imports the runtimes) costs more than a short batch saves.
            return [metric(str(path)) for path in paths]
        if self._pool is None or self._metric is not metric:
            self.close()
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_install, initargs=(_sharing_cores(metric, self.workers),))
            self._metric = metric
        try:
            return list(self._pool.map(_score_in_worker, [str(path) for path in paths]))
        except BrokenProcessPool:
            self._pool = None
            raise EvaluationError("a worker process scoring candidates died (out of memory, or a __main__ that "
                                  "cannot be imported again); score them in this process with --workers 1") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _picklable(metric: Metric) -> bool:
    """Whether `metric` can be sent to a spawned worker; a local function or lambda cannot, and is then scored in
    this process, with a warning that says so."""
    try:
        pickle.dumps(metric)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        _log.warning("the metric cannot be sent to worker processes (%s): candidates are scored in this process; "
                     "define it at module level, or pass FILE.py:FUNC, to score them in parallel", error)
        return False
    return True


def _sharing_cores(metric: Metric, workers: int, cores: int | None = None) -> Metric:
    """`metric` limited to its share of the cores when it can limit itself (`with_threads`, as the built-in
    metrics do); a user's metric runs as it is."""
    limit = getattr(metric, "with_threads", None)
    share = max(1, (cores or os.cpu_count() or 1) // workers)
    return limit(share) if callable(limit) else metric


def _score_bytes(metric: Metric, files: dict[str, bytes]) -> float:
    """A Ray task: write the candidate's files into a private folder and score its model file."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-ray-") as folder:
        for name, content in files.items():
            Path(folder, name).write_bytes(content)
        return metric(str(Path(folder, "model.onnx")))


class RayEvaluator:
    """Scores as tasks on the Ray cluster at `address` (`ray` is an optional extra: pip install onnxcompress[ray])."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray-address needs Ray: pip install 'onnxcompress[ray]'") from None
        self._ray = ray
        _require_reachable(address)
        if not ray.is_initialized():  # a session the caller started already is used as it is
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError... for a bad address
                raise EvaluationError(f"cannot reach the Ray cluster at {address}: {error}") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.batch = 2 * self.workers
        self._task = ray.remote(num_cpus=1)(_score_bytes)

    def scores(self, metric: Metric, paths: Sequence[Path]) -> list[float]:
        metric_ref = self._ray.put(_sharing_cores(metric, self.workers, cores=self.workers))
        tasks = [self._task.remote(metric_ref, _candidate_files(path)) for path in paths]
        try:
            return [float(score) for score in self._ray.get(tasks)]
        except self._ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(getattr(error, "cause", None), Exception) else error
            if isinstance(cause, EvaluationError):
                raise cause from None
            raise EvaluationError(f"a Ray task failed to score a candidate: {cause}") from None

    def close(self) -> None:
        pass


#: Seconds to wait for the cluster's port to accept a connection (Ray itself retries for minutes).
CONNECT_TIMEOUT_S = 5.0


def _require_reachable(address: str) -> None:
    """Refuse at once an address whose port accepts no connection: `ray.init` would wait for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise EvaluationError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def _candidate_files(path: Path) -> dict[str, bytes]:
    """The model file (as model.onnx) and its external data file, if any, by the names the model refers to."""
    files = {"model.onnx": path.read_bytes()}
    data = path.with_name(path.name + ".data")
    if data.exists():
        files[data.name] = data.read_bytes()
    return files


def make_evaluator(workers: int | None = None, ray_address: str | None = None) -> Evaluator:
    """Ray when an address is given, else `workers` local processes (default: one per core; 1 is serial)."""
    if ray_address is not None:
        return RayEvaluator(ray_address)
    count = workers if workers is not None else (os.cpu_count() or 1)
    return SerialEvaluator() if count == 1 else ProcessEvaluator(count)
