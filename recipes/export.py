"""Export test-set embeddings and a FAISS index: ``python -m recipes.export ckpt_path=PATH``.

Use the groups the checkpoint was trained with (``loss=``, ``data=``, ``model=``).
Writes ``embeddings.npy``, ``labels.npy`` and ``index.faiss`` into
``<run folder>/export`` (or ``export_dir=...``); then
``python -m recipes.search export_dir=... query=0`` prints a query's neighbours.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_metric import builders
from lightning_metric.export import embed, export_embeddings

builders.register_resolvers()


def export(cfg: DictConfig) -> Path:
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} is not a file")
    encoder = builders.build_encoder(cfg)
    loss = builders.build_loss(cfg, encoder)
    datamodule = builders.build_datamodule(cfg, loss, encoder)
    module = builders.build_module(cfg, loss, encoder)
    state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    datamodule.setup("test")
    embeddings, labels = embed(module.encoder, datamodule.test_dataloader())
    folder = cfg.get("export_dir") or Path(HydraConfig.get().runtime.output_dir) / "export"
    export_embeddings(embeddings, labels, folder, metric=cfg.get("metric", "cosine"))
    print(f"exported {len(labels)} embeddings to {folder}")
    return Path(folder)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
