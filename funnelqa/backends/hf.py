"""transformers backend: ``hf:PATH[+ADAPTER]`` (a model directory or a .gguf file, optionally with a
peft adapter). Batched generation with left padding; prompts built with the model's chat template.

``json_schema`` is not enforced: the prompts already ask for JSON and ``render.extract_json``
tolerates chatter around it, while constrained decoding would cost more than these models gain.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from funnelqa import models
from funnelqa.backends import Backend, BackendOptions, Request
from funnelqa.errors import BackendError


class HFBackend(Backend):
    kind = "hf"

    def __init__(self, model_spec: models.ModelSpec, options: BackendOptions):
        import torch

        self.model_spec = model_spec
        self.spec = str(model_spec)
        device = options.device or models.default_device()
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # torch counts physical cores; in a container the CPUs we may actually use can differ.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.model, self.tokenizer = models.load_causal_lm(
            model_spec, device=device, dtype=options.dtype, padding_side="left"
        )
        self.device = device
        self.batch_size = max(1, options.batch_size)
        self.stop_ids = models.stop_token_ids(self.tokenizer, self.model.generation_config)
        self._fingerprint = models.fingerprint(model_spec)

    @classmethod
    def from_spec(cls, arg: str, options: BackendOptions) -> HFBackend:
        return cls(models.parse_model_spec(f"{cls.kind}:{arg}"), options)

    @property
    def cache_id(self) -> str:
        return f"{self.model_spec}#{self._fingerprint}"

    def render(self, request: Request) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in request.messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises its own errors (e.g. a template that rejects a role)
            raise BackendError(f"{self.spec}: the chat template cannot render this request: {exc}") from None

    def generate(self, requests: Sequence[Request]) -> list[str]:
        if not requests:
            return []
        prompts = [self.render(r) for r in requests]
        # Templates already contain the special tokens they want (e.g. Gemma's <bos>).
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        # Similar lengths in one batch waste less compute on padding.
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        answers = [""] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            texts = self._generate_batch([encoded[i] for i in chunk], [requests[i] for i in chunk])
            for i, text in zip(chunk, texts):
                answers[i] = text
        return answers

    def _generate_batch(self, token_ids: list[list[int]], requests: list[Request]) -> list[str]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        batch = self.tokenizer.pad({"input_ids": token_ids}, padding=True, return_tensors="pt").to(self.device)
        prompt_length = batch["input_ids"].shape[1]
        limits = [max(0, r.max_tokens) for r in requests]
        chooser = PerRequestChoice(requests, limits, prompt_length, self.stop_ids[0] if self.stop_ids else None)
        config = GenerationConfig(
            max_new_tokens=max(1, *limits),
            do_sample=False,  # PerRequestChoice samples; generate then takes its single choice
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            output = self.model.generate(
                **batch, generation_config=config, logits_processor=LogitsProcessorList([chooser])
            )
        texts = []
        for row, limit in zip(output[:, prompt_length:].tolist(), limits):
            row = row[:limit]
            for position, token_id in enumerate(row):
                if token_id in self.stop_ids:
                    row = row[:position]
                    break
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def close(self) -> None:
        self.model = None


class PerRequestChoice:
    """Picks each row's next token by its own request: greedy at temperature 0, else sampled with a
    generator seeded by ``request.seed``, so an answer does not depend on which other requests share
    its batch. Rows past their own ``max_tokens`` are ended with eos, which stops them early."""

    def __init__(self, requests: Sequence[Request], limits: list[int], prompt_length: int, eos_id: int | None):
        self.temperatures = [r.temperature for r in requests]
        self.seeds = [r.seed for r in requests]
        self.limits = limits
        self.prompt_length = prompt_length
        self.eos_id = eos_id
        self.generators: dict[int, object] = {}

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_length
        choices = scores.argmax(dim=-1)
        for row, temperature in enumerate(self.temperatures):
            if self.eos_id is not None and step >= self.limits[row]:
                choices[row] = self.eos_id
            elif temperature > 0:
                generator = self.generators.get(row)
                if generator is None:
                    generator = torch.Generator(device=scores.device).manual_seed(self.seeds[row])
                    self.generators[row] = generator
                probabilities = torch.softmax(scores[row].float() / temperature, dim=-1)
                choices[row] = torch.multinomial(probabilities, 1, generator=generator)[0]
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, choices.unsqueeze(1), 0.0)
        return chosen
