"""Fashion-MNIST images paired with captions made from their class names, for CLIP training.

Each training image is paired with a caption of its class, ``"a photo of a sneaker."``,
its template drawn at random for every item and epoch (from a generator seeded by the
run's seed and the epoch), so the text tower sees every phrasing of a class. The
batches follow the paired contract of :mod:`lightning_metric.paired` (shape
``image_text``, what :class:`~lightning_metric.losses.CLIPLoss` takes)::

    {"inputs": [images (B, 1, 28, 28) float in [0, 1], tokens {input_ids, attention_mask, ...}]}

Validation and test are retrieval items ``(x, label, index)``, one modality a batch:

- ``eval_gallery="captions"`` (default): the images are the queries and the gallery is
  every class caption (one per class and template, before the images), labelled by class, so
  :class:`~lightning_metric.callbacks.RetrievalMetrics` reports image->text retrieval
  (``precision_at_1``: the nearest caption names the image's class).
- ``eval_gallery="images"``: the images alone, each retrieving among the others
  (image->image metrics, as ``data=fmnist``).

Zero-shot classification (class captions averaged over the templates as the
classifier) is :class:`~lightning_metric.zero_shot.ZeroShotAccuracy`'s, which reads
:meth:`FashionMNISTCaptionsDataModule.class_prompts`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..losses.registry import IMAGE_TEXT
from ..samplers import NoDuplicatesBatchSampler, RandomBatchSampler, epoch_generator
from .fmnist import FashionMNISTDataModule
from .indexed import IndexedDataset
from .pair_items import ItemCollate, SegmentBatches
from .roles import EvalRoles

TEMPLATES = (
    "a photo of {}.",
    "a picture of {}.",
    "{} on a white background.",
    "a black and white photo of {}.",
    "a low resolution photo of {}.",
    "a product photo of {}.",
    "an image of {}.",
    "a grey picture of {}.",
)
"""Caption templates; ``{}`` takes a class's name with its article (``"an ankle boot"``)."""

CAPTION_NAMES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                 "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
"""Fashion-MNIST's classes as a caption names them, in class id order."""

EVAL_GALLERIES = ("captions", "images")
SAMPLERS = ("auto", "random", "no_duplicates")


