"""Lightning callbacks of the recipes."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from .data.roles import EvalRoles
from .eval_outputs import EvalOutputsCallback
from .evaluation import RECALL_KS, RetrievalResults
from .paired import batch_size
from .plot_worker import PlotWorker, draw_embeddings, shared_worker
from .ranking_metrics import ranking_metrics


class ThroughputMonitor(pl.Callback):
    """Logs ``train/samples_per_second``: training items of an epoch over its wall time.

    The time runs from the epoch's first batch to the end of its last one, so
    validation and checkpointing are not counted.
    """

    def __init__(self):
        self._start: float | None = None
        self._samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._samples = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch_size(batch)
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None and self._samples:
            rate = self._samples / max(self._end - self._start, 1e-9)
            pl_module.log("train/samples_per_second", rate, on_epoch=True)


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with a ``last.ckpt`` that is always the last epoch.

    Two differences from the parent, whose arguments it takes unchanged:

    - ``save_last=True`` writes ``last.ckpt`` at the end of every training epoch. The
      parent writes it only when a top-k checkpoint is written in that epoch, so once the
      monitored metric stops improving its ``last.ckpt`` falls behind (resuming or
      exporting from it then silently uses old weights).
    - A tie on the monitored value keeps the later checkpoint (the parent keeps the
      earlier): on easy data a metric that saturates early would otherwise select the
      first epoch that reached it, not the model trained on.
    """

    def check_monitor_top_k(self, trainer: pl.Trainer, current: Tensor | None = None) -> bool:
        if current is None or self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return super().check_monitor_top_k(trainer, current)
        at_least_as_good = {"min": torch.le, "max": torch.ge}[self.mode]
        kth_value = self.best_k_models[self.kth_best_model_path]
        decision = bool(at_least_as_good(current, kth_value))
        return trainer.strategy.reduce_boolean_decision(decision)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # The parent's own skip rule (fast_dev_run, not fitting, sanity check, or a
        # checkpoint, and with it last.ckpt, already written at this step).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class _PictureCallback(pl.Callback):
    """Pictures drawn by a background process (or here), waited for and logged at teardown.

    Subclasses call :meth:`_picture`; ``written`` lists every file written so far.
    """

    needs_umap = False   # the worker compiles UMAP when this callback starts it

    def __init__(self, background: bool, worker: PlotWorker | None):
        self.background, self._worker = background, worker
        self.written: list[Path] = []
        self._pending: list[tuple[int, str, int]] = []   # (job id, logger key, step)

    @property
    def worker(self) -> PlotWorker:
        if self._worker is None:
            self._worker = shared_worker()
        return self._worker

    def _picture(self, trainer: pl.Trainer, key: str, function, *args, **kwargs) -> None:
        """``function(*args, **kwargs)`` writes a picture (in the worker when ``background``);
        it is logged under ``key`` at the current step, unless it is Markdown."""
        if self.background:
            self.worker.start(warm_up=self.needs_umap)   # no-op when already running
            job_id = self.worker.submit_call(function, *args, **kwargs)
            self._pending.append((job_id, key, trainer.global_step))
            return
        path = Path(function(*args, **kwargs))
        self.written.append(path)
        _log_image(trainer, key, path, trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Wait for this callback's pictures still being drawn, then log them."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        paths = self.worker.wait([job_id for job_id, _, _ in pending])
        for path, (_, key, step) in zip(paths, pending, strict=True):
            self.written.append(path)
            _log_image(trainer, key, path, step)


class EmbeddingPlot(_PictureCallback):
    """Saves a UMAP picture of the validation and/or test embeddings as a PNG in the run folder.

    The picture is also logged to W&B and TensorBoard when those loggers are active.
    Needs the module's ``validation_step`` / ``test_step`` to return
    ``{"embeddings", "labels"}`` (``MetricLearningModule`` does, with ``"indices"``).
    Under DDP the embeddings of every process are gathered (in dataset order when the
    step returns ``"indices"``) and the picture is drawn and written once, by rank 0.
    The legend names the data module's ``class_names``; when its ``eval_roles(stage)``
    has a separate gallery, queries are circles and gallery items crosses, and when it
    has categories, the points are coloured by category instead of class.

    By default the pictures are drawn off the training path, by a background process
    (:mod:`lightning_metric.plot_worker`) that starts compiling UMAP when the trainer sets
    up: training goes on while a picture is drawn, and the callback waits for its
    pictures only at the end of the fit or test (``teardown``), where they are logged.

    Args:
        every_n_epochs: plot validation embeddings every n epochs (0: never).
        on_test: plot the test embeddings.
        max_points: a fixed random subset of at most this many points.
        dirpath: where the PNGs go (default ``<trainer.default_root_dir>/plots``).
        seed: of the subset and of UMAP.
        background: draw in the background process (False: here, before training goes on).
        worker: the background process to use (default: the process's shared one).
    """

    def __init__(
        self, every_n_epochs: int = 0, on_test: bool = True, max_points: int = 5000,
        dirpath: str | None = None, seed: int = 0, background: bool = True,
        worker: PlotWorker | None = None,
    ):
        from .metrics import EmbeddingCollector

        if every_n_epochs < 0 or max_points < 4:
            raise ValueError(
                f"every_n_epochs must be >= 0 and max_points >= 4, got {every_n_epochs} and "
                f"{max_points}"
            )
        super().__init__(background, worker)
        self.every_n_epochs, self.on_test = every_n_epochs, on_test
        self.max_points, self.dirpath, self.seed = max_points, dirpath, seed
        self.collector = EmbeddingCollector()
        self.needs_umap = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.collector = self.collector.to(pl_module.device)
        if self.background and trainer.is_global_zero and (self.every_n_epochs or self.on_test):
            self.worker.start()   # UMAP compiles in the background while training runs

    def _collect(self, outputs) -> None:
        if isinstance(outputs, dict) and "embeddings" in outputs:
            self.collector.update(outputs["embeddings"], outputs["labels"],
                                  outputs.get("indices"))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if self._plots_validation(trainer):
            self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0) -> None:
        if self.on_test:
            self._collect(outputs)

    def _plots_validation(self, trainer: pl.Trainer) -> bool:
        return (self.every_n_epochs > 0 and not trainer.sanity_checking
                and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._plots_validation(trainer):
            self._plot(trainer, "val", f"val_epoch_{trainer.current_epoch:03d}")
        self.collector.reset()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.on_test:
            self._plot(trainer, "test", "test")
        self.collector.reset()

    def _plot(self, trainer: pl.Trainer, stage: str, name: str) -> None:
        if not self.collector.update_called:
            return
        embeddings, labels = self.collector.compute()   # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        class_names = getattr(datamodule, "class_names", None) or None
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "plots")
        options = {"class_names": class_names, "max_points": self.max_points, "seed": self.seed,
                   "title": f"{name} embeddings (UMAP)",
                   **_role_options(trainer, stage, len(labels))}
        self._picture(trainer, f"embeddings/{name}", draw_embeddings,
                      embeddings.cpu().numpy(), labels.cpu().numpy(),
                      str(folder / f"{name}.png"), **options)


