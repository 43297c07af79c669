"""Which evaluation items are queries, which are gallery items, and their categories.

Most data sets retrieve each item among all the others (self-retrieval: every item
is both a query and a gallery item). Data sets with a separate gallery (In-Shop
style manifests with ``is_query`` / ``is_gallery`` columns) say so through
``datamodule.eval_roles(stage)``, which the metric callbacks read.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class EvalRoles:
    """Per-item roles of an evaluation set, in its dataset order (``N`` items).

    Attributes:
        is_query: ``(N,)`` bool: the item is retrieved for (a query).
        is_gallery: ``(N,)`` bool: the item can be retrieved (a gallery item). An item
            that is both is never retrieved for itself.
        categories: ``(N,)`` int64 category ids, or None (metrics per category).
        category_names: name of each category id, or ``()``.
    """

    is_query: Tensor
    is_gallery: Tensor
    categories: Tensor | None = None
    category_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.is_query)
        if self.is_query.shape != (n,) or self.is_gallery.shape != (n,):
            raise ValueError(
                f"is_query and is_gallery must both be (N,), got {tuple(self.is_query.shape)} "
                f"and {tuple(self.is_gallery.shape)}"
            )
        if self.categories is not None and self.categories.shape != (n,):
            raise ValueError(f"categories must be ({n},), got {tuple(self.categories.shape)}")

    @property
    def separate_gallery(self) -> bool:
        """True unless every item is both a query and a gallery item."""
        return not bool(self.is_query.all() and self.is_gallery.all())
