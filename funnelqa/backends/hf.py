"""transformers backend: ``hf:PATH[+ADAPTER]`` (a model directory or a .gguf file, optionally with a
peft adapter) and ``local[:NAME][+ADAPTER]`` (a GGUF embedded in a PyPI package, which
funnelqa.models converts once; after that it is an hf model like any other).

Batched generation with our own decoding loop; prompts built with the model's chat
template by funnelqa.chat_template, exactly as training builds them. The states of prompt
prefixes are kept between calls (``prefix_cache``), so a prompt that starts like an earlier one
(the same profile, the same conversation one turn longer) only reads its new tokens; rows leave
the batch as they finish.

``json_schema`` is not enforced: the prompts already ask for JSON and ``parsing.extract_json``
tolerates chatter around it, while constrained decoding would cost more than these models gain.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from funnelqa import models
from funnelqa.backends import Answer, Backend, BackendOptions, ModelSpec, Request
from funnelqa.backends.prefix_cache import PrefixCache
from funnelqa.chat_template import TemplateError, encode_chat
from funnelqa.errors import BackendError


class HFBackend(Backend):
    """``hf:PATH[+ADAPTER]`` and ``local[:NAME][+ADAPTER]`` on ``options.device`` (default cuda when
    there is one, else cpu), loaded by ``models.load_causal_lm`` with left padding.

    ``options.dtype``: float32, bfloat16 or float16; "auto" or None picks bf16 where the device
    computes it natively, else float32 (``models.inference_dtype``). ``options.batch_size``
    prompts decode together. ``options.prefix_cache_mb`` bounds the prefix cache in MiB (None: a
    quarter of the device's memory; 0, or a model with sliding-window layers: no cache).
    Raises BackendUnavailable when the model, its package or the adapter is missing or cannot
    load; UsageError for an unknown embedded model or dtype.
    """

    def __init__(self, spec: ModelSpec, options: BackendOptions):
        # Checked before torch is imported, so a wrong spec fails at once. The embedded default is
        # filled in here: ``local`` and ``local:smollm2-135m`` share one cache identity.
        model_spec = models.parse_model_spec(spec)
        import torch

        self.spec = spec.redacted()
        device = options.device or models.default_device()
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # torch counts physical cores; in a container the CPUs we may actually use can differ.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        dtype = options.dtype if options.dtype not in (None, "auto") else models.inference_dtype(device)
        self.model, self.tokenizer = models.load_causal_lm(model_spec, device=device, dtype=dtype, padding_side="left")
        self.device = device
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.batch_size = max(1, options.batch_size)
        self.stop_ids = models.stop_token_ids(self.tokenizer, self.model.generation_config)
        # float32 and bf16 answers differ a little: a cache filled by one must not answer for the other.
        self._cache_id = f"{model_spec}#{models.fingerprint(model_spec)}#{self.dtype}"
        self.prefix_cache = self._open_prefix_cache(options.prefix_cache_mb)

    def _open_prefix_cache(self, budget_mb: int | None) -> PrefixCache | None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if budget_mb is None:
            budget_bytes = models.memory_bytes(self.device) // 4
        else:
            budget_bytes = budget_mb * 2**20
        # Sliding-window layers drop old states, so a stored prefix could not be spliced back in.
        layers = DynamicCache(config=self.model.config).layers
        if budget_bytes <= 0 or not all(type(layer) is DynamicLayer for layer in layers):
            return None
        return PrefixCache(budget_bytes)

    @classmethod
    def from_spec(cls, spec: ModelSpec, options: BackendOptions) -> HFBackend:
        """Loads the model at once: seconds, or tens of seconds the first time a GGUF is converted."""
        return cls(spec, options)

    @property
    def cache_id(self) -> str:
        """``SPEC#FINGERPRINT#DTYPE``: the spec with the embedded default filled in, the hash of
        weights, tokenizer, template and adapter (``models.fingerprint``), and the dtype, since
        float32 and bf16 answers differ a little. A retrained adapter is never served stale answers."""
        return self._cache_id

    def encode(self, request: Request) -> list[int]:
        """The prompt's token ids, built by the function training uses (funnelqa.chat_template)."""
        try:
            return list(encode_chat(self.tokenizer, request.messages).input_ids)
        except TemplateError as exc:
            raise BackendError(f"{self.spec}: {exc}") from None

    def generate(self, requests: Sequence[Request]) -> list[str]:
        """Answers in request order, decoded ``batch_size`` prompts at a time, shortest first:
        greedy at temperature 0, else sampled with the request's seed; at most ``max_tokens`` new
        tokens, special tokens dropped from the text. A prompt that fills the model's context is
        not run: its answer is a failed Answer (returned, not raised). Raises BackendError when the
        chat template cannot render a request, or transformers ignores the key/value cache
        (transformers < 5.24)."""
        import torch

        if not requests:
            return []
        encoded = [self.encode(r) for r in requests]
        # Similar lengths in one batch waste less compute on padding.
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        answers = [""] * len(requests)
        order = self._within_context(order, encoded, answers)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = self._generate_batch([encoded[i] for i in chunk], [requests[i] for i in chunk])
                for i, text in zip(chunk, texts):
                    answers[i] = text
        return answers

    def context_length(self) -> int | None:
        """Positions the model was built for (its config's ``max_position_embeddings``), or None."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _within_context(self, order: list[int], encoded: list[list[int]], answers: list[str]) -> list[int]:
        """``order`` without the prompts beyond the context, whose ``answers`` become failed Answers."""
        kept = []
        for i in order:
            failed = self.over_context(len(encoded[i]))
            if failed is None:
                kept.append(i)
            else:
                answers[i] = failed
        return kept

    def over_context(self, prompt_tokens: int) -> Answer | None:
        """A failed Answer when a prompt leaves no room to answer within the context: beyond it
        the model reads positions it never learned and writes garbage, so it is not asked."""
        limit = self.context_length()
        if limit is None or prompt_tokens < limit:
            return None
        return Answer("", finish="failed", detail=f"the prompt is {prompt_tokens} tokens, more than the model's "
                                                  f"context of {limit} tokens ({self.spec}); shorten the input")

    def _generate_batch(self, token_ids: list[list[int]], requests: list[Request]) -> list[str]:
        """Greedy (or per-request sampled) decoding of one batch, with our own loop rather than
        ``generate``: rows start from different cached prefixes, and finished rows leave the batch."""
        import torch
        from transformers import DynamicCache

        rows = len(token_ids)
        # At least the last prompt token is read anew: its logits choose the first answer token.
        hits = [self.prefix_cache.lookup(ids, len(ids) - 1) if self.prefix_cache else (0, None) for ids in token_ids]
        cached = [tokens for tokens, _ in hits]
        prefix_width = max(cached)
        suffix_width = max(len(ids) - tokens for ids, tokens in zip(token_ids, cached))
        # Row layout: [pad][cached prefix][pad][new prompt tokens]; the mask hides both pads and the
        # positions carry on from the prefix, so the holes change nothing for the model.
        mask = torch.zeros(rows, prefix_width + suffix_width, dtype=torch.long)
        input_ids = torch.full((rows, suffix_width), self.tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros(rows, suffix_width, dtype=torch.long)
        for row, (ids, tokens) in enumerate(zip(token_ids, cached)):
            new = len(ids) - tokens
            mask[row, prefix_width - tokens : prefix_width] = 1
            mask[row, mask.shape[1] - new :] = 1
            input_ids[row, suffix_width - new :] = torch.tensor(ids[tokens:])
            positions[row, suffix_width - new :] = torch.arange(tokens, len(ids))
        if prefix_width:
            layers, _, heads, _, head_dim = next(states for _, states in hits if states is not None).shape
            past = torch.zeros(layers, 2, rows, heads, prefix_width, head_dim, dtype=self.model.dtype, device=self.device)
            for row, (tokens, states) in enumerate(hits):
                if tokens:
                    past[:, :, row, :, prefix_width - tokens :] = states
            cache = DynamicCache(ddp_cache_data=[(past[layer, 0], past[layer, 1]) for layer in range(layers)])
        else:
            cache = DynamicCache(config=self.model.config)
        mask, input_ids, positions = mask.to(self.device), input_ids.to(self.device), positions.to(self.device)

        limits = [max(0, r.max_tokens) for r in requests]
        chooser = TokenChooser(requests)
        answers: list[list[int]] = [[] for _ in range(rows)]
        live = list(range(rows))  # the original row of each row of the batch
        done: set[int] = set()
        next_position = torch.tensor([len(ids) for ids in token_ids], device=self.device)
        logits = self._forward(input_ids, mask, positions, cache)
        if self.prefix_cache is not None:
            self._keep_prefixes(token_ids, cached, cache, mask.shape[1])
        for step in range(max(limits)):
            choices = chooser(logits, live).tolist()
            for row, token in zip(live, choices):
                if row in done:
                    continue
                if step >= limits[row] or token in self.stop_ids:
                    done.add(row)
                else:
                    answers[row].append(token)
            running = [row for row in live if row not in done]
            if not running or step + 1 >= max(limits[row] for row in running):
                break
            if 4 * (len(live) - len(running)) >= len(live):
                # Dropping finished rows copies the cache: worth it once a quarter of the batch idles.
                keep = torch.tensor([index for index, row in enumerate(live) if row not in done], device=self.device)
                cache.batch_select_indices(keep)
                mask, next_position = mask[keep], next_position[keep]
                choices = [choices[index] for index in keep.tolist()]
                live = running
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            step_ids = torch.tensor(choices, device=self.device).unsqueeze(1)
            logits = self._forward(step_ids, mask, next_position.unsqueeze(1), cache)
            next_position += 1
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]

    def _forward(self, input_ids, mask, positions, cache):
        """Logits ``[rows, vocab]`` of each row's last position; ``cache`` (a DynamicCache) grows in place."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if getattr(output, "cache", None) is not cache:
            # transformers before 5.24 knows the argument as ``past_key_values`` and would leave this
            # cache empty: every step would see only its newest token and answer garbage.
            raise BackendError(f"{self.spec}: the model did not use the key/value cache it was given; "
                               "funnelqa needs transformers>=5.24")
        return output.logits[:, -1, :]

    def _keep_prefixes(self, token_ids: list[list[int]], cached: list[int], cache, width: int) -> None:
        """Store the new whole blocks of every prompt: they sit at the right end of its row."""
        import torch

        for row, (ids, tokens) in enumerate(zip(token_ids, cached)):
            whole = (len(ids) // self.prefix_cache.block) * self.prefix_cache.block
            if whole <= tokens:
                continue
            first = width - (len(ids) - tokens)
            columns = slice(first, first + whole - tokens)
            states = torch.stack(
                [torch.stack([layer.keys[row, :, columns], layer.values[row, :, columns]]) for layer in cache.layers]
            )
            self.prefix_cache.store(ids, tokens, states)

    def close(self) -> None:
        """Drop the model, so its memory can be freed; generating afterwards fails."""
        self.model = None


class TokenChooser:
    """Picks each row's next token by its own request: greedy at temperature 0, else sampled with a
    generator seeded by ``request.seed``, so an answer does not depend on which other requests share
    its batch or when they leave it."""

    def __init__(self, requests: Sequence[Request]):
        self.temperatures = [r.temperature for r in requests]
        self.seeds = [r.seed for r in requests]
        self.generators: dict[int, object] = {}

    def __call__(self, logits, rows: list[int]):
        import torch

        choices = logits.argmax(dim=-1)
        for index, row in enumerate(rows):
            temperature = self.temperatures[row]
            if temperature > 0:
                generator = self.generators.get(row)
                if generator is None:
                    generator = torch.Generator(device=logits.device).manual_seed(self.seeds[row])
                    self.generators[row] = generator
                probabilities = torch.softmax(logits[index].float() / temperature, dim=-1)
                choices[index] = torch.multinomial(probabilities, 1, generator=generator)[0]
        return choices