class FashionMNISTCaptionsDataModule(FashionMNISTDataModule):
    """Fashion-MNIST ``(image, caption)`` pairs: ``image_text`` batches for CLIP.

    Args:
        data_dir, download: as :class:`~lightning_metric.data.FashionMNISTDataModule`.
        templates: caption templates, each with one ``{}`` for the class name (with its
            article: ``"a sneaker"``, ``"an ankle boot"``).
        caption_names: the name of each class in captions (default :data:`CAPTION_NAMES`).
        eval_gallery: ``captions`` (images retrieve among the class captions) or ``images``
            (images retrieve among images).
        sampler: ``auto`` or ``random`` (random batches: several images of a class share
            a batch, so their captions are false negatives for CLIP's in-batch loss; the
            templates make them different texts, not different classes), or
            ``no_duplicates`` (at most one image of a class a batch: clean in-batch
            negatives, but ``batch_size`` can be at most the 10 classes).
        tokenizer: the text tower's tokenizer (``model=two_tower_small`` gives it);
            ``max_length``: tokens kept per caption.
        **kwargs: the other :class:`~lightning_metric.data.base.LabelledDataModule` options
            (``batch_size``, ``subset``, ``val_fraction``, ``eval_batch_size``, ...).

    Raises:
        ValueError: no tokenizer; a template without exactly one ``{}``; caption names not
            one per class; an unknown ``eval_gallery`` or ``sampler``.
    """

    shapes = (IMAGE_TEXT,)
    """The batch shapes this data gives (``builders.check_batch_shape`` reads it)."""

    def __init__(
        self,
        data_dir: str | Path,
        download: bool = True,
        templates: Sequence[str] = TEMPLATES,
        caption_names: Sequence[str] = CAPTION_NAMES,
        eval_gallery: str = "captions",
        sampler: str = "auto",
        tokenizer: Any = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError(
                "data=fmnist_captions needs the text tower's tokenizer: train with "
                "model=two_tower_small (it gives the data its tokenizer), or pass tokenizer=")
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if eval_gallery not in EVAL_GALLERIES:
            raise ValueError(
                f"data.eval_gallery must be one of {list(EVAL_GALLERIES)}, got {eval_gallery!r}")
        templates, caption_names = list(templates), list(caption_names)
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"data.templates must each hold one '{{}}' (the class name), "
                             f"got {bad or templates}")
        if len(caption_names) != len(self.class_names):
            raise ValueError(f"data.caption_names must name the {len(self.class_names)} classes "
                             f"in class order, got {len(caption_names)}: {caption_names}")
        super().__init__(data_dir, download=download, sampler="random", tokenizer=tokenizer,
                         **kwargs)
        self.templates, self.caption_names = tuple(templates), tuple(caption_names)
        self.eval_gallery, self.pair_sampler = eval_gallery, sampler
        self.val_images = self.test_images = None

    @property
    def shape(self) -> str:
        return IMAGE_TEXT

    def class_prompts(self) -> list[list[str]]:
        """Every caption of each class: ``[class][template]``."""
        return [[template.format(name) for template in self.templates]
                for name in self.caption_names]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        self.val_images, self.test_images = self.val_set, self.test_set
        if self.eval_gallery == "captions":
            self.val_set = CaptionsThenImages(self.val_images, self.class_prompts())
            self.test_set = CaptionsThenImages(self.test_images, self.class_prompts())

    def eval_roles(self, stage: str) -> EvalRoles | None:
        """Images are the queries and captions the gallery (``eval_gallery="captions"``);
        None (self-retrieval among the images) otherwise."""
        if self.eval_gallery != "captions":
            return None
        dataset = self.test_set if stage in ("test", "predict") else self.val_set
        if dataset is None:
            raise RuntimeError("call setup() before eval_roles()")
        return EvalRoles(dataset.is_image, ~dataset.is_image)

    # -- loaders ---------------------------------------------------------------------------
    def _pair_batches(self) -> Sampler[list[int]]:
        replicas, rank = self._replicas_and_rank()
        if self.pair_sampler == "no_duplicates":
            return NoDuplicatesBatchSampler(self.train_labels(), self.batch_size, self.drop_last,
                                            seed=self.seed, num_replicas=replicas, rank=rank)
        return RandomBatchSampler(len(self.train_set), self.batch_size, drop_last=self.drop_last,
                                  seed=self.seed, num_replicas=replicas, rank=rank)

    def train_dataloader(self) -> DataLoader:
        sampler = TemplatedBatches(self._pair_batches(), len(self.train_set),
                                   len(self.templates), self.seed)
        options = {**self._loader_options(),
                   "collate_fn": CaptionCollate(self.tokenizer, self.max_length)}
        return DataLoader(CaptionedImages(self.train_set, self.class_prompts()),
                          batch_sampler=sampler, **options)

    def val_dataloader(self) -> DataLoader:
        return self._retrieval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._retrieval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The test images (what ``recipes.train export=true`` embeds)."""
        return self._eval_loader(self.test_images)

    def _retrieval_loader(self, dataset: Dataset) -> DataLoader:
        if not isinstance(dataset, CaptionsThenImages):
            return self._eval_loader(dataset)
        replicas, rank = self._replicas_and_rank()
        options = {**self._loader_options(),
                   "collate_fn": ItemCollate(self.tokenizer, self.max_length)}
        sampler = SegmentBatches(dataset.segments, self.eval_batch_size, replicas, rank)
        return DataLoader(IndexedDataset(dataset), batch_sampler=sampler, **options)


class TemplatedBatches(Sampler[list[tuple[int, int]]]):
    """The batches of ``batches`` with a template drawn for each item:
    ``[(item, template), ...]``; an item's template changes from epoch to epoch (drawn
    from a generator seeded by ``seed`` and the epoch, the same on every rank).
    ``set_epoch`` reaches the wrapped sampler too."""

    def __init__(self, batches: Sampler[list[int]], num_items: int, num_templates: int,
                 seed: int):
        self.batches, self.num_items = batches, num_items
        self.num_templates, self.seed = num_templates, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # seeded apart from the batch order's generator (seed + 1): not the same draws
        generator = epoch_generator(self.seed + 1, self.epoch)
        templates = torch.randint(self.num_templates, (self.num_items,), generator=generator)
        for batch in self.batches:
            yield [(item, int(templates[item])) for item in batch]


class CaptionedImages(Dataset):
    """``dataset[(i, t)]`` is image ``i`` of ``images`` (``(x, label)`` items) with its
    class's caption number ``t``: ``(x, caption)``."""

    def __init__(self, images: Dataset, prompts: Sequence[Sequence[str]]):
        self.images, self.prompts = images, prompts

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, str]:
        index, template = key
        image, label = self.images[index]
        return image, self.prompts[int(label)][template]


class CaptionCollate:
    """``[(image, caption), ...]`` -> ``{"inputs": [images (B, C, H, W), tokens]}``, the
    captions tokenized (padded to the longest, truncated at ``max_length``)."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: Sequence[tuple[Tensor, str]]) -> dict[str, Any]:
        images, captions = zip(*batch, strict=True)
        tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"inputs": [torch.stack(images), dict(tokens)]}


class CaptionsThenImages(Dataset):
    """Retrieval items: every caption of ``prompts`` (``[class][template]``) labelled by its
    class, then the ``(image, label)`` items of ``images``. ``segments`` holds each
    modality's ``[start, end)``, so a batch never mixes texts and images; the captions come
    first, so ``trainer.limit_val_batches`` / ``limit_test_batches`` cut images, never the
    gallery."""

    def __init__(self, images: Dataset, prompts: Sequence[Sequence[str]]):
        self.images = images
        self.captions = [(caption, label) for label, captions in enumerate(prompts)
                         for caption in captions]
        self.num_captions = len(self.captions)
        self.segments = [(0, self.num_captions), (self.num_captions, len(self))]

    @property
    def is_image(self) -> Tensor:
        """``(N,)`` bool: the item is an image (a query), not a caption (the gallery)."""
        flags = torch.ones(len(self), dtype=torch.bool)
        flags[: self.num_captions] = False
        return flags

    def __len__(self) -> int:
        return self.num_captions + len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < self.num_captions:
            return self.captions[index]
        image, label = self.images[index - self.num_captions]
        return image, int(label)
