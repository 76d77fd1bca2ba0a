"""Key/value states of prompt prefixes, kept between generate calls and shared by prompts that start alike.

Why: in an interview the simulator reads the same profile every turn and the questioner the same
conversation, one turn longer each time; every prompt starts with the same system text. Prefill
of those tokens is most of a turn's work on a CPU, and unlike decoding it does not get cheaper
per row in a batch. With the states kept, a turn only reads its new tokens.

States are kept in blocks of ``block`` tokens. A block is keyed by its parent block and its own
tokens, so the blocks of a prompt are found by walking from its first token, and a prefix shared
by many prompts (the system text) is stored once. When the budget is spent the least recently
used blocks go first; a prompt touches its blocks from last to first, so a shared head outlives
the tails hanging from it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# Small enough that little of a prompt is left over past its last whole block, large enough that
# the per-block bookkeeping stays small next to the tensors.
BLOCK_TOKENS = 16


@dataclass
class PrefixStats:
    """Counts since the cache was made: ``prompt_tokens`` looked up and ``reused_tokens`` found
    stored (tokens), ``evicted_blocks`` dropped to stay within the budget."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of states shaped ``[layers, 2 (key, value), kv_heads, tokens, head_dim]``."""

    def __init__(self, budget_bytes: int, block: int = BLOCK_TOKENS):
        self.budget_bytes = budget_bytes
        self.block = block
        self.used_bytes = 0
        self.stats = PrefixStats()
        # (parent block id, the block's tokens) -> (block id, states); 0 is the id of "no parent".
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, object]] = OrderedDict()
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._blocks)

    def _walk(self, ids: Sequence[int], limit: int) -> list[tuple[tuple[int, tuple[int, ...]], tuple[int, object]]]:
        found = []
        parent = 0
        for start in range(0, limit - self.block + 1, self.block):
            key = (parent, tuple(ids[start : start + self.block]))
            entry = self._blocks.get(key)
            if entry is None:
                break
            found.append((key, entry))
            parent = entry[0]
        return found

    def lookup(self, ids: Sequence[int], limit: int):
        """``(tokens, states)``: the longest stored prefix of ``ids`` no longer than ``limit``
        (whole blocks only), with its states concatenated; ``(0, None)`` when nothing is stored."""
        import torch

        self.stats.prompt_tokens += len(ids)
        found = self._walk(ids, limit)
        for key, _ in reversed(found):
            self._blocks.move_to_end(key)
        if not found:
            return 0, None
        tokens = len(found) * self.block
        self.stats.reused_tokens += tokens
        return tokens, torch.cat([states for _, (_, states) in found], dim=3)

    def store(self, ids: Sequence[int], start: int, states) -> None:
        """Keep the whole blocks of ``states``, the states of ``ids[start:start + states.shape[3]]``;
        ``start`` is where ``lookup`` left off for these ids, so the blocks before it are stored."""
        if self.budget_bytes <= 0:
            return
        parents = self._walk(ids, start)
        if len(parents) * self.block != start:
            return  # evicted in between: a tail without its head could never be found again
        path = [key for key, _ in parents]
        parent = parents[-1][1][0] if parents else 0
        end = start + (states.shape[3] // self.block) * self.block
        for offset in range(start, end, self.block):
            key = (parent, tuple(ids[offset : offset + self.block]))
            entry = self._blocks.get(key)
            if entry is None:
                # A copy, so a kept block does not pin the whole batch's cache in memory.
                block_states = states[:, :, :, offset - start : offset - start + self.block].clone()
                entry = (self._next_id, block_states)
                self._next_id += 1
                self._blocks[key] = entry
                self.used_bytes += block_states.nbytes
            path.append(key)
            parent = entry[0]
        for key in reversed(path):
            self._blocks.move_to_end(key)
        while self.used_bytes > self.budget_bytes and self._blocks:
            _, (_, evicted) = self._blocks.popitem(last=False)
            self.used_bytes -= evicted.nbytes
            self.stats.evicted_blocks += 1

    def clear(self) -> None:
        """Drop every stored block (``used_bytes`` back to 0); ``stats`` keep counting."""
        self._blocks.clear()
        self.used_bytes = 0
