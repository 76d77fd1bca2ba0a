"""The experiment driver end to end on a tiny model: every stage runs, the report has every
system, and a second run redoes nothing."""

import json

from tests.conftest import EXAMPLES, run_cli
from tests.tiny import make_tiny_model


def test_experiment_runs_every_stage_then_reruns_from_its_stamps(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    config = tmp_path / "tiny.toml"
    config.write_text(f'''
name = "tiny"
forward = "{EXAMPLES / 'forward.jsonl'}"
base = "hf:{model}"
forms = ["qa"]
plots = "{tmp_path / 'plots'}"
[split]
max_users = 8
test_users = 2
dev_fraction = 0.2
[train.common]
batch_size = 2
max_steps = 2
save_every = 0
[simulate]
max_questions = 2
''')
    root = tmp_path / "run"
    first = run_cli("experiment", config, "--root", root)
    assert first.returncode == 0, first.stderr
    report = (root / "report.md").read_text()
    for system in ("base questioner / base simulator [qa]", "fine-tuned questioner / fine-tuned simulator [qa]",
                   "oracle / fine-tuned simulator", "oracle-shuffled / fine-tuned simulator"):
        assert f"| {system} | 2 |" in report
    scores = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6
    assert (tmp_path / "plots" / "curves.png").exists()

    second = run_cli("experiment", config, "--root", root)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("done before, skipped") == 10  # corrupt, 2 trainings, 6 simulations, score
    assert "| train-simulator | cached |" in (root / "report.md").read_text()
