"""Run by the tests under `accelerate launch`: train like `funnelqa train-*`, then crash after a step.

    accelerate launch --config_file CONFIG tests/train_until.py EXAMPLES STEP OPTIONS_JSON

The main process raises right after reporting step STEP (so after any checkpoint of that step),
as a kill would; the launcher then stops the other processes. OPTIONS_JSON: TrainConfig's fields.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from funnelqa.training import Trainer, TrainConfig  # noqa: E402


def main() -> None:
    examples, stop_after, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

    def crash(report) -> None:
        if report.step == stop_after:
            raise SystemExit(f"train_until: stopped after step {stop_after}")

    Trainer(TrainConfig(**options), examples).run(on_step=crash, show_progress=False)


if __name__ == "__main__":
    main()
