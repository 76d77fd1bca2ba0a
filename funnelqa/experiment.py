"""The paper's experiment (Sec. 4.2) end to end, driven by one TOML config.

split (seeded, by user: test users vs training users, of which the trainer holds out a dev share) -> corrupt -> train-questioner (one adapter per profile form) ->
train-simulator -> simulate the 2x2 (questioner base/fine-tuned x simulator base/fine-tuned) per
profile form, plus the oracle and shuffled-oracle questioners -> score with plots -> report.

Every stage runs the real ``funnelqa`` command, so the report lists commands a user can paste.
A stage is skipped when its output exists and its stamp (the command plus the hashes of its
inputs) matches, so a re-run after a crash redoes nothing finished; simulate and training resume
from their own partial outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnelqa import records
from funnelqa.console import stderr
from funnelqa.errors import FunnelQAError, UsageError
from funnelqa.redact import redact


@dataclass
class StageRun:
    name: str
    command: list[str]
    seconds: float
    cached: bool


@dataclass
class Experiment:
    config_path: Path
    config: dict[str, Any]
    root: Path
    stages: list[StageRun] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.get("name", self.config_path.stem)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
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


def run_stage(exp: Experiment, name: str, args: list[str], output: Path, inputs: list[Path]) -> None:
    """Run ``funnelqa ARGS`` unless ``output`` is already there for the same command and inputs."""
    command = ["funnelqa", *args]
    stamp = output.parent / f".{output.name}.stamp"
    key = hashlib.sha256(json.dumps([command, [file_digest(p) for p in inputs]]).encode()).hexdigest()
    if output.exists() and stamp.exists() and stamp.read_text().strip() == key:
        stderr.print(f"[dim]{name}: done before, skipped[/]")
        exp.stages.append(StageRun(name, command, 0.0, cached=True))
        return
    stderr.print(f"[bold]{name}[/]: {redact(shlex.join(command))}")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "funnelqa", *args], stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        raise FunnelQAError(f"stage {name} failed (exit {result.returncode}); fix it and re-run: finished stages are kept")
    stamp.write_text(key + "\n")
    exp.stages.append(StageRun(name, command, time.perf_counter() - started, cached=False))


def split_users(exp: Experiment) -> dict[str, Path]:
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


def system_name(questioner: str, simulator: str, form: str | None) -> str:
    return f"{questioner} / {simulator}" + (f" [{form}]" if form else "")


def run_experiment(config_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    config = load_config(config_path)
    exp = Experiment(Path(config_path), config, Path(root or Path("runs") / config.get("name", Path(config_path).stem)))
    exp.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed = str(config.get("seed", 0))
    base = config.get("base", "local")
    data = split_users(exp)

    examples = exp.root / "data" / "examples-train.jsonl"
    run_stage(exp, "corrupt", ["corrupt", str(data["train"]), "--seed", seed, "--out", str(examples),
                               *flags(config.get("corrupt", {}))], examples, [data["train"]])
    dev = ["--eval-fraction", str(config.get("split", {}).get("dev_fraction", 0.1))]

    train_options = config.get("train", {})
    forms = config.get("forms", ["qa", "answers"])
    adapters: dict[str, Path] = {}
    for form in forms:
        out = exp.root / f"questioner-{form}"
        adapters[form] = out
        # [train.questioner.FORM] overrides [train.questioner] for that profile form alone.
        questioner_options = train_options.get("questioner", {})
        options = {**train_options.get("common", {}),
                   **{k: v for k, v in questioner_options.items() if not isinstance(v, dict)},
                   **questioner_options.get(form, {})}
        run_stage(exp, f"train-questioner [{form}]",
                  ["train-questioner", str(examples), *dev, "--base", base, "--profile-form", form, "--seed", seed,
                   "--out", str(out), *flags(options)],
                  out / "run_card.json", [examples])
    simulator_dir = exp.root / "simulator"
    options = {**train_options.get("common", {}), **train_options.get("simulator", {})}
    run_stage(exp, "train-simulator",
              ["train-simulator", str(examples), *dev, "--base", base, "--seed", seed, "--out", str(simulator_dir),
               *flags(options)],
              simulator_dir / "run_card.json", [examples])

    simulate_options = config.get("simulate", {})
    simulators = {"base": base, "fine-tuned": f"{base}+{simulator_dir}"}
    systems: list[tuple[str, str, str, str | None, list[Path], list[str]]] = []
    # The 2x2 of base and fine-tuned models (Fig. 3) for the forms in `grid`; the other forms
    # (the Sec. 4.2.3 ablation) need only their fine-tuned pair.
    grid = config.get("grid", forms)
    for form in forms:
        questioners = {"base": (base, []), "fine-tuned": (f"{base}+{adapters[form]}", [adapters[form]])}
        for q_label, (q_spec, q_inputs) in questioners.items():
            for s_label, s_spec in simulators.items():
                if form not in grid and (q_label, s_label) != ("fine-tuned", "fine-tuned"):
                    continue
                s_inputs = [simulator_dir] if s_label == "fine-tuned" else []
                systems.append((system_name(f"{q_label} questioner", f"{s_label} simulator", form), q_spec, s_spec, form, q_inputs + s_inputs, []))
        if config.get("no_repeat"):
            # Its own row beside the unguarded one: the guard must never hide what the model does alone.
            systems.append((system_name("fine-tuned questioner +no-repeat", "fine-tuned simulator", form),
                            f"{base}+{adapters[form]}", simulators["fine-tuned"], form, [adapters[form], simulator_dir],
                            ["--no-repeat"]))
    for oracle in config.get("oracles", ["oracle", "oracle-shuffled"]):
        systems.append((system_name(oracle, "fine-tuned simulator", None), oracle, simulators["fine-tuned"], None, [simulator_dir], []))

    sessions_dir = exp.root / "sessions"
    sessions_dir.mkdir(exist_ok=True)
    session_files = []
    labels: dict[str, str] = {}
    for label, q_spec, s_spec, form, inputs, extra in systems:
        slug = label.replace(" / ", "__").replace(" ", "-").replace("[", "").replace("]", "").replace("+", "")
        out = sessions_dir / f"{slug}.jsonl"
        args = ["simulate", str(data["test"]), "--questioner", q_spec, "--simulator", s_spec, "--seed", seed,
                "--out", str(out), *flags(simulate_options), *extra]
        if form:
            args += ["--profile-form", form]
        run_stage(exp, f"simulate {label}", args, out, [data["test"], *inputs])
        session_files.append(out)
        labels[str(out)] = label

    scores = exp.root / "scores.jsonl"
    plots = Path(config.get("plots", exp.root / "plots"))
    run_stage(exp, "score", ["score", *map(str, session_files), "--plots", str(plots), "--out", str(scores)],
              scores, session_files)
    cards = {f"questioner [{form}]": adapters[form] for form in forms} | {"simulator": simulator_dir}
    report = write_report(exp, scores, plots, labels, time.perf_counter() - started,
                          cards={label: json.loads((path / "run_card.json").read_text(encoding="utf-8"))
                                 for label, path in cards.items()},
                          test_forward=data["test"])
    stderr.print(f"report: {report}")
    return report


def hardware() -> str:
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_note = f"torch {torch.__version__}, {device}"
    except ImportError:
        torch_note = "torch not installed"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}, {torch_note}"


def write_report(exp: Experiment, scores: Path, plots: Path, labels: dict[str, str], seconds: float,
                 cards: dict[str, dict] | None = None, test_forward: Path | None = None) -> Path:
    rows = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [f"# Experiment `{exp.name}`", "", f"Config: `{exp.config_path}`; hardware: {hardware()}.", ""]
    lines += ["| system | users | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L | tag recall | unanswered | repeated | questions | funnel rho |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rho = row.get("funnel_spearman", {}).get("rho")
        lines.append(
            f"| {labels.get(row['source'], row['system'])} | {row['sessions']} | {row['bleu']:.3f} | {row['rouge1']:.3f} "
            f"| {row['rouge2']:.3f} | {row['rougeL']:.3f} | {row['tag_recall']:.3f} | {100 * row['unanswered_rate']:.1f}% | {100 * row['repeat_rate']:.1f}% "
            f"| {row['questions_asked']:.2f} | {'-' if rho is None else f'{rho:.2f}'} |"
        )
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
    lines += ["", f"Total wall time of this run: {seconds:.0f} s.", ""]
    if plots.exists():
        lines += [f"![{p.stem}]({os.path.relpath(p, exp.root)})" for p in sorted(plots.glob("*.png"))]
    lines += transcripts(exp.root / "sessions", labels, exp.config.get("transcripts", 3))
    report = exp.root / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


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
