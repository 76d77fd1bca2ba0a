"""Options and error handling shared by the subcommands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from funnelqa.errors import FunnelQAError
from funnelqa.redact import redact

INPUT = typer.Argument("-", help="JSONL input: a path, or '-' for stdin.", show_default=True)
OUT = typer.Option(None, "--out", "-o", help="Write here (atomically, resumable) instead of stdout.")
SKIP_INVALID = typer.Option(False, "--skip-invalid", help="Report bad input lines on stderr and skip them instead of stopping.")
NO_CACHE = typer.Option(False, "--no-cache", help="Do not read or write the on-disk LLM cache.")
CONCURRENCY = typer.Option(8, "--concurrency", min=1, help="Requests in flight at once (HTTP backends).")
TIMEOUT = typer.Option(60.0, "--timeout", min=0.1, help="Seconds before one HTTP request is abandoned and retried.")
BATCH_SIZE = typer.Option(16, "--batch-size", min=1, help="Prompts per batched generate call.")
DTYPE = typer.Option(
    "auto", "--dtype", help="Weights of hf:/local models: auto (bf16 where the GPU or CPU has bf16 arithmetic), float32, bfloat16, float16."
)

MODEL_HELP = (
    "Model spec: local[:smollm2-135m|gemma3-270m] (embedded, offline), hf:PATH[+ADAPTER], "
    "gemini:MODEL (GEMINI_API_KEY), openai:MODEL@BASE_URL, fake:SCRIPT.json."
)


def out_path(value: Optional[Path]) -> Optional[Path]:
    """``--out`` for the library: None (write stdout) when not given or '-', else the path."""
    return None if value is None or str(value) == "-" else value


def backend_options(concurrency: int = 8, timeout: float = 60.0, batch_size: int = 16, dtype: str = "auto"):
    """BackendOptions from the shared --concurrency, --timeout (seconds per HTTP request),
    --batch-size and --dtype options; every other knob keeps its default."""
    from funnelqa.backends import BackendOptions

    return BackendOptions(concurrency=concurrency, timeout=timeout, batch_size=batch_size, dtype=dtype)


def run(action: Callable[[], Any]) -> Any:
    """Run a library call; a FunnelQAError becomes one line on stderr and its exit code."""
    try:
        return action()
    except FunnelQAError as exc:
        print(f"funnelqa: error: {redact(str(exc))}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("funnelqa: interrupted; finished records are kept, re-run to resume", file=sys.stderr)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`); nothing left to say.
        sys.stderr.close()
        raise typer.Exit(141) from None
