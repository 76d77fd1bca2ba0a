"""The embedded default model: ``local`` / ``local:smollm2-135m`` / ``local:gemma3-270m``, each
optionally ``+ADAPTER``. The GGUF inside a PyPI package is converted once (see funnelqa.models);
everything after that is the hf backend."""

from __future__ import annotations

from funnelqa.backends.hf import HFBackend


class LocalBackend(HFBackend):
    kind = "local"
