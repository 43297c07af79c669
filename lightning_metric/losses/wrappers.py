"""Loss wrappers: a weighted sum of losses, and a memory of past batches (XBM)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import IndicesTuple, check_embeddings, check_labels
from ..distributed import gather_no_grad, resolve_gather
from ..indices import all_pairs, to_pairs, to_triplets
from ..miners import BaseMiner
from .base import drop_self_pairs


class MultipleLosses(nn.Module):
    """``sum_i weights[i] * losses[i](embeddings, labels, indices_i)``.

    Args:
        losses: a list or a dict of losses.
        miners: optional miners of the same shape (list entries may be None; a dict
            may name only some losses); a loss with a miner gets the miner's tuples.
        weights: optional weights of the same shape (default 1 each).

    Example::

        >>> loss = MultipleLosses([TupletMarginLoss(), IntraPairVarianceLoss()], weights=[1, 0.5])
    """

    def __init__(
        self,
        losses: Sequence[nn.Module] | Mapping[str, nn.Module],
        miners: Sequence[nn.Module | None] | Mapping[str, nn.Module] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.is_dict = isinstance(losses, Mapping)
        keys = list(losses) if self.is_dict else list(range(len(losses)))
        if not keys:
            raise ValueError("MultipleLosses needs at least one loss")
        self.keys = keys
        self.losses = nn.ModuleDict(losses) if self.is_dict else nn.ModuleList(losses)
        self.miners = _aligned("miners", miners, keys, self.is_dict, all_keys=False)
        self.weights = _aligned("weights", weights, keys, self.is_dict, all_keys=True)
        self._miner_modules = nn.ModuleList(m for m in self.miners.values() if m is not None)

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple: IndicesTuple | None = None
    ) -> Tensor:
        if indices_tuple is not None and any(m is not None for m in self.miners.values()):
            raise ValueError("pass either miners to MultipleLosses or an indices_tuple, not both")
        total = None
        for key in self.keys:
            miner = self.miners.get(key)
            tuples = miner(embeddings, labels) if miner is not None else indices_tuple
            weight = 1.0 if self.weights.get(key) is None else self.weights[key]
            term = self.losses[key if self.is_dict else int(key)](embeddings, labels, tuples)
            total = term * weight if total is None else total + term * weight
        return total


def _storage_dtype(embeddings: Tensor) -> torch.dtype:
    """The memory's dtype for these embeddings: theirs, at least float32."""
    return torch.promote_types(embeddings.dtype, torch.float32)


def _aligned(name, values, keys, is_dict, all_keys):
    """``values`` as a ``{key: value}`` dict matching the losses' keys (a clear error if not)."""
    if values is None:
        return {}
    if is_dict:
        if not isinstance(values, Mapping):
            raise ValueError(f"{name} must be a dict when losses is a dict")
        unknown = set(values) - set(keys)
        missing = set(keys) - set(values)
        if unknown or (all_keys and missing):
            raise ValueError(f"{name} keys {sorted(values)} must match the losses' {sorted(keys)}")
        return dict(values)
    if isinstance(values, Mapping) or len(values) != len(keys):
        raise ValueError(f"{name} must be a list of {len(keys)} entries, one per loss")
    return dict(zip(keys, values, strict=True))