def _role_options(trainer: pl.Trainer, stage: str, count: int) -> dict:
    """``is_query`` (a separate gallery) and ``categories`` for the plot, from the data's
    roles of ``stage``; none when it has none or they do not cover the ``count`` items."""
    roles = _eval_roles(trainer, stage)
    if roles is None or len(roles.is_query) != count:
        return {}
    options = {}
    if roles.separate_gallery:
        options["is_query"] = roles.is_query.cpu().numpy()
    if roles.categories is not None:
        options["categories"] = roles.categories.cpu().numpy()
        options["category_names"] = tuple(roles.category_names)
    return options


class RetrievalPictures(_PictureCallback):
    """The queries the embedding gets most wrong, with their results, at each evaluation.

    After each validation (every ``every_n_epochs``) and test, draws the ``num_queries``
    queries with the lowest average precision at R, each with its first ``top_k``
    results framed green (same label) or red (another label), then up to ``max_missed``
    gallery items of its label that those missed (blue), into
    ``<dirpath>/<stage>.png`` (``val_epoch_003.png``, ``test.png``), logged to W&B /
    TensorBoard when active. Items are read from the data module's ``val_set`` /
    ``test_set``; image tensors are drawn min-max scaled, and text items give a Markdown
    table (``.md``) instead. The pictures read the search of the
    :class:`RetrievalMetrics` callback of the same trainer (its ``last_results``: search
    once, read many), which must be there. A picture takes about 50 ms (PIL), so it is
    drawn here by default; ``background=True`` sends it to the process of
    :class:`EmbeddingPlot`. Rank 0 draws, under DDP too.

    Args:
        num_queries: worst queries drawn (rows).
        top_k: results shown per query (at most ``RetrievalMetrics(top_k=...)``).
        max_missed: missed items of the query's label shown per query.
        every_n_epochs: draw the validation results every n epochs (0: never).
        on_test: draw the test results.
        dirpath: where the pictures go (default ``<trainer.default_root_dir>/pictures``).
        background, worker: as :class:`EmbeddingPlot`'s.

    Raises:
        ValueError: a count below its minimum, naming it.
    """

    def __init__(self, num_queries: int = 8, top_k: int = 5, max_missed: int = 3,
                 every_n_epochs: int = 1, on_test: bool = True, dirpath: str | None = None,
                 background: bool = False, worker: PlotWorker | None = None):
        for name, value, least in (("num_queries", num_queries, 1), ("top_k", top_k, 1),
                                   ("max_missed", max_missed, 0),
                                   ("every_n_epochs", every_n_epochs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"RetrievalPictures: {name} must be an int >= {least}, "
                                 f"got {value!r}")
        super().__init__(background, worker)
        self.num_queries, self.top_k, self.max_missed = num_queries, top_k, max_missed
        self.every_n_epochs, self.on_test, self.dirpath = every_n_epochs, on_test, dirpath
        self.drawn: dict[str, list] = {}   # picture name -> the QueryRows drawn
        self._seen: dict[str, RetrievalResults] = {}   # the search each stage drew last

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not any(isinstance(c, RetrievalMetrics) for c in trainer.callbacks):
            raise ValueError("RetrievalPictures reads the search of a RetrievalMetrics "
                             "callback: add one to the trainer's callbacks")
        # the worker starts with the first picture: a run that draws none leaves it off

    # after every callback's epoch end: RetrievalMetrics has searched, whatever the order
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.every_n_epochs and not trainer.sanity_checking
                and (trainer.current_epoch + 1) % self.every_n_epochs == 0):
            self._draw(trainer, "val", f"val_epoch_{trainer.current_epoch:03d}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self._draw(trainer, "test", "test")

    def _draw(self, trainer: pl.Trainer, stage: str, name: str) -> None:
        from .pictures import draw_worst_queries, query_rows, write_worst_queries_markdown

        metrics = next(c for c in trainer.callbacks if isinstance(c, RetrievalMetrics))
        results = metrics.last_results.get(stage)
        dataset = getattr(getattr(trainer, "datamodule", None), f"{stage}_set", None)
        fresh = results is not None and results is not self._seen.get(stage)
        if not trainer.is_global_zero or not fresh or dataset is None:
            return
        self._seen[stage] = results
        kept = results.neighbours.shape[1]
        rows = query_rows(results, self.num_queries, min(self.top_k, kept), self.max_missed)
        if not rows:
            return
        self.drawn[name] = rows
        class_names = tuple(getattr(trainer.datamodule, "class_names", ()) or ())
        items = {i: dataset[i][0] for row in rows
                 for i in (row.query, *row.retrieved, *row.missed[: self.max_missed])}
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "pictures")
        options = {"class_names": class_names, "max_missed": self.max_missed}
        if all(isinstance(item, str) for item in items.values()):
            self._picture(trainer, f"worst_queries/{name}", write_worst_queries_markdown,
                          rows, items, str(folder / f"{name}.md"), **options)
            return
        images = {i: item if isinstance(item, str) else _display_array(item)
                  for i, item in items.items()}   # captions among images stay texts
        self._picture(trainer, f"worst_queries/{name}", draw_worst_queries, rows,
                      images.__getitem__, str(folder / f"{name}.png"),
                      title=f"{name}: worst queries (green right, red wrong, blue missed)",
                      **options)


