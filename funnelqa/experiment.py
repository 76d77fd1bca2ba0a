"""The paper's experiment (Sec. 4.2) end to end, driven by one TOML config.

split (seeded, by user: test users vs training users, of which the trainer holds out a dev share) -> corrupt -> train-questioner (one adapter per profile form) ->
train-simulator -> simulate the 2x2 (questioner base/fine-tuned x simulator base/fine-tuned) per
profile form, plus the oracle and shuffled-oracle questioners -> score with plots -> report.

Every stage runs the real ``funnelqa`` command, so the report lists commands a user can paste.
A stage is skipped when its output exists and its stamp (the command plus the hashes of its
inputs) matches, so a re-run after a crash redoes nothing finished; simulate and training resume
from their own partial outputs. A stage whose command or inputs changed since it finished is
redone from scratch: its old output is removed first, never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnelqa import records
from rich.markup import escape

from funnelqa.console import stderr
from funnelqa.errors import FunnelQAError, UsageError
from funnelqa.redact import redact
from funnelqa.render import PROFILE_FORMS


@dataclass
class Stage:
    """One ``funnelqa ARGS`` command of the experiment.

    ``product`` is what later stages name among their ``inputs`` (an adapter folder, a file);
    ``output`` is the file whose presence (with a matching stamp) means the stage is done.
    """

    name: str
    args: list[str]
    output: Path
    inputs: list[Path]
    product: Path | None = None
    processes: int = 1
    resume: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.product = self.product or self.output

    @property
    def launcher(self) -> list[str]:
        """accelerate's launcher for a stage of several data-parallel processes (training), else
        nothing. --multi_gpu is torchrun underneath: it forms a gloo group on CPUs too
        (docs/training.md, "Devices and several processes"); port 0 asks for a free one."""
        if self.processes == 1:
            return []
        # Every setting a default accelerate config (accelerate config) could otherwise supply is
        # given, so a user's one-GPU or multi-machine default does not leak into the run.
        return ["launch", "--multi_gpu", "--num_processes", str(self.processes), "--num_machines", "1",
                "--gpu_ids", "all", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]

    @property
    def command(self) -> list[str]:
        """As a user would type it (the report lists it)."""
        if self.processes > 1:
            return ["accelerate", *self.launcher, "-m", "funnelqa", *self.args]
        return ["funnelqa", *self.args]

    @property
    def argv(self) -> list[str]:
        """As this process runs it: the same interpreter, whatever is on PATH, plus ``resume``
        (flags that make a re-run continue a crashed stage, e.g. training's --resume; not part of
        ``command``, so they do not change the stamp)."""
        if self.processes > 1:
            return [sys.executable, "-m", "accelerate.commands.accelerate_cli", *self.launcher, "-m", "funnelqa",
                    *self.args, *self.resume]
        return [sys.executable, "-m", "funnelqa", *self.args, *self.resume]


@dataclass
class StageRun:
    """What one stage did in this run: its command, wall seconds, and whether an earlier run had done it."""
    name: str
    command: list[str]
    seconds: float
    cached: bool


@dataclass
class Experiment:
    """One run of a config: the config as read, the run folder, and the stages run so far."""
    config_path: Path
    config: dict[str, Any]
    root: Path
    stages: list[StageRun] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The config's ``name``, else its file name without .toml."""
        return self.config.get("name", self.config_path.stem)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The TOML config at ``path`` as a dict (tomllib). UsageError when it is missing, is not
    TOML, or lacks ``forward``."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no experiment config at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if "forward" not in config:
        raise UsageError(f"{path}: the config needs 'forward' (a file of forward records)")
    return config


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file, or of a folder's top-level files (names and bytes, in name order).
    One running hash rather than models.file_sha256 per file: stamps of earlier runs stay valid."""
    digest = hashlib.sha256()
    # An adapter folder is its top-level files; stamps and checkpoints below it do not change it.
    targets = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for target in targets:
        digest.update(target.name.encode())
        with open(target, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def flags(options: dict[str, Any]) -> list[str]:
    """TOML keys become command-line flags: max_steps = 50 -> --max-steps 50."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def stamp_key(stage: Stage) -> str:
    """The command plus the hashes of its inputs: a stage is redone when either changes."""
    return hashlib.sha256(json.dumps([stage.command, [file_digest(p) for p in stage.inputs]]).encode()).hexdigest()


