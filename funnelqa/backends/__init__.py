"""Model backends: one small protocol, batch in and batch out.

A backend is chosen by a spec string, read once into a ``ModelSpec``:
``local[:NAME][+ADAPTER]``, ``hf:PATH[+ADAPTER]``, ``gemini:MODEL``, ``openai:MODEL@BASE_URL`` or
``fake:SCRIPT``. The registry maps the spec's backend name to ``module:Class`` and imports it
lazily, so ``funnelqa --help`` never pulls in torch; the class builds itself with ``from_spec``.
Stages only call ``generate``; they never look at which backend they hold.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from funnelqa.errors import BackendError, UsageError
from funnelqa.redact import redact

REGISTRY: dict[str, str] = {
    "gemini": "funnelqa.backends.gemini:GeminiBackend",
    "openai": "funnelqa.backends.openai_compat:OpenAIBackend",
    "hf": "funnelqa.backends.hf:HFBackend",
    "local": "funnelqa.backends.hf:HFBackend",
    "fake": "funnelqa.backends.fake:FakeBackend",
}
# The backends that load weights themselves, and so can put a peft adapter on them.
ADAPTER_BACKENDS = ("hf", "local")
OPENAI_FORM = "openai:MODEL@BASE_URL, e.g. openai:qwen2.5-7b-instruct@http://localhost:8000/v1"


@dataclass(frozen=True, repr=False)
class ModelSpec:
    """A model spec, read once: which backend, and what it loads.

    ``backend`` is a REGISTRY name. ``model`` is the embedded model's name for ``local`` ("" for
    the default one), a path for ``hf`` (a model directory or a .gguf file) and ``fake`` (its
    script), the API's model name for ``gemini`` and ``openai``. ``adapter`` is a peft adapter
    directory (``hf`` and ``local`` only); ``base_url`` the server of an ``openai`` spec, as written.
    ``str()`` gives the spec back in a form ``parse`` reads to an equal value, any key written
    into the base URL included; ``redacted()`` is the form to show, log or store.
    """

    backend: str
    model: str = ""
    adapter: Path | None = None
    base_url: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Read a spec string; UsageError, naming the spec's right form, when it names nothing loadable.

        For ``hf`` and ``local`` the first ``+`` starts the adapter (``local+runs/q`` names the
        default embedded model with an adapter); other backends take the rest of the text whole.
        Whether the files, packages and keys a spec needs exist is the backend's to find out.
        """
        name = cls.backend_of(text)
        if name not in REGISTRY:
            known = ", ".join(f"{key}:..." for key in REGISTRY)
            raise UsageError(f"unknown model spec {redact(text)!r}; use one of {known}")
        rest = text[len(name) :]
        if name in ADAPTER_BACKENDS:
            base, plus, adapter = rest.partition("+")
            if plus and not adapter:
                raise UsageError(f"model spec {redact(text)!r} ends with '+' but names no adapter directory")
            spec = cls(name, base.removeprefix(":"), Path(adapter) if adapter else None)
            if name == "hf" and not spec.model:
                raise UsageError(f"model spec {redact(text)!r} names no path; use hf:PATH (a model directory or a .gguf file)")
            return spec
        if rest.startswith("+"):
            raise UsageError(f"model spec {redact(text)!r}: only hf:PATH and local specs take +ADAPTER_DIR")
        model = rest.removeprefix(":")
        if name == "gemini" and not model:
            raise UsageError("the gemini backend needs a model name, e.g. gemini:gemini-2.0-flash")
        if name == "openai":
            model, _, base_url = model.partition("@")
            if not model or not base_url:
                raise UsageError(f"an OpenAI-compatible backend is written {OPENAI_FORM}")
            if not base_url.startswith(("http://", "https://")):
                raise UsageError(f"the base URL {redact(base_url)!r} must start with http:// or https://; write {OPENAI_FORM}")
            return cls(name, model, base_url=base_url)
        return cls(name, model)

    @staticmethod
    def backend_of(text: str) -> str:
        """The backend name a spec string starts with (everything before its first ':' or '+'),
        whether or not it is a known one."""
        ends = [i for i in (text.find(":"), text.find("+")) if i >= 0]
        return text[: min(ends)] if ends else text

    def __str__(self) -> str:
        text = f"{self.backend}:{self.model}" if self.model else self.backend
        if self.base_url is not None:
            text += f"@{self.base_url}"
        return f"{text}+{self.adapter}" if self.adapter else text

    def __repr__(self) -> str:
        return f"ModelSpec.parse({self.redacted()!r})"

    def redacted(self) -> str:
        """``str(self)`` with credentials written into its URL masked (``funnelqa.redact``)."""
        return redact(str(self))


