"""Batches that waste little compute on padding, in an order fixed by (seed, epoch).

Examples are shuffled, cut into large windows, each window sorted by length and cut into
micro-batches, and the micro-batches shuffled again: neighbours in a batch have similar lengths,
yet every epoch sees a different order. Because the order is a pure function of (seed, epoch),
a resumed run finds its place again from the step number alone.

Sequences are padded on the LEFT, so positions count from each row's first real token; logits are
computed only where a target token is predicted (``target_loss_sum``), never for prompt tokens,
which carry no loss anyway.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from funnelqa.training.examples import IGNORE_INDEX, Encoded

if TYPE_CHECKING:
    import torch

# Micro-batches per sorting window: large enough that lengths in a batch are close, small
# enough that batches of all lengths are spread over the epoch.
WINDOW_BATCHES = 64


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices into ``lengths``, grouped into micro-batches of similar length, in a shuffled order."""
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class StepPlan:
    """How micro-batches map onto optimizer steps and processes."""

    n_examples: int
    batch_size: int
    grad_accum: int
    num_processes: int

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches in one pass over the examples, all processes together: ceil(n_examples / batch_size)."""
        return math.ceil(self.n_examples / self.batch_size)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one optimizer step, all processes together: grad_accum x num_processes."""
        return self.grad_accum * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, rounded up (``step_batches`` wraps around to fill the last)."""
        return math.ceil(self.micro_batches_per_epoch / self.micro_batches_per_step)

    def step_batches(
        self, epoch_batches: list[list[int]], step_in_epoch: int, process_index: int
    ) -> list[tuple[int, list[int]]]:
        """The ``grad_accum`` micro-batches one process runs for one step, each as (its place among
        the step's ``micro_batches_per_step``, its example indices). The epoch's list is extended by
        wrapping around, so every process runs the same number of micro-batches."""
        per_step = self.micro_batches_per_step
        start = step_in_epoch * per_step
        return [
            (place, epoch_batches[(start + place) % len(epoch_batches)])
            for place in range(process_index, per_step, self.num_processes)
        ]


def dropout_seed(seed: int, step: int, place: int) -> int:
    """The torch seed for the dropout of micro-batch ``place`` of optimizer step ``step``.

    A function of the micro-batch, not of the process that runs it: N processes draw the same masks
    as one process accumulating N times as many micro-batches, and a resumed run, on any number of
    processes, needs no saved random state.
    """
    return random.Random(f"dropout:{seed}:{step}:{place}").getrandbits(63)


@dataclass
class Batch:
    """A left-padded micro-batch. ``input_ids``, ``attention_mask`` (1 on real tokens),
    ``position_ids`` (counting each row's real tokens from 0) and ``labels`` (the token id where
    loss falls, IGNORE_INDEX elsewhere) are long tensors ``[rows, width]``; ``tokens``: real tokens
    in the batch; ``target_tokens``: tokens that carry loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    tokens: int
    target_tokens: int

    def to(self, device) -> Batch:
        """The same batch with its four tensors moved to ``device``."""
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.labels.to(device), self.tokens, self.target_tokens,
        )


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    """The Batch of ``items``, on the CPU: width = the longest item in tokens, each row padded on the
    left with ``pad_id``, labels from ``Encoded.labels``."""
    import torch

    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        start = width - len(item)
        input_ids[row, start:] = torch.tensor(item.input_ids)
        labels[row, start:] = torch.tensor(item.labels())
        attention_mask[row, start:] = 1
    # Positions count real tokens only, so a left-padded row sees the same positions as unpadded.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        tokens=sum(len(item) for item in items),
        target_tokens=sum(item.target_length for item in items),
    )


def target_loss_sum(model, batch: Batch):
    """Summed cross-entropy over the target tokens of ``batch`` (a 0-dim tensor).

    Logits are computed only at the positions that predict a target token: a forward pre-hook on
    the output layer hands it just those hidden states ([1, targets, hidden]). A conversation has
    its targets spread over the whole sequence, and full logits (rows x width x vocabulary, 49k
    for SmolLM2) would cost more memory than the model. The forward still goes through ``model``
    itself, so data-parallel wrappers see an ordinary call.
    """
    import torch.nn.functional as F

    # Logits at position p predict token p + 1.
    predicts = batch.labels[:, 1:] != IGNORE_INDEX
    chosen = predicts.new_zeros(batch.labels.shape)
    chosen[:, :-1] = predicts
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    hook = inner.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (args[0][chosen].unsqueeze(0), *args[1:])
    )
    try:
        output = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=0,
            use_cache=False,
        )
    finally:
        hook.remove()
    logits = output.logits[0]
    return F.cross_entropy(logits.float(), batch.labels[:, 1:][predicts], reduction="sum")
