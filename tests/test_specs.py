import pytest

from funnelqa.backends import load_backend, parse_spec
from funnelqa.errors import UsageError


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("local", ("local", "")),
        ("local+runs/q", ("local", "+runs/q")),  # the README's form for a fine-tuned embedded model
        ("local:gemma3-270m+runs/q", ("local", "gemma3-270m+runs/q")),
        ("hf:/models/base+/runs/q", ("hf", "/models/base+/runs/q")),
        ("openai:qwen@http://localhost:8000/v1", ("openai", "qwen@http://localhost:8000/v1")),
    ],
)
def test_spec_prefix_picks_the_backend(spec, expected):
    assert parse_spec(spec) == expected


def test_unknown_prefix_lists_the_known_ones():
    with pytest.raises(UsageError, match="use one of gemini:..., openai:..., hf:..., local:..., fake:..."):
        load_backend("llama:7b")
