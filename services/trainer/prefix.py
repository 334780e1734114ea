"""A group's prompt computed once for its G completions (``trainer.share_prompts``).

Every group of a GRPO step is G completions of one prompt. Instead of running prompt +
completion for each of the G rows, a micro-batch runs its decoder twice in one graph:

    1. the distinct prompts, each without its last token, right-padded: [M, P]; every
       layer's keys and values are recorded (``_Record``);
    2. each completion prefixed with its prompt's last token, right-padded: [N, C], whose
       attention reads its prompt's recorded keys and values (``_Prefix``, gathered to the
       N rows with index_select, which is differentiable: the gradient of all G completions
       flows back into the one prompt forward) and then its own, causally.

Only forward 2's hidden states reach the LM head, so each completion token's logprob is
computed once and no head runs on prompt positions. The keys of forward 2 are [P + C] wide
per row; ``attention_mask`` [N, P + C] holds 1 on the prompt's real tokens and the row's
own, and ``position_ids`` [N, C] continue from the prompt's real length, so every row sees
exactly the context (and rotary positions) it has in the padded layout.

Neither cache keeps state across calls nor grows when called again: under layer
checkpointing (``gradient_checkpointing_enable``) the backward replays each layer, and a
replay must compute what the forward did. ``_Record`` overwrites what it holds and
``_Prefix`` never writes, which is why ``prompt_cache`` may mark the decoder layers as able
to checkpoint with a cache (transformers would otherwise drop the cache under checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass(frozen=True)
class Prompts:
    """The distinct prompts of a micro-batch, without their last token, and whose each row is."""

    ids: torch.Tensor  # [M, P] right-padded
    mask: torch.Tensor  # [M, P] 1 on the tokens the prompt forward attends to
    index: torch.Tensor  # [N] the prompt (0..M-1) of each completion row

    def to(self, device: str | torch.device) -> Prompts:
        return Prompts(self.ids.to(device), self.mask.to(device), self.index.to(device))


class _Record(DynamicLayer):
    """One layer's keys and values of the prompt forward: kept (the last call's) and returned as
    they are, so a checkpointed replay of the layer sees and stores the same."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # nothing precedes the prompt forward's tokens


class _Prefix(DynamicLayer):
    """One layer's prompt keys and values, one copy per completion row [N, heads, P, D]:
    each call returns them followed by the new ones, and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:  # (all CacheLayerMixin's init sets)
        self.keys, self.values, self.is_initialized = keys, values, True
        self.device = keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        assert self.keys is not None and self.values is not None
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prompt_cache(decoder: Any, prompts: Prompts) -> Cache:
    """Run the prompt forward (1) and return the cache forward 2 reads: every layer's prompt
    keys and values, gathered to the completion rows."""
    for layer in getattr(decoder, "layers", []):
        layer._can_checkpoint_with_cache = True  # safe with these caches: see the module docstring
    record = Cache(layer_class_to_replicate=_Record)
    decoder(input_ids=prompts.ids, attention_mask=prompts.mask, cache=record, use_cache=True)
    layers: list[Any] = []
    for layer in record.layers:
        assert isinstance(layer, _Record) and layer.keys is not None and layer.values is not None
        keys = layer.keys.index_select(0, prompts.index)  # [M, h, P, d] -> [N, h, P, d]
        layers.append(_Prefix(keys, layer.values.index_select(0, prompts.index)))
    return Cache(layers=layers)
