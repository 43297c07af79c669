"""Evaluate a checkpoint: ``python -m recipes.eval ckpt_path=PATH [data=...] [loss=...]``.

Use the groups the checkpoint was trained with (its run folder's
``.hydra/overrides.yaml``); the test metrics go to ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_metric import builders

builders.register_resolvers()


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} is not a file")
    datamodule, module, trainer = builders.build_run(cfg)
    trainer.test(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = builders.scalar_metrics(trainer, "test/")
    if trainer.is_global_zero:  # under DDP too, one process writes
        builders.write_metrics(Path(HydraConfig.get().runtime.output_dir) / "metrics.json",
                               metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
