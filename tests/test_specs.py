from pathlib import Path

import pytest

from funnelqa.backends import ModelSpec
from funnelqa.errors import UsageError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("local", ModelSpec("local")),
        ("local+runs/q", ModelSpec("local", adapter=Path("runs/q"))),  # the README's form for a fine-tuned embedded model
        ("local:gemma3-270m+runs/q", ModelSpec("local", "gemma3-270m", Path("runs/q"))),
        ("hf:/models/base+/runs/q", ModelSpec("hf", "/models/base", Path("/runs/q"))),
        ("openai:qwen@http://localhost:8000/v1", ModelSpec("openai", "qwen", base_url="http://localhost:8000/v1")),
        ("gemini:gemini-2.0-flash", ModelSpec("gemini", "gemini-2.0-flash")),
        ("fake:rules+more.json", ModelSpec("fake", "rules+more.json")),  # '+' starts an adapter only for hf and local
    ],
)
def test_spec_prefix_picks_the_backend(text, expected):
    spec = ModelSpec.parse(text)
    assert spec == expected
    assert str(spec) == text and ModelSpec.parse(str(spec)) == spec


def test_unknown_prefix_lists_the_known_ones():
    with pytest.raises(UsageError, match="use one of gemini:..., openai:..., hf:..., local:..., fake:..."):
        ModelSpec.parse("llama:7b")


@pytest.mark.parametrize("text, message", [
    ("hf:", "names no path"),
    ("local+", "names no adapter directory"),
    ("gemini+runs/q:flash", "only hf:PATH and local specs take"),
])
def test_malformed_specs_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        ModelSpec.parse(text)


def test_a_key_in_a_base_url_is_kept_for_use_and_masked_for_show():
    spec = ModelSpec.parse("openai:m@http://user:sk-SECRET@host/v1")
    assert spec.base_url == "http://user:sk-SECRET@host/v1"
    assert spec.redacted() == "openai:m@http://***@host/v1"
    assert "SECRET" not in repr(spec)
