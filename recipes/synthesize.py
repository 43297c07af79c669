"""Hard negatives for MarginMSE: ``python -m recipes.synthesize pairs.path=pairs.tsv``.

Reads the (query, positive) rows of ``pairs.path`` (CSV, TSV, JSON Lines or Parquet;
columns ``pairs.query`` and ``pairs.positive``) and a corpus (``corpus.path`` /
``corpus.column``; default: the positives), embeds them with the teacher (``model=``, any
text model; default ``hf_text``, all-MiniLM-L6-v2), mines ``num_negatives`` hard negatives
a query with a FAISS index (:mod:`lightning_metric.synthesis`) and writes ``query, pos,
neg, margin`` rows to ``output`` (default ``<run folder>/triplets.tsv``). Prints a summary
(queries, rows written, what was skipped and why) and the command that trains on the file.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_metric import builders
from lightning_metric.synthesis import (
    Triplets,
    read_corpus,
    read_pairs,
    synthesize,
    write_triplets,
)

builders.register_resolvers()


def run(cfg: DictConfig) -> Triplets:
    """Synthesise the triplets of ``cfg`` and write them to ``cfg.output``.

    Raises:
        FileNotFoundError: a missing file. ValueError: a bad file (missing column, no rows,
        empty texts, by line), a bad setting (named), a teacher that is not a text model.
    """
    pairs = read_pairs(cfg.pairs.path, cfg.pairs.query, cfg.pairs.positive)
    corpus = None if cfg.corpus.path is None else read_corpus(cfg.corpus.path,
                                                              cfg.corpus.column)
    output = Path(cfg.output or Path(HydraConfig.get().runtime.output_dir) / "triplets.tsv")
    device = builders.resolve_device(str(cfg.device))
    teacher = builders.build_encoder(cfg)
    triplets = synthesize(teacher, pairs, corpus, num_negatives=cfg.num_negatives,
                          top_k=cfg.top_k, sampling=cfg.sampling, seed=cfg.seed,
                          batch_size=cfg.batch_size, device=device,
                          max_length=cfg.model.get("max_length"), progress=cfg.progress)
    write_triplets(triplets, output)
    print(f"{triplets.summary} -> {output}")
    print(f"train on it: python -m recipes.train data=pairs data.path={output} model=hf_text "
          "'data.fields={query: query, pos: pos, neg: neg}' data.target=margin "
          "data.group=query loss=margin_mse optimized_metric=val/spearman")
    return triplets


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthesize")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
