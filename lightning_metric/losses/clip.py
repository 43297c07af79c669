"""CLIP's contrastive loss on image-text pairs, with its learnable logit scale."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..distances import CosineSimilarity
from ._paired import check_pairs, gather_candidates, mean_over_pairs
from ._reduction import connected_zero
from .infonce import info_nce, similarity_logits


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE over an image-text similarity matrix (CLIP).

    For training an image tower and a text tower into one space from matching
    (image, caption) pairs: with ``S = scale * cos(image_i, text_j)``, each image must
    pick its caption among the batch's captions and each caption its image,

        loss = ( CE(S, arange(B)) + CE(S^T, arange(B)) ) / 2,

    ``CE`` the mean cross-entropy over rows. ``scale = exp(logit_scale)``: the parameter
    ``logit_scale`` holds the log of the scale, as in open_clip, and is learnt by the loss
    optimizer (like ArcFace's class centres). Before each forward it is clamped into
    ``[0, log(max_logit_scale)]`` (open_clip clamps after every optimizer step; the value
    the loss uses is the same), so the scale stays in ``[1, max_logit_scale]``.

    Inputs: ``image`` and ``text`` ``(B, D)`` (any norm: they are L2-normalised here);
    row ``i`` of both is pair ``i``. Captions repeated in a batch are false negatives:
    keep duplicates out of a batch.

    Args:
        logit_scale_init: the initial scale (``1 / temperature``; a multiplier, not its
            log), in ``[1, max_logit_scale]``. CLIP's 1/0.07 (about 14.3).
        max_logit_scale: the largest scale (CLIP's 100); None: no upper bound.
        learnable: learn the scale (a parameter); False: a fixed buffer.
        gather_distributed: under ``torch.distributed``, gather every rank's images and
            texts with gradients; each rank's images rank against all texts and its texts
            against all images (open_clip's ``local_loss=True, gather_with_grad=True``),
            so ``W`` ranks of ``B`` pairs train like one batch of ``W * B``, and the value
            is that batch's loss on every rank. ``False`` (default): each rank's batch
            alone; ``True``: always (``RuntimeError`` without a process group); ``None``:
            when a process group of more than one rank runs.

    Raises:
        ValueError: ``logit_scale_init`` outside ``[1, max_logit_scale]``; at call time,
            an input that is not a floating 2-D tensor or shapes that differ.

    Paper: Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (CLIP), 2021. Same values and gradients as open_clip's ``ClipLoss``
    given the normalised features and ``logit_scale.exp()``.

    Example::

        >>> loss_fn = CLIPLoss()
        >>> image, text = torch.randn(2, 32, 512).unbind(0)
        >>> loss = loss_fn(image, text)
        >>> loss_fn.scale                     # 1 / 0.07, until the loss optimizer steps
        14.28...
    """

    def __init__(
        self,
        logit_scale_init: float = 1 / 0.07,
        max_logit_scale: float | None = 100.0,
        learnable: bool = True,
        gather_distributed: bool | None = False,
    ):
        super().__init__()
        upper = math.inf if max_logit_scale is None else max_logit_scale
        if not 1 <= logit_scale_init <= upper:
            raise ValueError(
                f"{type(self).__name__}: logit_scale_init must be in [1, max_logit_scale="
                f"{max_logit_scale}], got {logit_scale_init}"
            )
        initial = torch.tensor(math.log(logit_scale_init))
        if learnable:
            self.logit_scale = nn.Parameter(initial)
        else:
            self.register_buffer("logit_scale", initial)
        self.max_logit_scale = max_logit_scale
        self.learnable = learnable
        self.gather_distributed = gather_distributed
        self.distance = CosineSimilarity()

    @property
    def scale(self) -> float:
        """The current scale ``exp(logit_scale)``, clamped as the next forward will."""
        return float(self._clamped().exp())

    def _clamped(self) -> Tensor:
        upper = None if self.max_logit_scale is None else math.log(self.max_logit_scale)
        return self.logit_scale.detach().clamp(0, upper)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """Mean of the image-to-text and text-to-image cross-entropies over the pairs."""
        name = type(self).__name__
        image, text = check_pairs(name, image=image, text=text)
        if self.learnable:
            with torch.no_grad():  # open_clip's clamp, applied to the parameter itself
                self.logit_scale.copy_(self._clamped())
        with torch.autocast(image.device.type, enabled=False):
            scale = self.logit_scale.exp()
            rows = torch.arange(len(image), device=image.device)
            gathered = gather_candidates(self.gather_distributed, name, [image, text])
            if gathered is None:
                if len(image) == 0:
                    return connected_zero(image, text, scale)
                logits = similarity_logits(self.distance, image, text, scale)
                per_image = info_nce(logits, rows, rows)
                per_text = info_nce(logits.T, rows, rows)
            else:
                if sum(gathered.sizes) == 0:
                    return connected_zero(image, gathered.tensor, scale)
                everyone, cols = gathered.tensor, rows + gathered.offset
                per_image = info_nce(
                    similarity_logits(self.distance, image, everyone[:, 1], scale), rows, cols
                )
                per_text = info_nce(
                    similarity_logits(self.distance, text, everyone[:, 0], scale), rows, cols
                )
            return mean_over_pairs((per_image + per_text) / 2, gathered)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale:.4g}, max_logit_scale={self.max_logit_scale}, "
            f"learnable={self.learnable}, gather_distributed={self.gather_distributed}"
        )