def _display_array(item) -> numpy.ndarray:
    """An image item as a uint8 ``(C, H, W)`` array, min-max scaled: small to send."""
    image = torch.as_tensor(item).detach().float().cpu()
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return (scaled * 255).round().to(torch.uint8).numpy()


def _log_image(trainer: pl.Trainer, key: str, path: Path, step: int) -> None:
    """Send the PNG to the W&B and TensorBoard loggers among the trainer's loggers (a
    Markdown table stays a file)."""
    if path.suffix != ".png":
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            import matplotlib.image

            image = matplotlib.image.imread(path)
            logger.experiment.add_image(key, image[..., :3], step, dataformats="HWC")


class RetrievalMetrics(EvalOutputsCallback):
    """Logs retrieval metrics of the validation and test embeddings: ``val/<key>``, ``test/<key>``.

    At the end of each validation (test) epoch one nearest-neighbour search
    (:func:`~lightning_metric.evaluation.retrieval_results`) gives ``precision_at_1``,
    ``r_precision``, ``mean_average_precision_at_r``, ``recall_at_K``, ``NMI``, ... logged
    through Lightning, so ``ModelCheckpoint``, ``EarlyStopping`` and sweeps can monitor
    them. Under DDP the embeddings of all ranks are gathered first, the copies that
    padding the shards repeated are dropped and the dataset order is restored
    (:class:`~lightning_metric.metrics.RetrievalMetric` does it, from the ``"indices"``
    the step returns), so the metrics are those of a single process, on every rank.
    Needs the module's ``validation_step`` / ``test_step`` to return
    ``{"embeddings", "labels"}`` and, for exact DDP metrics and query/gallery roles,
    ``"indices"`` (dataset indices of the items; ``MetricLearningModule`` returns them when
    batches carry them).

    **Queries and gallery.** When the datamodule has ``eval_roles(stage)`` returning an
    :class:`~lightning_metric.data.roles.EvalRoles`, its queries retrieve from its gallery
    (an item that is both is never retrieved for itself, by identity: its duplicates
    still count); otherwise (None, no such method, no datamodule) the whole set retrieves
    from itself, each item excluded from its own neighbours. Queries without any gallery
    item of their label ("lone") are left out of the metrics; a warning says how many,
    once a stage.

    **Per category.** With ``per_category=True`` and roles carrying ``categories``, also
    ``<stage>/<category name>/<metric>``: the metrics over the queries of that category,
    each still retrieving from the whole gallery (as open-metric-learning does: a category
    is a slice of the queries, not a smaller search). ``k="max_bin_count"`` is resolved
    once over all queries, so MAP and MRR of a category read as deep as the overall ones.

    **Search once, read many.** After each epoch, ``last_results[stage]`` holds the search's
    :class:`~lightning_metric.evaluation.RetrievalResults` (on every rank, the same):
    per-query metrics (``average_precision_at_r``, R), each query's ``top_k`` nearest
    gallery items (``neighbours``, ``distances``, ``is_relevant``) and the items' dataset
    indices (``query_ids``, ``reference_ids``; ``neighbour_ids()`` gives the neighbours'),
    for callbacks that draw the worst queries (``worst_queries(n)``) or re-rank without
    searching again.

    Args:
        distance, k, index, include: passed to ``retrieval_metrics``.
        recall_at_k: the Ks of the logged ``recall_at_K`` (default 1, 2, 4, 8); the search
            goes as deep as the largest.
        per_category: also log the metrics of each query category (default off).
        top_k: neighbours of each query kept in ``last_results`` (0: none).
        ranking_at_k: also log ``mrr_at_K`` and ``ndcg_at_K`` at this cut-off, the
            query-document metrics (:func:`~lightning_metric.ranking_metrics.ranking_metrics`,
            scored by torchmetrics, about 1 ms a query); None (default): not computed.

    Raises:
        ValueError: naming the setting, for a bad ``recall_at_k``, ``include``,
            ``per_category``, ``top_k`` or ``ranking_at_k``.
    """

    def __init__(self, distance: str = "cosine", k: int | str | None = "max_bin_count",
                 index: str = "exact", include: list[str] | None = None,
                 recall_at_k: Iterable[int] = RECALL_KS, per_category: bool = False,
                 top_k: int = 10, ranking_at_k: int | None = None):
        from .metrics import RetrievalMetric

        if not isinstance(per_category, bool):
            raise ValueError(f"per_category must be true or false, got {per_category!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        if ranking_at_k is not None and not 1 <= ranking_at_k <= top_k:
            raise ValueError(f"ranking_at_k={ranking_at_k} must be between 1 and top_k={top_k} "
                             "(the neighbours kept a query): raise top_k or lower ranking_at_k")
        self.ranking_at_k = ranking_at_k
        self.metric = RetrievalMetric(distance=distance, k=k, index=index, include=include,
                                      recall_at_k=recall_at_k, top_k=top_k)
        self.per_category = per_category
        self.last_results: dict[str, RetrievalResults] = {}
        self._warned: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.metric = self.metric.to(pl_module.device)

    def collect(self, trainer, pl_module, outputs, batch, stage: str) -> None:
        if isinstance(outputs, dict) and "embeddings" in outputs:
            self.metric.update(outputs["embeddings"], outputs["labels"], outputs.get("indices"))

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.metric.update_called:
            return
        roles = _eval_roles(trainer, stage)
        results, values = self.metric.evaluate(roles, per_category=self.per_category)
        self.metric.reset()
        if results is not None:
            self.last_results[stage] = results
            if not trainer.sanity_checking:  # a few batches: their lone queries say little
                self._warn(stage, results, roles)
            if self.ranking_at_k is not None:
                values.update(ranking_metrics(results, self.ranking_at_k))
        pl_module.log_dict(
            {f"{stage}/{key}": torch.tensor(value, dtype=torch.float32, device=pl_module.device)
             for key, value in values.items()},
            prog_bar=False,
        )

    def _warn(self, stage: str, results: RetrievalResults, roles: EvalRoles | None) -> None:
        """Say once a stage how many queries were lone, and that categories are missing."""
        if stage in self._warned:
            return
        lone = int(results.lone.sum())
        if lone:
            self._warned.add(stage)
            rank_zero_warn(
                f"RetrievalMetrics: {lone} of {len(results.lone)} {stage} queries have no "
                "gallery item of their label and are left out of the metrics"
            )
        if self.per_category and (roles is None or roles.categories is None):
            self._warned.add(stage)
            rank_zero_warn(
                f"RetrievalMetrics(per_category=True): the {stage} set has no categories "
                "(datamodule.eval_roles gives none), only the overall metrics are logged"
            )


def _eval_roles(trainer: pl.Trainer, stage: str) -> EvalRoles | None:
    """``trainer.datamodule.eval_roles(stage)``, or None (self-retrieval) without it."""
    datamodule = getattr(trainer, "datamodule", None)
    eval_roles = getattr(datamodule, "eval_roles", None)
    return None if eval_roles is None else eval_roles(stage)


class SimilarityCorrelation(EvalOutputsCallback):
    """Logs ``<stage>/spearman`` and ``<stage>/pearson``: how the model's similarity of each
    evaluation pair follows its gold score.

    For data with a target (STS-B's 0-5 similarity, pairs labelled 1/-1, MarginMSE's
    teacher margins) the module's ``validation_step`` / ``test_step`` return
    ``{"similarity": (B,), "target": (B,)}``: the cosine similarity of each pair's two
    embeddings (for triplets, ``cos(query, pos) - cos(query, neg)``). The correlations over
    the whole split, in [-1, 1], are those sentence-transformers'
    ``EmbeddingSimilarityEvaluator`` reports (Spearman's rank correlation is the STS
    benchmark's standard metric: Cer et al., SemEval-2017 Task 1). Computed by
    torchmetrics, which gathers every rank's pairs under DDP. Batches without
    ``"similarity"`` (retrieval items) are left to
    :class:`RetrievalMetrics`.
    """

    def __init__(self):
        from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

        with warnings.catch_warnings():  # that it keeps every pair: evaluation sets are small
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
            self.metrics = {"spearman": SpearmanCorrCoef(), "pearson": PearsonCorrCoef()}
        self._updated = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.metrics = {name: metric.to(pl_module.device) for name, metric in self.metrics.items()}

    def collect(self, trainer, pl_module, outputs, batch, stage: str) -> None:
        if isinstance(outputs, dict) and "similarity" in outputs:
            for metric in self.metrics.values():
                metric.update(outputs["similarity"].float(), outputs["target"].float())
            self._updated = True

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._updated:
            return
        for name, metric in self.metrics.items():
            pl_module.log(f"{stage}/{name}", metric.compute())
            metric.reset()
        self._updated = False