def stamp_path(stage: Stage) -> Path:
    """``.<output name>.stamp`` beside the stage's output: it holds stamp_key at completion."""
    return stage.output.parent / f".{stage.output.name}.stamp"


def is_done(stage: Stage) -> bool:
    """True when the output exists and its stamp matches this command and these inputs."""
    stamp = stamp_path(stage)
    return stage.output.exists() and stamp.exists() and stamp.read_text().strip() == stamp_key(stage)


def clear_stale(stage: Stage) -> bool:
    """For a stage that is not done (``is_done`` is False): remove what it made when it finished
    earlier, then with another command or other inputs (its stamp is there), so it is redone from
    scratch rather than resumed from a stale product (simulate would keep every finished interview,
    a training its finished adapter). Returns True when something was removed."""
    stamp = stamp_path(stage)
    if not stamp.exists():
        return False
    for made in (stage.product, stage.output):
        if made.is_dir():
            shutil.rmtree(made)
        else:
            made.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)
    return True


def core_slots(jobs: int) -> list[set[int] | None]:
    """The CPU cores each of ``jobs`` concurrent stages may use: disjoint, as equal as possible.

    Pinned, because OpenMP threads of two processes sharing cores stall each other. On this
    project's 2-core CPU two one-thread stages (or training processes) do more than one two-thread
    one: 1.2-1.4x (docs/training.md, "Stages at once"). With one job, or more jobs than cores,
    nothing is pinned.
    """
    cores = _cores()
    if cores is None or jobs == 1 or jobs > len(cores):
        return [None] * jobs
    return [set(cores[i::jobs]) for i in range(jobs)]


