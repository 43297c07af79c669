"""Embed new items: ``python -m recipes.predict ckpt_path=PATH data.path=new.csv [model=...]``.

Every row of the manifest (``path`` or ``text``, an optional ``label``; any ``split``) is
embedded with the checkpoint's encoder, in the manifest's order. Pass the run's groups
(``model=``, ``transform=``, ``model.embedding_size=`` ...: its ``.hydra/overrides.yaml``):
the eval transform or tokenizer come from them. Writes into ``<run folder>/predict`` (or
``predict_dir=...``): ``embeddings.npy``, ``items.csv`` (row ``i`` is embedding ``i``),
``labels.npy`` (the checkpoint's class ids, ``-1``: no label or an unseen one),
``index.faiss`` and ``export.json``; then ``python -m recipes.search PREDICT_DIR --query 0``
prints a row's neighbours.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_metric import builders
from lightning_metric.export import (
    Predictions,
    checkpoint_class_names,
    load_encoder_weights,
    predict_manifest,
    read_checkpoint,
)

builders.register_resolvers()


def predict(cfg: DictConfig) -> Predictions:
    """Embed ``data.path`` with ``ckpt_path``'s encoder and write the predict folder.

    Raises:
        FileNotFoundError: ``ckpt_path`` or ``data.path`` is not a file.
        ValueError: ``data`` is not a manifest, the checkpoint does not fit the model
            settings, a bad manifest, ``device`` or ``metric`` (each naming the setting).
    """
    checkpoint = read_checkpoint(cfg.ckpt_path)
    _check_data(cfg)
    device = builders.resolve_device(str(cfg.device))
    cfg = copy.deepcopy(cfg)
    if cfg.model.get("pretrained") or cfg.model.get("pretrained_path"):
        # the checkpoint's weights replace them: nothing to download or read
        cfg.model.pretrained, cfg.model.pretrained_path = False, None
    encoder = builders.build_encoder(cfg)
    load_encoder_weights(encoder, checkpoint, cfg.ckpt_path)
    if getattr(encoder, "tokenizer", None) is not None:
        cfg.transform = None  # a text model: no image transform (data=manifest sets one)
    inputs = builders.data_inputs(cfg, encoder)
    folder = Path(cfg.predict_dir or Path(HydraConfig.get().runtime.output_dir) / "predict")
    workers = cfg.data.get("num_workers")
    class_names = checkpoint_class_names(checkpoint)
    predictions = predict_manifest(
        encoder.to(device), cfg.data.path, folder, class_names=class_names,
        root=cfg.data.get("root"),
        transform=inputs.get("eval_transform"), tokenizer=inputs.get("tokenizer"),
        max_length=inputs.get("max_length", 128), batch_size=cfg.data.eval_batch_size,
        num_workers=(os.cpu_count() or 1) if workers is None else workers, metric=cfg.metric,
        check_files=cfg.data.get("check_files", True))
    print(predictions.summary(folder))
    if not class_names:
        print(f"ckpt_path={cfg.ckpt_path!r} holds no class list (data held in memory, or a "
              "bare state_dict): every label is -1")
    print(f"neighbours of row 0: python -m recipes.search {folder} --query 0")
    return predictions


def _check_data(cfg: DictConfig) -> None:
    target = str(cfg.data.get("_target_", ""))
    if not target.endswith("ManifestDataModule"):
        raise ValueError(f"recipes.predict embeds the rows of a manifest: use data=manifest "
                         f"data.path=new.csv (data is {target or 'unset'})")


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
