"""The one table of losses: config name -> class, learnable parameters, sampler family.

Training recipes read this table to instantiate a loss from its config name,
to decide whether the module needs a second optimizer, and to resolve
``sampler: auto`` (Finetuner's rule, shared/spec/finetuner-loss-functions.md):
classification-style losses (one item is enough: ArcFace, CosFace, proxies)
take random batches; contrastive losses compare items of a batch with each
other and always take class-balanced batches, whatever was asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from torch import nn

CLASS_SAMPLER = "class"
RANDOM_SAMPLER = "random"
NO_DUPLICATES_SAMPLER = "no_duplicates"
SAMPLER_CHOICES = ("auto", CLASS_SAMPLER, RANDOM_SAMPLER, NO_DUPLICATES_SAMPLER)
PAIR_SAMPLER_CHOICES = ("auto", RANDOM_SAMPLER, NO_DUPLICATES_SAMPLER)
LABELLED = "labelled"
TWO_VIEWS = "two_views"
EMBEDDINGS_ONLY = "embeddings"
# Batches of paired fields, one (B, D) embedding per field (see PAIR_LOSSES):
PAIR = "pair"  # loss(query, doc, *hard_negatives)
PAIR_SCORE = "pair_score"  # loss(a, b, scores), scores (B,) in [0, 1]
PAIR_TARGET = "pair_target"  # loss(a, b, target), target (B,) in {1, -1}
TRIPLET = "triplet"  # loss(query, pos, neg)
TRIPLET_MARGIN = "triplet_margin"  # loss(query, pos, neg, teacher_margin), margin (B,)
IMAGE_TEXT = "image_text"  # loss(image, text)


@dataclass(frozen=True)
class LossEntry:
    """What the recipes need to know about one loss."""

    name: str
    """Config name, e.g. ``arcface`` (``conf/loss/arcface.yaml``)."""
    class_path: str
    """``module:Class`` inside ``lightning_metric.losses``."""
    learnable: bool
    """True when the loss has parameters of its own that a loss optimizer must step."""
    contrastive: bool
    """True when the loss compares items of a batch with each other (needs class batches)."""
    inputs: str = LABELLED
    """How it is called: ``labelled`` ``loss(embeddings, labels)``, ``two_views``
    ``loss(embeddings, ref_emb)`` (two views of the same items, no labels) or ``embeddings``
    ``loss(embeddings)`` (no labels); for :data:`PAIR_LOSSES` a paired batch shape
    (``pair``, ``pair_score``, ``pair_target``, ``triplet``, ``triplet_margin``,
    ``image_text``: see the constants above)."""

    @property
    def loss_class(self) -> type[nn.Module]:
        module, _, cls = self.class_path.partition(":")
        return getattr(import_module(f"lightning_metric.losses.{module}"), cls)

    @property
    def default_sampler(self) -> str:
        return CLASS_SAMPLER if self.contrastive else RANDOM_SAMPLER


def _entries(
    contrastive: bool, learnable: bool, table: dict[str, str], inputs: str = LABELLED
) -> dict[str, LossEntry]:
    return {
        name: LossEntry(name, path, learnable, contrastive, inputs) for name, path in table.items()
    }


LOSSES: dict[str, LossEntry] = {
    **_entries(contrastive=True, learnable=False, table={
        "angular": "triplet:AngularLoss",
        "circle": "pair:CircleLoss",
        "contrastive": "pair:ContrastiveLoss",
        "fast_ap": "ranking:FastAPLoss",
        "generalized_lifted_structure": "pair:GeneralizedLiftedStructureLoss",
        "intra_pair_variance": "pair:IntraPairVarianceLoss",
        "lifted_structure": "pair:LiftedStructureLoss",
        "margin": "triplet:MarginLoss",
        "multi_similarity": "pair:MultiSimilarityLoss",
        "nca": "neighbourhood:NCALoss",
        "npairs": "neighbourhood:NPairsLoss",
        "ntxent": "infonce:NTXentLoss",
        "snr_contrastive": "pair:SignalToNoiseRatioContrastiveLoss",
        "supcon": "infonce:SupConLoss",
        "triplet": "triplet:TripletMarginLoss",
        "tuplet_margin": "pair:TupletMarginLoss",
    }),
    **_entries(contrastive=False, learnable=True, table={
        "arcface": "margin_softmax:ArcFaceLoss",
        "cosface": "margin_softmax:CosFaceLoss",
        "large_margin_softmax": "margin_softmax:LargeMarginSoftmaxLoss",
        "normalized_softmax": "margin_softmax:NormalizedSoftmaxLoss",
        "sphereface": "margin_softmax:SphereFaceLoss",
        "subcenter_arcface": "margin_softmax:SubCenterArcFaceLoss",
        "proxy_anchor": "proxy:ProxyAnchorLoss",
        "proxy_nca": "proxy:ProxyNCALoss",
        "soft_triple": "proxy:SoftTripleLoss",
        "p2sgrad": "p2sgrad:P2SGradLoss",
    }),
    **_entries(contrastive=True, learnable=False, table={
        "dynamic_soft_margin": "dynamic_soft_margin:DynamicSoftMarginLoss",
        "histogram": "histogram:HistogramLoss",
        "instance": "instance:InstanceLoss",
        "pnp": "pnp:PNPLoss",
        "ranked_list": "ranked_list:RankedListLoss",
        "threshold_consistent_margin": "threshold_consistent:ThresholdConsistentMarginLoss",
    }),
    # Two views of each item, no labels: the batch is random items (each its own class).
    **_entries(contrastive=False, learnable=False, inputs=TWO_VIEWS, table={
        "self_supervised": "self_supervised:SelfSupervisedLoss",
        "vicreg": "self_supervised:VICRegLoss",
    }),
    # No labels: each embedding's proxy (meta-class) is drawn or given as indices_tuple.
    **_entries(contrastive=False, learnable=True, inputs=EMBEDDINGS_ONLY, table={
        "manifold": "manifold:ManifoldLoss",
    }),
}

# Losses on paired fields (query-document, image-text), no labels: ``inputs`` names the
# batch shape. A table of their own: the labelled losses' tests call every entry of LOSSES.
PAIR_LOSSES: dict[str, LossEntry] = {
    **_entries(contrastive=False, learnable=False, inputs=PAIR, table={
        "mnrl": "query_document:MultipleNegativesRankingLoss",
    }),
    **_entries(contrastive=False, learnable=False, inputs=PAIR_SCORE, table={
        "cosine_similarity": "query_document:CosineSimilarityLoss",
    }),
    **_entries(contrastive=False, learnable=False, inputs=PAIR_TARGET, table={
        "cosine_embedding": "query_document:CosineEmbeddingLoss",
    }),
    **_entries(contrastive=False, learnable=False, inputs=TRIPLET, table={
        "margin_ranking": "query_document:MarginRankingLoss",
    }),
    **_entries(contrastive=False, learnable=False, inputs=TRIPLET_MARGIN, table={
        "margin_mse": "query_document:MarginMSELoss",
    }),
    **_entries(contrastive=False, learnable=True, inputs=IMAGE_TEXT, table={
        "clip": "clip:CLIPLoss",
    }),
}


def get_entry(name: str) -> LossEntry:
    """The registry entry for a config name; a ValueError lists the known names."""
    known = {**LOSSES, **PAIR_LOSSES}
    if name not in known:
        raise ValueError(f"unknown loss {name!r}: expected one of {sorted(known)}")
    return known[name]


def entry_for(loss: nn.Module) -> LossEntry | None:
    """The entry whose class ``loss`` is an instance of (None for a loss not in the table)."""
    for entry in (*LOSSES.values(), *PAIR_LOSSES.values()):
        if type(loss) is entry.loss_class:
            return entry
    return None


def resolve_sampler(requested: str, loss_name: str) -> str:
    """``class``, ``random`` or ``no_duplicates`` for a labelled loss, by the
    ``sampler='auto'`` rule.

    ``auto`` gives the loss's own family; contrastive losses get ``class`` whatever
    was requested; classification-style losses honour an explicit request
    (``no_duplicates``: random batches with no label twice). A loss on
    paired fields gets the request unchanged (``auto``, ``random`` or ``no_duplicates``:
    :class:`~lightning_metric.data.PairDataModule` resolves ``auto``).
    """
    entry = get_entry(loss_name)
    if entry.name in PAIR_LOSSES:  # the pairs data module decides: no_duplicates or random
        if requested not in PAIR_SAMPLER_CHOICES:
            raise ValueError(f"sampler={requested} does not batch pairs: expected one of "
                             f"{list(PAIR_SAMPLER_CHOICES)}")
        return requested
    if requested not in SAMPLER_CHOICES:
        raise ValueError(f"unknown sampler {requested!r}: expected one of {list(SAMPLER_CHOICES)}")
    if entry.contrastive or requested == "auto":
        return entry.default_sampler
    return requested