def _cores() -> list[int] | None:
    """The cores this process may run on, sorted; None without an affinity API (macOS: the OS
    places the processes)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None


def run_stages(exp: Experiment, stages: list[Stage], jobs: int = 1) -> None:
    """Run every stage not already done, at most ``jobs`` at a time, each once the stages that
    produce its inputs have finished; earlier stages in ``stages`` start first. A stage of N
    processes takes N slots (all, with fewer jobs), and no later stage starts while it waits, so
    a stage's producers must come before it in ``stages``.

    With one job a stage's progress goes to this terminal; with several, each stage writes its
    log to ``<root>/logs/<stage>.log`` and this prints when it starts and ends. A failed stage
    lets the running ones finish (their work is kept), starts nothing new, and raises
    FunnelQAError naming it and its log.
    """
    producers = {stage.product: stage for stage in stages}
    pending = list(stages)
    running: dict[subprocess.Popen, tuple[Stage, float, list[int], Path | None, Any]] = {}
    finished: set[str] = set()
    failures: list[str] = []
    free = list(range(jobs))
    slots = core_slots(jobs)
    while pending or running:
        # A stage done before frees no slot but may make others ready: look again until none is.
        skipped = True
        while skipped and free and not failures:
            skipped = False
            for stage in list(pending):
                if not all(producers[i].name in finished for i in stage.inputs if i in producers):
                    if stage.processes > 1:
                        break  # it will want every slot: later stages wait rather than hold one
                    continue
                if is_done(stage):
                    pending.remove(stage)
                    stderr.print(f"[dim]{escape(stage.name)}: done before, skipped[/]")
                    exp.stages.append(StageRun(stage.name, stage.command, 0.0, cached=True))
                    finished.add(stage.name)
                    skipped = True
                    continue
                # A stage of several processes takes as many slots; until they are free, no later
                # stage jumps ahead of it, or one-slot stages would keep taking them.
                need = min(stage.processes, jobs)
                if len(free) < need:
                    break
                pending.remove(stage)
                if clear_stale(stage):
                    stderr.print(f"[yellow]{escape(stage.name)}: its command or inputs changed since it finished: redone[/]")
                taken, free = free[:need], free[need:]
                cores = None if any(slots[i] is None for i in taken) else set().union(*(slots[i] for i in taken))
                process, log, handle = launch(exp, stage, cores, jobs)
                running[process] = (stage, time.perf_counter(), taken, log, handle)
        if not running:
            if pending and not failures:
                raise FunnelQAError("stages wait on inputs no stage produces: " + ", ".join(s.name for s in pending))
            break
        process = wait_any(running)
        stage, started, taken, log, handle = running.pop(process)
        if handle is not None:
            handle.close()
        free = sorted(free + taken)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            where = f"; its log: {log}" if log else ""
            failures.append(f"stage {stage.name} failed (exit {process.returncode}){where}")
            stderr.print(f"[red]{escape(failures[-1])}[/]")
            continue
        stamp_path(stage).write_text(stamp_key(stage) + "\n")
        exp.stages.append(StageRun(stage.name, stage.command, seconds, cached=False))
        finished.add(stage.name)
        if jobs > 1:
            stderr.print(f"{escape(stage.name)}: done in {seconds:.0f} s")
    if failures:
        raise FunnelQAError("; ".join(failures) + "; fix it and re-run: finished stages are kept")


def launch(exp: Experiment, stage: Stage, cores: set[int] | None, jobs: int):
    """Start ``stage`` (not waiting): pinned to ``cores`` when given, with its stderr in
    ``<root>/logs/`` when ``jobs`` > 1. Returns (process, log path or None, open log handle or None)."""
    env = dict(os.environ)
    preexec = None
    if cores is not None:
        # hf.py sizes torch's thread pool from the affinity mask; OMP_NUM_THREADS covers training.
        env["OMP_NUM_THREADS"] = str(max(1, len(cores) // stage.processes))
        preexec = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
    elif stage.processes > 1:
        # The processes share the cores, one thread each at least: threads of one process waiting
        # for each other cost more than they bring (docs/training.md, "Speed on this CPU").
        available = _cores()
        cores_count = len(available) if available else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores_count // stage.processes))
    log = handle = None
    if jobs > 1:
        log = exp.root / "logs" / (slug(stage.name) + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "w", encoding="utf-8")
        where = f" on cores {','.join(map(str, sorted(cores)))}" if cores is not None else ""
        stderr.print(f"[bold]{escape(stage.name)}[/]{where}: {escape(redact(shlex.join(stage.command)))} (log: {log})")
    else:
        stderr.print(f"[bold]{escape(stage.name)}[/]: {escape(redact(shlex.join(stage.command)))}")
    process = subprocess.Popen(stage.argv, stdout=subprocess.DEVNULL,
                               stderr=handle, env=env, preexec_fn=preexec)
    return process, log, handle


def wait_any(running: dict[subprocess.Popen, Any]) -> subprocess.Popen:
    """The first of ``running`` to exit (reaped)."""
    while True:
        for process in running:
            if process.poll() is not None:
                return process
        time.sleep(0.2)


def slug(label: str) -> str:
    """A file name for a label: "a / b [qa]" -> "a__b-qa"."""
    return label.replace(" / ", "__").replace(" ", "-").replace("[", "").replace("]", "").replace("+", "")


def split_test_users(exp: Experiment) -> dict[str, Path]:
    """Seeded split by user into test users (interviewed) and training users. The trainer holds
    out its own seeded share of the training users as the dev set for the eval loss."""
    config = exp.config.get("split", {})
    loaded = records.load_records(exp.config["forward"], records.check_questions)
    rng = random.Random(exp.config.get("seed", 0))
    rng.shuffle(loaded)
    loaded = loaded[: config.get("max_users", len(loaded))]
    n_test = int(config.get("test_users", max(1, round(len(loaded) * 0.2))))
    if n_test + 2 > len(loaded):
        raise UsageError(f"{len(loaded)} users cannot give {n_test} test users and still train")
    parts = {"test": loaded[:n_test], "train": loaded[n_test:]}
    paths = {}
    for part, rows in parts.items():
        path = exp.root / "data" / f"{part}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(records.dumps(r) + "\n" for r in rows)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        paths[part] = path
    stderr.print(f"split: {len(parts['train'])} training users (the trainer holds out "
                 f"{config.get('dev_fraction', 0.1):.0%} of them as dev), {len(parts['test'])} test users")
    return paths


def interview_label(questioner: str, simulator: str, form: str | None) -> str:
    """The report's name for the interviews of one questioner with one simulator."""
    return f"{questioner} / {simulator}" + (f" [{form}]" if form else "")