@dataclass(frozen=True)
class Request:
    """One chat completion: messages plus the options that change the answer."""

    messages: tuple[dict[str, str], ...]
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    json_schema: dict[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def chat(cls, system: str | None, user: str, **options: Any) -> Request:
        """A one-turn chat: a system message unless ``system`` is empty, then ``user``. ``options``
        are the other fields: max_tokens (new tokens at most), temperature, seed, json_schema."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return cls(messages=tuple(messages), **options)

    def payload(self) -> dict[str, Any]:
        """Every field as plain JSON (messages a list of ``{"role", "content"}``): what
        ``cache.cache_key`` hashes, so two requests share a cached answer only if all fields agree."""
        data = asdict(self)
        data["messages"] = [dict(m) for m in self.messages]
        return data


class Answer(str):
    """A model's reply text, plus how the reply ended when that was not a plain, complete stop.

    A plain ``str`` from a backend means a complete answer. ``finish`` is one of:
    "stop" (complete), "length" (cut at the token budget), "blocked" (a safety filter refused the
    prompt or the answer), "empty" (no text, no stated reason) and "failed" (no answer at all:
    the calls failed for good after their retries). ``detail`` names the cause in the API's own
    terms, e.g. "finishReason MAX_TOKENS at maxOutputTokens=32".
    """

    finish: str
    detail: str

    def __new__(cls, text: str = "", finish: str = "stop", detail: str = "") -> Answer:
        answer = super().__new__(cls, text)
        answer.finish = finish
        answer.detail = detail
        return answer


def raise_failures(answers: list[str]) -> list[str]:
    """``answers`` unchanged, or BackendError naming the first that failed for good (``generate``'s contract)."""
    failed = [a for a in answers if getattr(a, "finish", "stop") == "failed"]
    if failed:
        more = f" (and {len(failed) - 1} more of {len(answers)} requests)" if len(failed) > 1 else ""
        raise BackendError(f"{failed[0].detail}{more}")
    return answers


def answer_status(answer: str) -> tuple[str, str]:
    """(finish, detail) of any backend's answer; blank text that claims a stop counts as "empty"."""
    finish = getattr(answer, "finish", "stop")
    detail = getattr(answer, "detail", "")
    if finish == "stop" and not answer.strip():
        return "empty", detail or "the model answered with no text"
    return finish, detail


@dataclass
class BackendOptions:
    """Knobs a backend may use; each takes the ones that mean something to it."""

    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None
    # Memory for the states of prompt prefixes kept between calls (hf, local); None: a quarter of the device's.
    prefix_cache_mb: int | None = None


class Backend(ABC):
    """The protocol every model implements: ``generate`` answers a batch of Requests, one string
    per request, in order; nothing else is required.

    ``spec``: the spec the backend was built from, redacted; shown in messages and, unless a
    backend knows better, its cache identity. ``batch_size``: how many requests a stage should
    hand over at once, large enough to keep the model busy and small enough that a crash loses
    little (answers are cached per batch).
    """

    spec: str = ""
    batch_size: int = 16

    @classmethod
    def from_spec(cls, spec: ModelSpec, options: BackendOptions) -> Backend:
        """The backend ``spec`` names (a REGISTRY entry points at this class), set up with the
        ``options`` that mean something to it. Raises BackendUnavailable when what it needs (a
        package, file, key or server) is missing. Every class in REGISTRY implements it; a backend
        that wraps another (``CachedBackend``) is built from that one instead."""
        raise NotImplementedError(f"{cls.__name__} is not built from a model spec")

    @property
    def cache_id(self) -> str:
        """Identity of the model for the cache: two backends with the same id answer alike."""
        return self.spec

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[str]:
        """Answer every request, in order; raise BackendError if one of them fails for good."""

    def generate_each(self, requests: Sequence[Request], on_answer: Callable[[int, str], None] | None = None) -> list[str]:
        """``generate`` for callers that handle failures per request.

        A request that fails for good comes back as an ``Answer`` with finish "failed" instead of
        raising, so its batch-mates keep their answers; each answer goes to ``on_answer(index,
        answer)`` the moment it arrives. Only a fault that stops every request (no server, a
        rejected key) raises.
        """
        answers = self.generate(requests)
        for index, answer in enumerate(answers):
            if on_answer is not None:
                on_answer(index, answer)
        return answers

    def forget(self, requests: Sequence[Request]) -> None:
        """The answers to ``requests`` proved unusable: do not serve them again (a cache drops them)."""

    def counters(self) -> dict[str, int]:
        """Counts for the stage summary, e.g. {"calls": 40, "from_cache": 12, "http_retries": 3}."""
        return {}

    def close(self) -> None:
        """Let go of what the backend holds (connections, model weights); it answers no more
        requests afterwards. The default holds nothing."""


def load_backend(spec: ModelSpec, options: BackendOptions | None = None) -> Backend:
    """The backend ``spec`` names; its module is imported only now, so torch stays out of ``--help``."""
    module_name, _, class_name = REGISTRY[spec.backend].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_spec(spec, options or BackendOptions())


class CachedBackend(Backend):
    """Serves repeated requests from the on-disk cache and stores each new answer as it arrives.

    Only complete answers are served again: a reply that was blocked, cut, empty or later found
    unusable (``forget``) is asked again on the next run, and counted in ``refreshed``.
    """

    def __init__(self, inner: Backend, cache):
        self.inner = inner
        self.cache = cache
        self.spec = inner.spec
        self.batch_size = inner.batch_size
        self.calls = 0
        self.hits = 0
        self.refreshed = 0

    @property
    def cache_id(self) -> str:
        """The inner backend's: a cache in front of a model does not change its answers."""
        return self.inner.cache_id

    def _keys(self, requests: Sequence[Request]) -> list[str]:
        from funnelqa.cache import cache_key

        return [cache_key(self.inner.cache_id, r.payload()) for r in requests]

    def generate(self, requests: Sequence[Request]) -> list[str]:
        """``generate_each``, then BackendError for the first request that failed for good; the
        answers that did arrive are cached before it is raised, so a re-run buys only the rest."""
        return raise_failures(self.generate_each(requests))

    def generate_each(self, requests: Sequence[Request], on_answer: Callable[[int, str], None] | None = None) -> list[str]:
        """Complete cached answers are served without a call; the rest go to the inner backend in
        chunks of its ``batch_size``, identical requests asked once, and each answer is stored as
        it arrives (a failed one is not stored). ``on_answer`` gets every answer, in request
        order, once all are in. Raises what the inner backend raises for a fault that stops
        every request (BackendUnavailable)."""
        keys = self._keys(requests)
        found, stale = self.cache.lookup(keys)
        missing = [i for i, key in enumerate(keys) if key not in found]
        self.hits += len(requests) - len(missing)
        unique: dict[str, int] = {}
        for i in missing:
            unique.setdefault(keys[i], i)
        self.refreshed += sum(key in stale for key in unique)
        step = max(1, self.inner.batch_size)
        items = list(unique.items())
        for start in range(0, len(items), step):
            chunk = items[start : start + step]

            def arrived(index: int, answer: str, chunk=chunk) -> None:
                key = chunk[index][0]
                found[key] = answer
                # Stored the moment it arrives: a crash or a failed batch-mate loses nothing bought.
                self.cache.put_many(self.inner.cache_id, [(key, answer)])

            self.inner.generate_each([requests[i] for _, i in chunk], arrived)
            self.calls += len(chunk)
        answers = [found[key] for key in keys]
        if on_answer is not None:
            for index, answer in enumerate(answers):
                on_answer(index, answer)
        return answers

    def forget(self, requests: Sequence[Request]) -> None:
        """Mark the stored answers to ``requests`` "unusable": kept in the file, asked again next time."""
        self.cache.mark_unusable(self._keys(requests))

    def counters(self) -> dict[str, int]:
        """``calls`` (requests the model was asked), ``from_cache`` (served from the file),
        ``refreshed`` (stored failures asked again), then the inner backend's counters."""
        return {"calls": self.calls, "from_cache": self.hits, "refreshed": self.refreshed, **self.inner.counters()}

    def close(self) -> None:
        """Close the inner backend, then the cache's SQLite connection."""
        self.inner.close()
        self.cache.close()


def open_backend(spec: ModelSpec, options: BackendOptions | None = None, *, use_cache: bool = True, cache_path=None) -> Backend:
    """The backend ``spec`` names, wrapped in the shared on-disk cache unless told otherwise."""
    backend = load_backend(spec, options)
    if not use_cache:
        return backend
    from funnelqa.cache import LLMCache

    return CachedBackend(backend, LLMCache(cache_path))