class CrossBatchMemory(nn.Module):
    """Compare each batch with a queue of past embeddings (Wang et al. 2020, "XBM").

    The batch is enqueued (detached) first, then the wrapped loss compares the batch
    with the whole memory as its reference set. The queue lives in buffers, so it
    survives a checkpoint round trip.

    An item is never paired with its own copy in memory, and that copy is excluded
    *before* mining: a miner derived from :class:`~lightning_metric.miners.BaseMiner`
    receives the batch's slots as ``ref_self_index``. PML 2.9 mines first and drops the
    self-pairs afterwards, so a miner that takes the closest positive
    (``BatchEasyHardMiner()``'s default, the ``"easy"`` positives of
    ``TripletEasyHardMiner`` / ``SiameseEasyHardMiner``) picks every anchor's own copy at
    distance 0 and PML's loss is 0 on every batch; here it is the loss of the closest
    *other* positive. Other miners (PML's, a plain callable) cannot take that keyword:
    their self-pairs are still dropped after mining, as in PML.

    The memory keeps the embeddings' dtype: it takes the dtype of the batch it stores,
    promoted to at least float32. Float64 embeddings are stored bit for bit (the memory
    turns float64 when the first float64 batch is enqueued, its earlier rows converted);
    float16 / bfloat16 embeddings (autocast, mixed precision) are stored in float32, which
    holds them exactly and does not flip between the half- and single-precision outputs of
    autocast's layers. The dtype changes only when a training batch is enqueued, never in
    evaluation; ``load_state_dict`` adopts the saved memory's dtype (a float64 memory loads
    into a fresh, float32 module unchanged), and ``.double()`` / ``.float()`` convert it
    like any buffer.

    Evaluation never changes the memory. In eval mode (``not self.training``, as during
    Lightning's validation, test and sanity-check loops) the value is the loss of the
    batch against the memory plus the batch itself, as if it had been enqueued (the
    value training mode would return), but nothing is written: ``embedding_memory``,
    ``label_memory``, ``queue_idx`` and ``has_been_filled`` stay as they were. An
    evaluation batch larger than the memory is compared with the filled memory and the
    whole batch appended to it (training refuses such a batch).

    Under ``torch.distributed`` (``gather_distributed``), every rank enqueues the batches of
    all ranks (detached, in rank order), so the memories of all ranks stay identical and
    hold what one process with the whole batch would hold; each rank's items are the
    queries. The wrapped loss, gathering too (its own ``gather_distributed``), reduces the
    ranks' queries as one batch: the value and the encoder gradients after DDP's averaging
    are those of one process (for the losses whose ``gather_mode`` is ``"local"``).

    Args:
        loss: a labelled loss taking ``ref_emb`` (pair- and triplet-based ones).
        embedding_size: ``D`` of the embeddings.
        memory_size: slots in the queue (it must hold the batches of all ranks together).
        miner: optional ``miner(embeddings, labels, ref_emb, ref_labels)`` over the memory.
        gather_distributed: enqueue every rank's batch; ``None`` (default): when a process
            group with more than one rank is initialised; ``True`` without one raises.

    Example::

        >>> xbm = CrossBatchMemory(ContrastiveLoss(), embedding_size=128, memory_size=4096)
        >>> loss = xbm(embeddings, labels)       # (B, 128), (B,)
    """

    def __init__(
        self, loss: nn.Module, embedding_size: int, memory_size: int = 1024,
        miner: nn.Module | None = None, gather_distributed: bool | None = None,
    ):
        super().__init__()
        self.gather_distributed = gather_distributed
        if embedding_size < 1 or memory_size < 1:
            raise ValueError(
                f"embedding_size ({embedding_size}) and memory_size ({memory_size}) must be "
                "positive"
            )
        self.loss, self.miner = loss, miner
        self.embedding_size, self.memory_size = embedding_size, memory_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.long))
        self.register_buffer("has_been_filled", torch.zeros((), dtype=torch.bool))

    def reset_queue(self) -> None:
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx.zero_()
        self.has_been_filled.zero_()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: IndicesTuple | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """Loss of the batch against the memory.

        ``enqueue_mask`` ``(B,)`` bool: enqueue only those rows and use the others as the
        queries (then nothing is removed as a self-comparison). In eval mode the rows are
        compared as if enqueued, but the memory is left unchanged.
        """
        check_embeddings("embeddings", embeddings)
        labels = check_labels("labels", labels, embeddings)
        self._check_sizes(embeddings, indices_tuple, enqueue_mask)
        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device=embeddings.device, dtype=torch.bool)
            queued, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            queued, queued_labels = embeddings, labels
        own_rows = None
        if resolve_gather(self.gather_distributed, type(self).__name__):
            gathered = gather_no_grad(queued)
            queued_labels = gather_no_grad(queued_labels, gathered.sizes).tensor
            queued, own_rows = gathered.tensor, gathered.own_rows()
            if self.training and enqueue_mask is None and len(queued) > self.memory_size:
                raise ValueError(
                    f"the batches of all ranks ({len(queued)} items) do not fit "
                    f"memory_size={self.memory_size}"
                )
        if self.training:
            self._adopt_dtype(_storage_dtype(queued))
        memory, memory_labels, slots = self._memory_with(queued, queued_labels)
        if own_rows is not None:
            slots = slots[own_rows]
        memory = memory.to(embeddings.dtype)
        tuples = self._indices(embeddings, labels, memory, memory_labels, indices_tuple,
                               slots if enqueue_mask is None else None)
        return self.loss(embeddings, labels, tuples, memory, memory_labels)

    @torch.no_grad()
    def _adopt_dtype(self, dtype: torch.dtype) -> None:
        """Convert the memory to ``dtype`` in place of the same buffer object (so a
        ``DistributedDataParallel`` that listed the buffers still holds it)."""
        if self.embedding_memory.dtype != dtype:
            self.embedding_memory.data = self.embedding_memory.data.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "embedding_memory")
        if isinstance(saved, Tensor) and saved.is_floating_point():
            self._adopt_dtype(saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_sizes(self, embeddings, indices_tuple, enqueue_mask) -> None:
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have size {embeddings.shape[1]}, CrossBatchMemory was built for "
                f"embedding_size={self.embedding_size}"
            )
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None and len(enqueue_mask) != len(embeddings):
            raise ValueError(
                f"enqueue_mask has {len(enqueue_mask)} entries for {len(embeddings)} embeddings"
            )
        if self.training and enqueue_mask is None and len(embeddings) > self.memory_size:
            raise ValueError(
                f"a batch of {len(embeddings)} does not fit memory_size={self.memory_size}"
            )

    @torch.no_grad()
    def _memory_with(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The filled part of the memory once the rows are enqueued (wrapping around), its
        labels, and the rows' slots ``(n,)``.

        Training mode writes the rows into the buffers; eval mode into a copy, leaving the
        buffers as they were.
        """
        if not self.training and len(embeddings) > self.memory_size:
            return self._memory_and_batch(embeddings, labels)
        start = int(self.queue_idx)
        slots = torch.arange(start, start + len(embeddings), device=embeddings.device)
        slots = slots % self.memory_size
        rows = embeddings.detach().to(_storage_dtype(embeddings))
        row_labels = labels.to(self.label_memory.dtype)
        new_idx = (start + len(embeddings)) % self.memory_size
        filled = bool(self.has_been_filled) or (len(embeddings) > 0 and new_idx <= start)
        if self.training:
            self.embedding_memory[slots] = rows
            self.label_memory[slots] = row_labels
            self.queue_idx.fill_(new_idx)
            self.has_been_filled.fill_(filled)
            memory, memory_labels = self.embedding_memory, self.label_memory
        else:
            # As training would store it, without touching the buffer (dtype included).
            memory = self.embedding_memory.to(rows.dtype).index_put((slots,), rows)
            memory_labels = self.label_memory.index_put((slots,), row_labels)
        size = self.memory_size if filled else new_idx
        return memory[:size], memory_labels[:size], slots

    def _memory_and_batch(self, embeddings: Tensor, labels: Tensor):
        """Eval mode, a batch larger than the memory (an evaluation batch): the filled memory
        with the whole batch appended after it, and the rows' positions in that."""
        filled = int(self.memory_size if self.has_been_filled else self.queue_idx)
        dtype = _storage_dtype(embeddings)
        memory = torch.cat([self.embedding_memory[:filled].to(dtype),
                            embeddings.detach().to(dtype)])
        memory_labels = torch.cat([self.label_memory[:filled],
                                   labels.to(self.label_memory.dtype)])
        slots = torch.arange(filled, filled + len(embeddings), device=embeddings.device)
        return memory, memory_labels, slots

    def _indices(self, embeddings, labels, memory, memory_labels, given, own_slots):
        if self.miner is None:
            tuples = all_pairs(labels, memory_labels, same_set=False)
        elif isinstance(self.miner, BaseMiner) and own_slots is not None:
            tuples = self.miner(embeddings, labels, memory, memory_labels,
                                ref_self_index=own_slots)
            own_slots = None  # excluded before mining
        else:
            tuples = self.miner(embeddings, labels, memory, memory_labels)
        if own_slots is not None:
            tuples = drop_self_pairs(tuples, own_slots)
        if given is None:
            return tuples
        if len(given) != len(tuples):
            convert = to_pairs if len(tuples) == 4 else to_triplets
            given = convert(given, labels, labels, True)
        return tuple(torch.cat([a, b.to(a.device)]) for a, b in zip(tuples, given, strict=True))