def run_experiment(config_path: str | os.PathLike, root: str | os.PathLike | None = None,
                   jobs: int | None = None, forms: list[str] | None = None) -> Path:
    """Run the experiment of ``config_path`` into ``root`` (default runs/<name>) and write its
    report; ``jobs`` (default: the config's ``jobs``, else 1) stages run at once; ``forms``
    (default: the config's ``forms``) are the questioner's profile forms to train and interview.
    Returns the report's path. Raises UsageError for a bad config, FunnelQAError when a stage fails."""
    config = load_config(config_path)
    exp = Experiment(Path(config_path), config, Path(root or Path("runs") / config.get("name", Path(config_path).stem)))
    jobs = jobs or config.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UsageError(f"{config_path}: jobs must be a whole number of stages, at least 1, not {jobs!r}")
    exp.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed = str(config.get("seed", 0))
    base = config.get("base", "local")
    data = split_test_users(exp)
    stages: list[Stage] = []

    examples = exp.root / "data" / "examples-train.jsonl"
    stages.append(Stage("corrupt", ["corrupt", str(data["train"]), "--seed", seed, "--out", str(examples),
                                    *flags(config.get("corrupt", {}))], examples, [data["train"]]))
    dev = ["--eval-fraction", str(config.get("split", {}).get("dev_fraction", 0.1))]

    train_options = config.get("train", {})
    forms = forms or config.get("forms", ["qa", "answers"])
    if unknown := [form for form in forms if form not in PROFILE_FORMS]:
        raise UsageError(f"{config_path}: unknown profile form(s) {', '.join(map(repr, unknown))}; "
                         f"use {', '.join(PROFILE_FORMS)}")
    if unknown := sorted(set(train_options) - {"processes", "common", "simulator", "questioner"}):
        raise UsageError(f"{config_path}: unknown key(s) in [train]: {', '.join(unknown)}; training options go in "
                         "[train.common], [train.simulator] or [train.questioner]")
    if any("processes" in train_options.get(part, {}) for part in ("common", "simulator", "questioner")):
        raise UsageError(f"{config_path}: processes is set in [train] itself, for both models")
    processes = train_options.get("processes", 1)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise UsageError(f"{config_path}: [train] processes must be a whole number, at least 1, not {processes!r}")

    def per_process(options: dict[str, Any], role: str) -> dict[str, Any]:
        # The processes share each step's micro-batches, so a step stays batch_size x grad_accum
        # sequences, and the run the same as on one process (docs/training.md).
        grad_accum = options.get("grad_accum", 1)  # the trainer's default
        if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
            raise UsageError(f"{config_path}: grad_accum of the {role} must be a whole number, at least 1, not {grad_accum!r}")
        if grad_accum % processes:
            given = "" if "grad_accum" in options else " (the default)"
            raise UsageError(f"{config_path}: grad_accum = {grad_accum}{given} of the {role} is not a multiple of "
                             f"[train] processes = {processes}: each process runs grad_accum / processes "
                             "micro-batches of every step")
        return {**options, "grad_accum": grad_accum // processes} if processes > 1 else options

    # The simulator first: it trains longest (it reads each user's whole profile), so with
    # several jobs and one process each the questioners train beside it rather than after it.
    simulator_dir = exp.root / "simulator"
    options = per_process({**train_options.get("common", {}), **train_options.get("simulator", {})}, "simulator")
    stages.append(Stage("train-simulator",
                        ["train-simulator", str(examples), *dev, "--base", base, "--seed", seed,
                         "--out", str(simulator_dir), *flags(options)],
                        simulator_dir / "run_card.json", [examples], product=simulator_dir, processes=processes,
                        resume=("--resume",)))
    adapters: dict[str, Path] = {}
    for form in forms:
        out = exp.root / f"questioner-{form}"
        adapters[form] = out
        # [train.questioner.FORM] overrides [train.questioner] for that profile form alone.
        questioner_options = train_options.get("questioner", {})
        options = {**train_options.get("common", {}),
                   **{k: v for k, v in questioner_options.items() if not isinstance(v, dict)},
                   **questioner_options.get(form, {})}
        options = per_process(options, f"questioner [{form}]")
        stages.append(Stage(f"train-questioner [{form}]",
                            ["train-questioner", str(examples), *dev, "--base", base, "--profile-form", form,
                             "--seed", seed, "--out", str(out), *flags(options)],
                            out / "run_card.json", [examples], product=out, processes=processes,
                            resume=("--resume",)))

    simulate_options = config.get("simulate", {})
    simulators = {"base": base, "fine-tuned": f"{base}+{simulator_dir}"}
    systems: list[tuple[str, str, str, str | None, list[Path], list[str]]] = []
    # The 2x2 of base and fine-tuned models (Fig. 3) for the forms in `grid`; the other forms
    # (the Sec. 4.2.3 ablation) need only their fine-tuned pair.
    grid = config.get("grid", forms)
    # no_repeat = true guards the forms of the grid; a list names the forms.
    no_repeat = config.get("no_repeat", False)
    guarded = set(grid if no_repeat is True else no_repeat or [])
    for form in forms:
        questioners = {"base": (base, []), "fine-tuned": (f"{base}+{adapters[form]}", [adapters[form]])}
        for q_label, (q_spec, q_inputs) in questioners.items():
            for s_label, s_spec in simulators.items():
                if form not in grid and (q_label, s_label) != ("fine-tuned", "fine-tuned"):
                    continue
                s_inputs = [simulator_dir] if s_label == "fine-tuned" else []
                systems.append((interview_label(f"{q_label} questioner", f"{s_label} simulator", form), q_spec, s_spec, form, q_inputs + s_inputs, []))
        if form in guarded:
            # Its own row beside the unguarded one: the guard must never hide what the model does alone.
            systems.append((interview_label("fine-tuned questioner +no-repeat", "fine-tuned simulator", form),
                            f"{base}+{adapters[form]}", simulators["fine-tuned"], form, [adapters[form], simulator_dir],
                            ["--no-repeat"]))
    for oracle in config.get("oracles", ["oracle", "oracle-shuffled"]):
        systems.append((interview_label(oracle, "fine-tuned simulator", None), oracle, simulators["fine-tuned"], None, [simulator_dir], []))

    sessions_dir = exp.root / "sessions"
    sessions_dir.mkdir(exist_ok=True)
    session_files = []
    labels: dict[str, str] = {}
    for label, q_spec, s_spec, form, inputs, extra in systems:
        out = sessions_dir / f"{slug(label)}.jsonl"
        args = ["simulate", str(data["test"]), "--questioner", q_spec, "--simulator", s_spec, "--seed", seed,
                "--out", str(out), *flags(simulate_options), *extra]
        if form:
            args += ["--profile-form", form]
        stages.append(Stage(f"simulate {label}", args, out, [data["test"], *inputs]))
        session_files.append(out)
        labels[str(out)] = label

    scores = exp.root / "scores.jsonl"
    plots = Path(config.get("plots", exp.root / "plots"))
    stages.append(Stage("score", ["score", *map(str, session_files), "--plots", str(plots), "--out", str(scores)],
                        scores, session_files))
    run_stages(exp, stages, jobs)
    cards = {f"questioner [{form}]": adapters[form] for form in forms} | {"simulator": simulator_dir}
    report = write_report(exp, scores, plots, labels, time.perf_counter() - started,
                          cards={label: json.loads((path / "run_card.json").read_text(encoding="utf-8"))
                                 for label, path in cards.items()},
                          jobs=jobs)
    stderr.print(f"report: {report}")
    return report


def hardware() -> str:
    """One line for the report: CPU architecture and cores, Python, torch and GPU (if any)."""
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_note = f"torch {torch.__version__}, {device}"
    except ImportError:
        torch_note = "torch not installed"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}, {torch_note}"


