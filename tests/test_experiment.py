"""The experiment driver end to end on a tiny model: every stage runs, the report has every
system, and a second run redoes nothing."""

import json
import sys

import pytest

from funnelqa.experiment import Stage

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
grid = ["qa"]
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

    # Adding a profile form to a finished run trains and interviews only that form (make paper-ablation).
    third = run_cli("experiment", config, "--root", root, "--forms", "qa,answers")
    assert third.returncode == 0, third.stderr
    assert third.stderr.count("done before, skipped") == 9
    report = (root / "report.md").read_text()
    assert "| fine-tuned questioner / fine-tuned simulator [answers] | 2 |" in report
    assert "base questioner / base simulator [answers]" not in report

    wrong = run_cli("experiment", config, "--root", root, "--forms", "qa,dialogue")
    assert wrong.returncode != 0
    assert "unknown profile form(s) 'dialogue'" in wrong.stderr



class ScriptStage(Stage):
    """A stage that runs a few lines of Python instead of a funnelqa command: it fails if an input
    is not there yet, and exits 3 when told to ``fail``."""

    def __init__(self, name, tmp_path, inputs=(), fail=False, processes=1):
        super().__init__(name, ["--script", name], tmp_path / f"{name}.txt", list(inputs), processes=processes)
        self.fail = fail
        self.journal = tmp_path / "journal.txt"

    @property
    def argv(self):
        code = (f"import sys, pathlib, time\n"
                f"journal = open({str(self.journal)!r}, 'a')\n"
                f"journal.write({self.name!r} + ' start\\n'); journal.flush()\n"
                f"for path in {[str(p) for p in self.inputs]!r}:\n"
                f"    assert pathlib.Path(path).exists(), path + ' is not there yet'\n"
                f"{'sys.exit(3)' if self.fail else ''}\n"
                f"time.sleep(0.2)\n"
                f"journal.write({self.name!r} + ' end\\n'); journal.flush()\n"
                f"pathlib.Path({str(self.output)!r}).write_text('ok')\n")
        return [sys.executable, "-c", code]


def test_stages_run_at_once_each_after_its_inputs_and_a_failure_keeps_the_finished(tmp_path):
    from funnelqa.errors import FunnelQAError
    from funnelqa.experiment import Experiment, run_stages

    exp = Experiment(tmp_path / "x.toml", {}, tmp_path)
    first = ScriptStage("first", tmp_path)
    then = ScriptStage("then", tmp_path, inputs=[first.output])  # fails if started before `first` ends
    alone = ScriptStage("alone", tmp_path)
    run_stages(exp, [then, first, alone], jobs=2)
    assert sorted(run.name for run in exp.stages if not run.cached) == ["alone", "first", "then"]
    assert (tmp_path / "logs" / "then.log").exists()

    # `fresh` runs beside `broken` and finishes whichever ends first; what needs `broken` never starts.
    exp = Experiment(tmp_path / "x.toml", {}, tmp_path)
    broken = ScriptStage("broken", tmp_path, fail=True)
    after_broken = ScriptStage("after-broken", tmp_path, inputs=[broken.output])
    fresh = ScriptStage("fresh", tmp_path)
    with pytest.raises(FunnelQAError, match=r"stage broken failed \(exit 3\); its log: .*broken\.log"):
        run_stages(exp, [broken, after_broken, fresh], jobs=2)
    assert (tmp_path / "fresh.txt").exists() and not (tmp_path / "after-broken.txt").exists()
    assert [run.name for run in exp.stages] == ["fresh"]

    # Nothing new starts after a failure, not even a stage that needs nothing from the failed one.
    exp = Experiment(tmp_path / "x.toml", {}, tmp_path)
    queued = ScriptStage("queued", tmp_path)
    with pytest.raises(FunnelQAError, match="stage broken failed"):
        run_stages(exp, [broken, queued], jobs=1)
    assert exp.stages == [] and not (tmp_path / "queued.txt").exists()


def test_a_stage_of_several_processes_gets_every_slot_and_nothing_later_jumps_ahead(tmp_path):
    from funnelqa.experiment import Experiment, run_stages

    def order(folder, make):
        folder.mkdir()
        stages = make(folder)
        run_stages(Experiment(folder / "x.toml", {}, folder), stages, jobs=2)
        return stages[0].journal.read_text().split("\n")[:-1]

    # Ready while `first` holds one of the two slots: it waits for both, and `later` waits behind it.
    assert order(tmp_path / "ready", lambda d: [
        ScriptStage("first", d), ScriptStage("big", d, processes=2), ScriptStage("later", d),
    ]) == ["first start", "first end", "big start", "big end", "later start", "later end"]

    # Not ready yet (it needs `first`): `later` still does not take the free slot in the meantime.
    def waiting(d):
        first = ScriptStage("first", d)
        return [first, ScriptStage("big", d, inputs=[first.output], processes=2), ScriptStage("later", d)]

    assert order(tmp_path / "waiting", waiting) == [
        "first start", "first end", "big start", "big end", "later start", "later end",
    ]


