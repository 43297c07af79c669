"""Train an embedding model: ``python -m recipes.train [loss=arcface] [data=fmnist] ...``.

Every run writes into its Hydra output folder: the resolved config
(``.hydra/``), checkpoints, the logger's files, a UMAP plot of the test
embeddings (``plots/``), ``metrics.json``, ``checkpoint.json`` (which checkpoint
was tested) and, with ``export=true``, the test embeddings and a FAISS index
(``export/``).
Prints which checkpoint was tested (the best by ``optimized_metric``, default
``val/mean_average_precision_at_r``) and its main test metrics. Returns the
best value of ``optimized_metric`` (its last value when checkpoints are not
chosen by it) for Hydra sweepers.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_metric import builders
from lightning_metric.export import export_embeddings, predict_embeddings

builders.register_resolvers()


def train(cfg: DictConfig) -> float | None:
    datamodule, module, trainer = builders.build_run(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = builders.scalar_metrics(trainer, "val/")
    metrics.update(builders.scalar_metrics(trainer, "train/"))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = trainer.checkpoint_callback
    # no best_model_score: no monitor (callbacks=none: Lightning's own keeps the last epoch)
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is None:
        checkpoint = None
    else:
        metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path="best" if checkpoint else None)
        metrics.update(builders.scalar_metrics(trainer, "test/"))
    if cfg.export:  # every rank embeds its shard; all get the whole set back
        embeddings, labels = predict_embeddings(trainer, module, datamodule)
    if trainer.is_global_zero:  # one process writes, under DDP too
        if cfg.test:
            print(builders.test_summary(metrics, checkpoint, run_dir))
        builders.write_metrics(run_dir / "metrics.json", metrics)
        builders.write_checkpoint_record(run_dir / "checkpoint.json", checkpoint, run_dir)
        if cfg.export:
            export_embeddings(embeddings, labels, run_dir / "export")
    # The best value when checkpoints were chosen by it (the weights that were tested).
    return metrics.get(f"best/{cfg.optimized_metric}", metrics.get(cfg.optimized_metric))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
