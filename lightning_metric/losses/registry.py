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
SAMPLER_CHOICES = ("auto", CLASS_SAMPLER, RANDOM_SAMPLER)


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

    @property
    def loss_class(self) -> type[nn.Module]:
        module, _, cls = self.class_path.partition(":")
        return getattr(import_module(f"lightning_metric.losses.{module}"), cls)

    @property
    def default_sampler(self) -> str:
        return CLASS_SAMPLER if self.contrastive else RANDOM_SAMPLER


def _entries(contrastive: bool, learnable: bool, table: dict[str, str]) -> dict[str, LossEntry]:
    return {name: LossEntry(name, path, learnable, contrastive) for name, path in table.items()}


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
    }),
}


def get_entry(name: str) -> LossEntry:
    """The registry entry for a config name; a ValueError lists the known names."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def entry_for(loss: nn.Module) -> LossEntry | None:
    """The entry whose class ``loss`` is an instance of (None for a loss not in the table)."""
    for entry in LOSSES.values():
        if type(loss) is entry.loss_class:
            return entry
    return None


def resolve_sampler(requested: str, loss_name: str) -> str:
    """``class`` or ``random`` for a loss, by the ``sampler='auto'`` rule.

    ``auto`` gives the loss's own family; contrastive losses get ``class`` whatever
    was requested; classification-style losses honour an explicit request.
    """
    if requested not in SAMPLER_CHOICES:
        raise ValueError(f"unknown sampler {requested!r}: expected one of {list(SAMPLER_CHOICES)}")
    entry = get_entry(loss_name)
    if entry.contrastive or requested == "auto":
        return entry.default_sampler
    return requested
