"""Self-supervised two-view NT-Xent on Fashion-MNIST: test retrieval before and after training.

    python -m benchmarks.self_supervised                       # three encoders, one epoch, seed 0
    python -m benchmarks.self_supervised --encoders test_resnet --steps 40 --subset 10240 \\
        --seeds 0 1 2                                          # what the test checks, three seeds

For each encoder and seed it builds the recipe's run from its config (``data=fmnist
data.views=2 loss=ntxent transform=default transform.scale=[0.5,1]``, batches of 128
images as two views each, Adam at 1e-3, NT-Xent at its default temperature 0.07) and:

1. tests the untrained encoder: ``test/precision_at_1`` and
   ``test/mean_average_precision_at_r`` of the 10,000 test images retrieved among
   themselves by class (cosine);
2. trains ``--steps`` steps on instance labels only (each image's two augmentations
   are each other's positives; the class labels are never seen);
3. tests again, the same way.

Encoders: ``small_cnn`` (the recipe's default two-conv CNN, its feature map flattened
into a linear projection) or any timm name (``model=timm model.in_chans=1``, global
pooling, no pretrained weights). The table also gives the raw pixels' metrics, the
baseline any embedding of these images has to beat: an untrained encoder that keeps the
feature map's layout (``small_cnn``) is a random projection of about as much, while a
globally pooled one (a ResNet) starts far below it.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lightning_metric import builders
from lightning_metric.evaluation import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data"))
METRICS = ("precision_at_1", "mean_average_precision_at_r")
QUIET = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "data.num_workers=0", "trainer.max_epochs=-1",
         "+trainer.num_sanity_val_steps=0", "+trainer.check_val_every_n_epoch=100000",
         "~callbacks.model_checkpoint", "~callbacks.embedding_plot",
         "~callbacks.retrieval_pictures", "~callbacks.throughput"]


def simclr_overrides(encoder: str, steps: int, subset: int | None, seed: int) -> list[str]:
    """The recipe's settings for ``steps`` steps of two-view NT-Xent with ``encoder``."""
    model = (["model=small_cnn"] if encoder == "small_cnn"
             else ["model=timm", f"model.name={encoder}", "model.in_chans=1"])
    return [
        "data=fmnist", f"data.data_dir={DATA / 'fashion-mnist'}", "data.download=false",
        "data.views=2", "loss=ntxent", "data.batch_size=256", *model,
        "transform=default", "transform.image_size=28", "transform.mean=[0]",
        "transform.std=[1]", "transform.scale=[0.5,1]", f"+trainer.max_steps={steps}",
        f"seed={seed}", *([f"data.subset={subset}"] if subset else []), *QUIET]


def build(overrides: list[str], run_dir: str):
    """The recipe's ``(datamodule, module, trainer)`` for ``overrides``."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"trainer.default_root_dir={run_dir}"])
    return builders.build_run(cfg)


def before_and_after(datamodule, module, trainer) -> tuple[dict, dict, int, float]:
    """Test metrics of the untrained and the trained encoder, the steps run, the seconds."""
    before = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    after = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return before, after, trainer.global_step, seconds


def pixel_metrics(datamodule) -> dict[str, float]:
    """A tested run's test images' raw pixels as embeddings, scored by the same ruler (the
    in-memory Fashion-MNIST test set: a ``TensorDataset``, the same whatever the encoder)."""
    images, labels = datamodule.test_set.tensors
    return retrieval_metrics(images.flatten(1), labels, include=METRICS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["test_resnet", "resnet10t", "small_cnn"])
    parser.add_argument("--steps", type=int, default=445,
                        help="training steps (default: one epoch of the 57,000 images)")
    parser.add_argument("--subset", type=int, default=None,
                        help="training items (default: all 57,000 after validation)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    builders.register_resolvers()
    run_dir = str(REPO / "outputs" / "benchmarks" / "self_supervised")
    pixels, rows = None, []
    for encoder in args.encoders:
        for seed in args.seeds:
            run = build(simclr_overrides(encoder, args.steps, args.subset, seed), run_dir)
            before, after, steps, seconds = before_and_after(*run)
            rows.append((encoder, seed, steps, before, after, seconds))
            print(f"{encoder} seed {seed}: {steps} steps in {seconds:.0f} s", flush=True)
            if pixels is None:  # the test set every run tests on
                pixels = pixel_metrics(run[0])
                print(f"pixels: P@1 {pixels['precision_at_1']:.4f}, "
                      f"MAP@R {pixels['mean_average_precision_at_r']:.4f}", flush=True)
    print("\n| encoder | seed | steps | P@1 untrained | P@1 trained | MAP@R untrained "
          "| MAP@R trained | training s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| raw pixels | | | {pixels['precision_at_1']:.4f} | | "
          f"{pixels['mean_average_precision_at_r']:.4f} | | |")
    for encoder, seed, steps, before, after, seconds in rows:
        p1, mapr = (f"test/{name}" for name in METRICS)
        print(f"| {encoder} | {seed} | {steps} | {before[p1]:.4f} | {after[p1]:.4f} | "
              f"{before[mapr]:.4f} | {after[mapr]:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