def write_report(exp: Experiment, scores: Path, plots: Path, labels: dict[str, str], seconds: float,
                 cards: dict[str, dict] | None = None, jobs: int = 1) -> Path:
    """Write ``<root>/report.md``: the score table (one row per system of scores.jsonl, named by
    ``labels``: session path -> label) with bootstrap 95 % intervals, the paired differences
    between systems on the same users (significant ones marked), the questioner-behaviour and
    simulator-fidelity tables, Fig. 7 side by side, the training table and eval-loss plot from the
    run ``cards``, every stage's command and wall seconds, the total ``seconds``, the plots, and
    one test user's interviews side by side. Returns the report's path."""
    rows = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [f"# Experiment `{exp.name}`", "", f"Config: `{exp.config_path}`; hardware: {hardware()}.", ""]
    lines += ["| system | users | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L | tag recall | unanswered | repeated | questions | funnel rho |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rho = row.get("funnel_spearman", {}).get("rho")
        lines.append(
            f"| {labels.get(row['source'], row['system'])} | {row['sessions']} | {_with_ci(row, 'bleu')} | {_with_ci(row, 'rouge1')} "
            f"| {_with_ci(row, 'rouge2')} | {_with_ci(row, 'rougeL')} | {_with_ci(row, 'tag_recall')} "
            f"| {_with_ci(row, 'unanswered_rate', percent=True)} | {_with_ci(row, 'repeat_rate', percent=True)} "
            f"| {row['questions_asked']:.2f} | {'-' if rho is None else f'{rho:.2f}'} |"
        )
    bootstrap = next((row["bootstrap"] for row in rows if row.get("bootstrap")), None)
    if bootstrap:
        lines += ["", f"[low, high]: 95 % bootstrap interval over users ({bootstrap['resamples']} resamples, seed "
                  f"{bootstrap['seed']}; for ROUGE, of the mean F1 per user)."]
    from funnelqa.score import pairs_path

    # score writes its paired differences beside scores.jsonl (``score.pairs_path``).
    pairs_file = pairs_path(scores)
    pairs = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if pairs_file.exists() else []
    lines += _uncertainty_sections(rows, pairs, labels, plots, exp.root)
    if cards:
        lines += ["", "## Training", "", "| model | layout | steps | epochs | train tokens | tokens/s | eval loss before -> after | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, card in cards.items():
            lines.append(
                f"| {label} | {card.get('layout', 'steps')} | {card['steps']} | {card['epochs']} | {card['train_tokens']:,} "
                f"| {card['tokens_per_second']} | {card['eval_loss_before']:.3f} -> {card['eval_loss_after']:.3f} | {card['train_seconds']:.0f} |"
            )
        plots.mkdir(parents=True, exist_ok=True)
        from funnelqa.plots import plot_eval_loss

        plot_eval_loss(cards, plots / "eval_loss.png")
    lines += ["", "## Stages (wall time; 'cached' = done by an earlier run)", "", "| stage | seconds | command |", "|---|---|---|"]
    for stage in exp.stages:
        when = "cached" if stage.cached else f"{stage.seconds:.0f}"
        lines.append(f"| {stage.name} | {when} | `{redact(shlex.join(stage.command))}` |")
    at_once = f" (up to {jobs} stages at a time)" if jobs > 1 else ""
    lines += ["", f"Total wall time of this run: {seconds:.0f} s{at_once}.", ""]
    if plots.exists():
        lines += [f"![{p.stem}]({os.path.relpath(p, exp.root)})" for p in sorted(plots.glob("*.png"))]
    lines += transcripts(exp.root / "sessions", labels, exp.config.get("transcripts", 3))
    report = exp.root / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


# Metrics of the paired-difference table: (key, heading, shown in %).
_PAIRED = (("bleu", "BLEU", False), ("rougeL", "ROUGE-L", False), ("tag_recall", "tag recall", False),
           ("unanswered_rate", "unanswered", True), ("repeat_rate", "repeated", True))


def _number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _with_ci(row: dict, key: str, percent: bool = False) -> str:
    """A score cell: the value and, when the row has one, its bootstrap interval in brackets."""
    cell = _number(row.get(key), percent)
    interval = (row.get("ci95") or {}).get(key)
    if interval is None:
        return cell
    scale, digits = (100, 1) if percent else (1, 2)
    return f"{cell} [{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"


def _uncertainty_sections(rows: list[dict], pairs: list[dict], labels: dict[str, str], plots: Path, root: Path) -> list[str]:
    """The report's sections after the score table: the paired differences (``pairs``, from
    score's pairs file), questioner behaviour, simulator fidelity and Fig. 7 side by side (each
    only when score wrote its numbers)."""
    from funnelqa.plots import SIDE_BY_SIDE
    from funnelqa.score import fidelity_by_simulator

    name = {row["source"]: labels.get(row["source"], row["system"]) for row in rows}
    lines: list[str] = []
    if pairs:
        lines += ["", "## Paired differences (A - B on the same users)", "",
                  "| A - B | users | " + " | ".join(heading for _, heading, _ in _PAIRED) + " |", "|---" * (len(_PAIRED) + 2) + "|"]
        for entry in pairs:
            cells = []
            for key, _, percent in _PAIRED:
                diff = entry["diff"].get(key)
                if diff is None or diff["value"] is None or diff["ci95"] is None:
                    cells.append("-")
                    continue
                scale, unit, digits = (100, " pt", 1) if percent else (1, "", 3)
                low, high = (scale * bound for bound in diff["ci95"])
                text = f"{scale * diff['value']:+.{digits}f}{unit} [{low:+.{digits}f}, {high:+.{digits}f}] p={diff['p']:.3f}"
                cells.append(f"**{text}** ✱" if diff["significant"] else text)
            lines.append(f"| {name.get(entry['a_source'], entry['a'])} - {name.get(entry['b_source'], entry['b'])} | {entry['users']} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Difference, 95 % paired-bootstrap interval and p-value (the same resampled users for both "
                  "systems); **bold ✱** = significant at p < 0.05. Percentages in points."]
    lines += ["", "## Questioner behaviour", "",
              "| system | repeated (near) | repeated (exact) | not a question | mapped | about the user's concepts "
              "| unanswered: no such preference | unanswered: simulator missed |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {name[row['source']]} | " + " | ".join(_with_ci(row, key, percent=True) for key in (
            "repeat_rate", "exact_repeat_rate", "non_question_rate", "mapped_rate", "answerable_rate",
            "unanswered_absent_rate", "unanswered_missed_rate")) + " |")
    lines += ["", "Definitions: docs/evaluation.md (Questioner behaviour). *mapped*: turns whose question an oracle "
              "session gives the teacher's tags T_i for; the last three columns are decided on mapped turns only."]
    pooled = fidelity_by_simulator(rows)
    if pooled:
        lines += ["", "## Simulator fidelity (oracle sessions, against the teacher's T_i)", "",
                  "| simulator | sessions | turns | tag precision | tag recall | tag F1 | false 'No preference' | invented tags | grounding |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for simulator, row in pooled.items():
            lines.append(f"| `{simulator}` | {row['sessions']} | {row['turns']} | " + " | ".join(_number(row[key]) for key in (
                "tag_precision", "tag_recall", "tag_f1", "false_no_preference_rate", "invented_rate", "grounding")) + " |")
    side_by_side = plots / SIDE_BY_SIDE
    if side_by_side.exists():
        lines += ["", "## Fig. 7 side by side: was the funnel learned?", "",
                  "Weighted rank (Eq. 11) of the oracle's main concepts, in the oracle's order, for every system: "
                  "a learned funnel repeats the oracle's staircase.", "",
                  f"![weighted rank side by side]({os.path.relpath(side_by_side, root)})"]
    return lines


def transcripts(sessions_dir: Path, labels: dict[str, str], count: int) -> list[str]:
    """One test user's interviews, side by side: the base pair, the fine-tuned pair and the oracle
    (the first ``count`` of these that were run), turn by turn."""
    wanted = ("base questioner / base simulator", "fine-tuned questioner / fine-tuned simulator", "oracle /")
    chosen: list[tuple[str, list[dict]]] = []
    for prefix in wanted[:count]:
        match = next((path for path, label in labels.items() if label.startswith(prefix)), None)
        if match is not None and Path(match).exists():
            chosen.append((labels[match], records.load_records(match)))
    if not chosen:
        return []
    user = chosen[0][1][0]["id"]
    sessions = [(label, next((s for s in rows if s["id"] == user), None)) for label, rows in chosen]
    lines = ["", f"## One test user's interviews (user {user})", ""]
    lines += ["| turn | " + " | ".join(label for label, _ in sessions) + " |", "|---" * (len(sessions) + 1) + "|"]
    depth = max(len(s["turns"]) for _, s in sessions if s)
    for t in range(depth):
        cells = []
        for _, session in sessions:
            turn = session["turns"][t] if session and t < len(session["turns"]) else None
            if turn is None:
                cells.append("")
                continue
            revealed = f" *[{', '.join(turn['tags'])}]*" if turn["tags"] else ""
            text = f"**Q:** {turn['question']}<br>**A:** {turn['answer']}{revealed}"
            cells.append(text.replace("|", "\\|").replace("\n", " "))
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return lines
