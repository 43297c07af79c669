"""UMAP pictures drawn in a background process, off the training path.

UMAP compiles its numba kernels the first time a process projects anything:
about 10-40 s on a laptop CPU, paid again by every new process (its kernels are
not cached on disk). :class:`PlotWorker` moves that cost off the training path:
a ``spawn``-ed process starts compiling (a warm-up projection) as soon as it is
started, then draws every picture it is sent while training goes on; the
caller waits only when it needs the files (at the end of a fit or a test). One
worker is shared by every :class:`~lightning_metric.callbacks.EmbeddingPlot` of a
process (:func:`shared_worker`), so the jobs of a sweep that run in one process
(Hydra's basic launcher) pay the compilation once.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import queue
from collections.abc import Callable
from pathlib import Path

import numpy as np

# How long a wait for one picture may take before the worker is declared stuck.
PLOT_TIMEOUT_S = 600.0


class PlotWorker:
    """A background process that draws pictures: UMAP plots and any other picture function.

    ``start()`` launches it (and its warm-up); ``submit(...)`` queues a UMAP picture
    (:func:`~lightning_metric.plots.plot_embeddings`) and ``submit_call(function, ...)``
    any picture function that returns the path it wrote; both return a job id at once.
    ``wait(ids)`` blocks until those pictures are written and returns their paths. A
    picture that fails raises its error (a ``RuntimeError`` naming the file) in ``wait``;
    a worker that died is restarted by the next submit.
    """

    def __init__(self, warm_up: bool = True) -> None:
        self.warm_up = warm_up   # compile UMAP as soon as the process starts
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._tasks = self._results = None
        self._ids = itertools.count()
        self._done: dict[int, tuple[str, str | None]] = {}

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self, warm_up: bool | None = None) -> None:
        """Launch the process (no-op when running); it compiles UMAP straight away unless
        ``warm_up`` (default: the worker's own setting) is False: a worker started for
        other pictures compiles UMAP only if it is sent a UMAP picture."""
        if self.alive:
            return
        warm_up = self.warm_up if warm_up is None else warm_up
        self._tasks, self._results = self._context.Queue(), self._context.Queue()
        self._process = self._context.Process(
            target=_serve, args=(self._tasks, self._results, warm_up),
            name="lightning-metric-plots", daemon=True)
        self._process.start()

    def submit(self, embeddings: np.ndarray, labels: np.ndarray, path: str | Path,
               **options) -> int:
        """Queue a picture of ``embeddings`` ``(N, D)`` coloured by ``labels`` ``(N,)``;
        ``options`` are :func:`~lightning_metric.plots.plot_embeddings`'s."""
        return self.submit_call(draw_embeddings, np.asarray(embeddings, dtype=np.float32),
                                np.asarray(labels), str(path), **options)

    def submit_call(self, function: Callable[..., str | Path], *args, **kwargs) -> int:
        """Queue ``function(*args, **kwargs)``, a module-level function (the worker imports
        it by name) that writes a picture and returns its path; arguments are pickled, so
        send arrays, not tensors on a device. The path is the first argument that names a
        file, or ``kwargs["path"]``, for the error message if it fails."""
        self.start()
        job_id = next(self._ids)
        path = kwargs.get("path", next((a for a in args if isinstance(a, str | Path)), "?"))
        self._tasks.put((job_id, function, args, kwargs, str(path)))
        return job_id

    def wait(self, ids: list[int], timeout: float = PLOT_TIMEOUT_S) -> list[Path]:
        """The written paths of pictures ``ids``, once all are written.

        Raises:
            RuntimeError: a picture failed, or the worker died or stalled past ``timeout``
                seconds without finishing one.
        """
        while any(job_id not in self._done for job_id in ids):
            try:
                job_id, path, error = self._results.get(timeout=timeout)
            except queue.Empty:
                state = "died" if not self.alive else f"finished nothing in {timeout:.0f} s"
                raise RuntimeError(f"the plot worker {state}; pictures {ids} are missing") from None
            self._done[job_id] = (path, error)
        paths = []
        for job_id in ids:
            path, error = self._done.pop(job_id)
            if error is not None:
                raise RuntimeError(f"drawing {path} failed in the plot worker: {error}")
            paths.append(Path(path))
        return paths

    def close(self) -> None:
        """Let the process finish what it was sent, then stop it."""
        if self.alive:
            self._tasks.put(None)
            self._process.join(timeout=PLOT_TIMEOUT_S)
        self._process = None


_shared: PlotWorker | None = None


def shared_worker() -> PlotWorker:
    """The process's plot worker (created on first use, closed at exit)."""
    global _shared
    if _shared is None:
        _shared = PlotWorker()
        atexit.register(_shared.close)
    return _shared


def _serve(tasks, results, warm_up: bool) -> None:
    """The worker's loop: warm UMAP up, then draw each picture sent until ``None``."""
    import torch

    from .plots import umap_2d

    torch.set_num_threads(1)   # leave the cores to training
    if warm_up:
        try:
            umap_2d(np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32), seed=0)
        except Exception:  # noqa: BLE001 - a failed warm-up shows again on a real picture
            pass
    for task in iter(tasks.get, None):
        job_id, function, args, kwargs, path = task
        try:
            results.put((job_id, str(function(*args, **kwargs)), None))
        except Exception as error:  # noqa: BLE001 - reported to the caller by wait()
            results.put((job_id, path, f"{type(error).__name__}: {error}"))


def draw_embeddings(embeddings: np.ndarray, labels: np.ndarray, path: str,
                    **options) -> Path:
    """:func:`~lightning_metric.plots.plot_embeddings` on arrays (what the worker is sent)."""
    import torch

    from .plots import plot_embeddings

    return plot_embeddings(torch.from_numpy(embeddings), torch.from_numpy(labels), path,
                           **options)