def test_a_stage_finished_by_another_command_is_redone_from_scratch_not_resumed(tmp_path):
    """simulate keeps a finished interview and a training its finished adapter: resuming from what
    another command made would report stale results, so the driver removes it first."""
    from funnelqa.experiment import Experiment, run_stages

    stage = ScriptStage("train", tmp_path)
    stage.product = tmp_path / "adapter"
    stage.product.mkdir()
    run_stages(Experiment(tmp_path / "x.toml", {}, tmp_path), [stage], jobs=1)
    (stage.product / "from-the-first-run").write_text("stale")

    changed = ScriptStage("train", tmp_path)
    changed.product = stage.product
    changed.args = [*changed.args, "--lr", "1e-4"]
    exp = Experiment(tmp_path / "x.toml", {}, tmp_path)
    run_stages(exp, [changed], jobs=1)
    assert [(run.name, run.cached) for run in exp.stages] == [("train", False)]
    assert not stage.product.exists() and stage.output.read_text() == "ok"

    # A stage a crash cut short has no stamp: its partial output stays, for the stage to resume from.
    crashed = ScriptStage("crashed", tmp_path)
    crashed.output.write_text("partial")
    from funnelqa.experiment import clear_stale
    assert not clear_stale(crashed) and crashed.output.read_text() == "partial"


def test_training_resumes_a_crashed_run_without_changing_its_command():
    stage = Stage("train-simulator", ["train-simulator", "x.jsonl"], None, [], resume=("--resume",))
    assert stage.argv[-1] == "--resume" and "--resume" not in stage.command


def test_a_rerun_skips_a_chain_of_finished_stages_at_any_jobs(tmp_path):
    from funnelqa.experiment import Experiment, run_stages

    first = ScriptStage("first", tmp_path)
    then = ScriptStage("then", tmp_path, inputs=[first.output])
    last = ScriptStage("last", tmp_path, inputs=[then.output])
    run_stages(Experiment(tmp_path / "x.toml", {}, tmp_path), [first, then, last], jobs=1)
    for jobs in (1, 2):
        exp = Experiment(tmp_path / "x.toml", {}, tmp_path)
        run_stages(exp, [first, then, last], jobs=jobs)
        assert [(run.name, run.cached) for run in exp.stages] == [("first", True), ("then", True), ("last", True)]


def test_training_on_several_processes_keeps_the_step_and_shares_its_micro_batches(tmp_path):
    """[train] processes = 2: each training stage is one accelerate launch of 2 processes, each
    running grad_accum / 2 micro-batches of a step; the run card says so, the report shows the launch."""
    model = make_tiny_model(tmp_path / "tiny")
    config = tmp_path / "tiny.toml"
    body = f'''
name = "tiny"
forward = "{EXAMPLES / 'forward.jsonl'}"
base = "hf:{model}"
forms = ["qa"]
grid = []
oracles = ["oracle"]
plots = "{tmp_path / 'plots'}"
[split]
max_users = 8
test_users = 2
dev_fraction = 0.2
[train]
processes = 2
[train.common]
batch_size = 1
grad_accum = GRAD_ACCUM
max_steps = 2
save_every = 0
[simulate]
max_questions = 2
'''
    config.write_text(body.replace("GRAD_ACCUM", "3"))
    odd = run_cli("experiment", config, "--root", tmp_path / "odd")
    assert odd.returncode != 0
    assert "grad_accum = 3 of the simulator is not a multiple of [train] processes = 2" in odd.stderr

    config.write_text(body.replace("GRAD_ACCUM", '"2"'))
    text = run_cli("experiment", config, "--root", tmp_path / "odd")
    assert text.returncode != 0 and "grad_accum of the simulator must be a whole number, at least 1, not '2'" in text.stderr

    for mistake, message in (
        ("[train]\nprocesses = 2\n", "unknown key(s) in [train]: batch_size, grad_accum"),  # options one table too high
        ("[train.common]\nprocesses = 2\n", "processes is set in [train] itself"),
    ):
        config.write_text(body.replace("GRAD_ACCUM", "2").replace("[train]\nprocesses = 2\n[train.common]\n", mistake))
        wrong = run_cli("experiment", config, "--root", tmp_path / "odd")
        assert wrong.returncode != 0 and message in wrong.stderr, wrong.stderr

    config.write_text(body.replace("GRAD_ACCUM", "2"))
    # A user's default accelerate config (here: one GPU) must not leak into the driver's launch.
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\ngpu_ids: '0'\nnum_machines: 1\n"
        "num_processes: 1\nmixed_precision: 'no'\nuse_cpu: false\n"
    )
    root = tmp_path / "run"
    result = run_cli("experiment", config, "--root", root, "--jobs", "2",
                     env={"CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(hf_home)})
    assert result.returncode == 0, result.stderr
    for adapter in ("simulator", "questioner-qa"):
        card = json.loads((root / adapter / "run_card.json").read_text())
        assert (card["processes"], card["effective_batch_size"], card["steps"]) == (2, 2, 2)
    report = (root / "report.md").read_text()
    assert "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --gpu_ids all" in report
    assert "--main_process_port 0 -m funnelqa train-simulator" in report
    assert "--grad-accum 1" in report and "--grad-accum 2" not in report
