"""`funnelqa chat`: a person in the interview, driven through a pseudo-terminal as a person would
type, and through a plain pipe as a script would."""

import io
import json
import os
import re
import shlex
import signal
from pathlib import Path

import pexpect
import pytest

from funnelqa import render
from funnelqa.backends.fake import FakeBackend
from funnelqa.chat import AnswerTagger, Chat, Terminal, chat, transcript_text
from funnelqa.errors import UsageError
from funnelqa.interview import Interview
from funnelqa.questioners import LLMQuestioner
from funnelqa.simulate import UserSimulator, run_interviews
from tests.conftest import EXAMPLES, funnelqa_executable, run_cli

# A safety net for a wedged child, not a measurement: nothing here asserts how long anything takes.
PTY_TIMEOUT = 300

ANN = {
    "id": "ann",
    "profile": "Ann loves film noir, wants bleak endings and watches films from the 1940s.",
    "tags": [
        {"tag": "Genre", "content": "The user loves film noir."},
        {"tag": "Tone", "content": "The user wants bleak endings."},
        {"tag": "Era", "content": "The user watches films from the 1940s."},
    ],
    "questions": [
        {"question": "What kinds of movies do you enjoy?", "answer": "Film noir.", "tags": ["Genre"]},
        {"question": "How should a film end?", "answer": "Bleakly.", "tags": ["Tone"]},
        {"question": "Which decade do you like?", "answer": "The forties.", "tags": ["Era"]},
    ],
}
BOB = {
    "id": "bob",
    "profile": "Bob watches westerns and follows Sergio Leone.",
    "tags": [
        {"tag": "Genre", "content": "The user watches westerns."},
        {"tag": "Directors", "content": "The user follows Sergio Leone."},
    ],
    "questions": [
        {"question": "What kinds of movies do you enjoy?", "answer": "Westerns.", "tags": ["Genre"]},
        {"question": "Any directors you follow?", "answer": "Sergio Leone.", "tags": ["Directors"]},
    ],
}
QUESTIONS = ["What kinds of movies do you enjoy?", "How should a film end?", "Which decade do you like?", "Anything else?"]
# What the tagger (a user simulator's tag mapping) makes of the answers the tests type.
TAGGER_RULES = [
    {"last": "noir", "response": {"answer": "Film noir.", "tags": ["Genre"]}},
    {"last": "leak", "response": {"answer": "Bleak endings.", "tags": ["Tone"]}},
    {"last": "forties", "response": {"answer": "The forties.", "tags": ["Era"]}},
    {"last": "estern", "response": {"answer": "Westerns.", "tags": ["Genre"]}},
    {"last": "Leone", "response": {"answer": "Leone.", "tags": ["Directors"]}},
    {"response": {"answer": "No preference", "tags": []}},
]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    """The forward file and fake-model scripts every chat here uses."""
    return {
        "forward": write_jsonl(tmp_path / "forward.jsonl", [ANN, BOB]),
        "questioner": write_json(tmp_path / "q.json", [{"responses": QUESTIONS}]),
        "tagger": write_json(tmp_path / "tagger.json", TAGGER_RULES),
        "simulator": write_json(tmp_path / "sim.json", simulator_rules([ANN, BOB])),
        "dir": tmp_path,
    }


def simulator_rules(records) -> list[dict]:
    rules = [{"contains": format_first_tag(r), "last": q["question"], "response": {"answer": q["answer"], "tags": q["tags"]}}
             for r in records for q in r["questions"]]
    return rules + [{"response": {"answer": "No preference", "tags": []}}]


def format_first_tag(record) -> str:
    return render.format_tags(record["tags"][:1])


# ---- through a pseudo-terminal, as a person types ----

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Person:
    """A person at a terminal running ``funnelqa chat``: what they see is ``screen()``."""

    def __init__(self, args, cwd: Path, stdout_to: Path | None = None):
        command = [funnelqa_executable(), "chat", *map(str, args)]
        if stdout_to is not None:  # `funnelqa chat ... > FILE` from a shell: stdin and stderr stay the terminal
            command = ["bash", "-c", f"exec {shlex.join(command)} > {shlex.quote(str(stdout_to))}"]
        self.log = io.StringIO()
        self.child = pexpect.spawn(
            command[0], command[1:], cwd=str(cwd), encoding="utf-8", timeout=PTY_TIMEOUT, dimensions=(50, 200),
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "200"},
            # A terminal's own process gets Ctrl-C; a test suite started in the background by a
            # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.child.logfile_read = self.log
        self.seen = 0

    def sees(self, text: str) -> None:
        """Waits until ``text`` appears on the screen after what was seen before (colours ignored)."""
        while text not in self.screen()[self.seen:]:
            if self.child.expect([r"\S", pexpect.EOF]) == 1 and text not in self.screen()[self.seen:]:
                raise AssertionError(f"the chat ended without showing {text!r}:\n{self.screen()}")
        self.seen = self.screen().index(text, self.seen) + len(text)

    def types(self, line: str) -> None:
        self.child.sendline(line)

    def answers(self, prompt: str, line: str) -> None:
        self.sees(prompt)
        self.types(line)

    def leaves(self) -> int:
        """Waits for the chat to end; its exit status."""
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    def screen(self) -> str:
        return ANSI.sub("", self.log.getvalue()).replace("\r\n", "\n")

    def close(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


@pytest.fixture
def people():
    started: list[Person] = []

    def start(*args, **kwargs) -> Person:
        person = Person(*args, **kwargs)
        started.append(person)
        return person

    yield start
    for person in started:  # a test that failed midway leaves no chat behind
        person.close()


def answering(files, *extra) -> list:
    return ["--questioner", f"fake:{files['questioner']}", "--target", files["forward"], "--id", "ann",
            "--tagger", f"fake:{files['tagger']}", "--no-cache", *extra]


def read_session(path: Path) -> dict:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_a_person_answers_in_a_terminal_with_skip_profile_and_done(files, people):
    out = files["dir"] / "session.jsonl"
    person = people(answering(files, "--out", out), cwd=files["dir"])
    person.sees("Q1  What kinds of movies do you enjoy?")
    person.answers("A1> ", "Film noir, mostly")
    person.sees("-> reveals Genre")
    person.sees("turn 1/10 · revealed 1/3 tags: Genre")
    person.sees("Q2  How should a film end?")
    person.answers("A2> ", "/profile")
    person.sees("Genre (revealed): The user loves film noir.")
    person.sees("Tone: The user wants bleak endings.")
    person.answers("A2> ", "skip")
    person.sees("-> No preference")
    person.answers("A3> ", "")
    person.sees("-> No preference")
    person.answers("A4> ", "I like musicals")
    person.sees("reveals none of the user's tags: recorded as No preference")
    person.sees("turn 4/10 · revealed 1/3 tags: Genre")
    person.answers("A5> ", "/done")
    assert person.leaves() == 0
    assert "session ann: 4 turn(s) kept, ended with /done" in person.screen()

    session = read_session(out)
    assert [t["question"] for t in session["turns"]] == QUESTIONS[:3] + ["Anything else?"]
    assert [t["answer"] for t in session["turns"]] == ["Film noir, mostly"] + ["No preference"] * 3
    assert [t["raw"] for t in session["turns"]] == ["Film noir, mostly", "skip", "", "I like musicals"]
    assert [t["answered"] for t in session["turns"]] == [True, False, False, False]
    assert session["turns"][0]["tags"] == ["Genre"] and "tagger_raw" in session["turns"][0]
    assert session["elicited"] == ANN["tags"][:1] and session["target"] == ANN["tags"]
    assert session["simulator"] == "human" and session["questioner"] == f"fake:{files['questioner']}"
    assert session["tagger"] == f"fake:{files['tagger']}" and session["profile_form"] == "qa"
    assert session["stop"] == "done" and session["max_questions"] == 10


def test_ctrl_c_mid_session_keeps_every_turn(files, people):
    out = files["dir"] / "session.jsonl"
    person = people(answering(files), cwd=files["dir"], stdout_to=out)
    person.answers("A1> ", "Film noir")
    person.answers("A2> ", "Bleak endings, always")
    person.sees("revealed 2/3 tags: Genre, Tone")
    person.sees("A3> ")
    person.child.sendintr()
    assert person.leaves() == 0
    assert "interrupted (Ctrl-C)" in person.screen()
    session = read_session(out)
    assert session["stop"] == "interrupted"
    assert [t["tags"] for t in session["turns"]] == [["Genre"], ["Tone"]]
    assert [t["tag"] for t in session["elicited"]] == ["Genre", "Tone"]


def test_end_of_input_ends_cleanly_and_a_complete_profile_stops(files, people):
    out = files["dir"] / "session.jsonl"
    person = people(answering(files, "--out", out), cwd=files["dir"])
    person.answers("A1> ", "Film noir")
    person.sees("A2> ")
    person.child.sendeof()
    assert person.leaves() == 0
    session = read_session(out)
    assert session["stop"] == "end-of-input" and len(session["turns"]) == 1

    # Every tag revealed: the chat stops by itself, as a simulated interview does.
    person = people(answering(files, "--out", out), cwd=files["dir"])
    for prompt, line in [("A1> ", "noir"), ("A2> ", "bleak"), ("A3> ", "the forties")]:
        person.answers(prompt, line)
    assert person.leaves() == 0
    assert "every tag revealed" in person.screen()
    assert read_session(out)["stop"] == "complete"


def test_a_person_asks_and_the_simulator_shows_the_tags_it_claims(files, people):
    out = files["dir"] / "session.jsonl"
    person = people(["--simulator", f"fake:{files['simulator']}", "--target", files["forward"], "--id", "ann",
                     "--no-cache", "--out", out], cwd=files["dir"])
    person.answers("Q1> ", "What kinds of movies do you enjoy?")
    person.sees("A1  Film noir.")
    person.sees("claims Genre: The user loves film noir.")
    person.sees('raw: {"answer": "Film noir.", "tags": ["Genre"]}')
    person.answers("Q2> ", "")  # nothing asked: asked again
    person.answers("Q2> ", "/profile")
    person.sees("Genre (revealed)")
    person.answers("Q2> ", "Do you like musicals?")
    person.sees("claims no tag (No preference)")
    person.sees("turn 2/10 · revealed 1/3 tags: Genre")
    person.answers("Q3> ", "/done")
    assert person.leaves() == 0
    session = read_session(out)
    assert session["questioner"] == "human" and session["simulator"] == f"fake:{files['simulator']}"
    assert [t["question"] for t in session["turns"]] == ["What kinds of movies do you enjoy?", "Do you like musicals?"]
    assert [t["answered"] for t in session["turns"]] == [True, False]
    assert session["stop"] == "done" and session["target"] == ANN["tags"]


# ---- through a plain pipe, as a script would ----

def test_piped_answers_give_one_jsonl_line_on_stdout(files):
    result = run_cli("chat", *answering(files, "-T", "3"), input="Film noir\n/profile\nskip\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    session = json.loads(lines[0])
    assert [t["answer"] for t in session["turns"]] == ["Film noir", "No preference"]
    assert session["stop"] == "end-of-input" and session["max_questions"] == 3
    # The piped lines are echoed after their prompts: stderr reads like the terminal.
    assert "A1> Film noir" in result.stderr and "A2> skip" in result.stderr
    assert "turn 2/3 · revealed 1/3 tags: Genre" in result.stderr


def test_the_question_limit_ends_a_piped_chat(files):
    result = run_cli("chat", *answering(files, "-T", "2"), input="noir\nI like musicals\nbleak\n")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["stop"] == "limit" and len(session["turns"]) == 2


def test_without_a_known_user_the_transcript_pipes_into_structure(files):
    result = run_cli("chat", "-q", f"fake:{files['questioner']}", "--id", "me", "--no-cache",
                     input="Film noir, mostly\nskip\nI don't know\nStanwyck and Mitchum\n/done\n")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["id"] == "me" and "target" not in session and "tagger" not in session
    assert [t["answered"] for t in session["turns"]] == [True, False, False, True]
    assert session["profile"] == ("Q: What kinds of movies do you enjoy?\nA: Film noir, mostly\n"
                                  "Q: Anything else?\nA: Stanwyck and Mitchum")
    assert session["profile"] == transcript_text(session["turns"])

    tags = [{"tag": "Genre", "content": "The user likes film noir."}, {"tag": "Actors", "content": "Stanwyck, Mitchum."}]
    structurer = write_json(files["dir"] / "structure.json", [{"contains": "Stanwyck and Mitchum", "response": {"tags": tags}}])
    structured = run_cli("structure", "-", "--model", f"fake:{structurer}", "--no-cache", input=result.stdout)
    assert structured.returncode == 0, structured.stderr
    record = json.loads(structured.stdout)
    assert record["tags"] == tags and record["turns"] == session["turns"]


def test_human_sessions_score_like_the_same_turns_simulated(files):
    """`simulate` with an oracle questioner and a scripted simulator, then `chat` with a person typing
    the simulator's answers ("skip" where it had none) and a tagger mapping them to the same tags:
    `score` gives both the same numbers."""
    forward = files["forward"]
    partial = simulator_rules([ANN, BOB])
    # Bob's simulated user cannot say who he follows: that turn goes unanswered.
    partial = [rule for rule in partial if rule.get("last") != "Any directors you follow?"]
    simulator = write_json(files["dir"] / "partial-sim.json", partial)
    simulated = run_cli("simulate", forward, "-q", "oracle", "-s", f"fake:{simulator}", "-T", "2", "--no-cache")
    assert simulated.returncode == 0, simulated.stderr
    sim_file = files["dir"] / "simulated.jsonl"
    sim_file.write_text(simulated.stdout, encoding="utf-8")

    human_lines = []
    for session in map(json.loads, simulated.stdout.splitlines()):
        typed = "".join((t["answer"] if t["answered"] else "skip") + "\n" for t in session["turns"])
        chatted = run_cli("chat", "-q", "oracle", "--target", forward, "--id", session["id"], "-T", "2",
                          "--tagger", f"fake:{files['tagger']}", "--no-cache", input=typed)
        assert chatted.returncode == 0, chatted.stderr
        human = json.loads(chatted.stdout)
        assert human["simulator"] == "human"
        assert [(t["question"], t["answer"], t["tags"], t["answered"]) for t in human["turns"]] == \
            [(t["question"], t["answer"], t["tags"], t["answered"]) for t in session["turns"]]
        assert (human["elicited"], human["target"], human["stop"]) == (session["elicited"], session["target"], session["stop"])
        human_lines.append(chatted.stdout)
    human_file = files["dir"] / "human.jsonl"
    human_file.write_text("".join(human_lines), encoding="utf-8")

    scored = run_cli("score", sim_file, human_file)
    assert scored.returncode == 0, scored.stderr
    simulated_score, human_score = map(json.loads, scored.stdout.splitlines())
    assert human_score["system"] == "oracle / human / qa"
    assert simulated_score["tag_recall"] == pytest.approx((2 / 3 + 1 / 2) / 2) and simulated_score["unanswered_rate"] == 0.25
    names = {"system", "source", "simulator"}
    assert {k: v for k, v in human_score.items() if k not in names} == {k: v for k, v in simulated_score.items() if k not in names}


@pytest.mark.parametrize("form", ["qa", "answers"])
def test_the_questioner_sees_what_it_would_see_in_simulate(form):
    """Turn by turn, the questioner's prompts in a chat are the prompts of the simulated interview
    with the same answers, in both profile forms."""

    def questioner(seen: list):
        def respond(request):
            seen.append(request)
            return QUESTIONS[min(len(seen) - 1, len(QUESTIONS) - 1)]

        return FakeBackend(respond, name="fake:q")

    answers = {q["question"]: q for q in ANN["questions"][:2]}  # the decade goes unanswered

    def simulated_user(request):
        asked = answers.get(request.messages[-1]["content"])
        return render.simulator_target(asked["answer"], asked["tags"]) if asked else render.simulator_target("No preference", [])

    in_simulate: list = []
    [simulated] = run_interviews([ANN], LLMQuestioner(questioner(in_simulate), form),
                                 UserSimulator(FakeBackend(simulated_user)), max_questions=4)

    typed = "".join((t["answer"] if t["answered"] else "skip") + "\n" for t in simulated["turns"])
    by_answer = {q["answer"]: q["tags"] for q in ANN["questions"]}

    def tag_mapping(request):
        said = next((a for a in by_answer if a in request.messages[-1]["content"]), None)
        return render.simulator_target(said or "No preference", by_answer.get(said, []))

    in_chat: list = []
    shown = io.StringIO()
    from rich.console import Console

    talk = Chat(Interview(ANN), Terminal(io.StringIO(typed), Console(file=shown)), max_questions=4, known=True,
                asker=LLMQuestioner(questioner(in_chat), form), tagger=AnswerTagger(FakeBackend(tag_mapping)))
    talk.run()
    assert [r.messages for r in in_chat] == [r.messages for r in in_simulate]
    assert [(t["question"], t["answer"], t["tags"]) for t in talk.interview.turns] == \
        [(t["question"], t["answer"], t["tags"]) for t in simulated["turns"]]
    assert talk.interview.stop == simulated["stop"] == "limit"
    assert "A1> Film noir." in shown.getvalue()


def test_the_tagger_reads_the_simulators_prompt_with_the_persons_answer():
    seen = []
    tagger = AnswerTagger(FakeBackend(lambda r: seen.append(r) or '{"answer": "x", "tags": ["genre", "Nope"]}'))
    interview = Interview(ANN)
    interview.add_turn("Earlier?", "Dark ones.", ["Tone"], None)
    assert tagger.tags(interview, "What kinds of movies do you enjoy?", "Noir!")[0] == ["Genre"]
    expected = render.simulator_messages(ANN["tags"], "What kinds of movies do you enjoy?", interview.simulator_history())
    messages = seen[0].messages
    assert list(messages[:-1]) == expected[:-1] and messages[-1]["content"].startswith(expected[-1]["content"])
    assert '"Noir!"' in messages[-1]["content"] and seen[0].json_schema is not None
    # No preference costs no call; a reply that names no tag falls back on the person's own words.
    assert tagger.tags(interview, "Any actors?", "I don't know") == ([], None) and len(seen) == 1
    quiet = AnswerTagger(FakeBackend(lambda r: '{"answer": "", "tags": []}'))
    assert quiet.tags(interview, "Which decade?", "Films from the 1940s, always")[0] == ["Era"]


def test_no_repeat_guards_the_questioner_and_is_recorded(files):
    repeating = write_json(files["dir"] / "repeat.json", [{"responses": [QUESTIONS[0], QUESTIONS[0], QUESTIONS[1]]}])
    result = run_cli("chat", "-q", f"fake:{repeating}", "--target", files["forward"], "--id", "ann",
                     "--tagger", f"fake:{files['tagger']}", "-T", "2", "--no-repeat", "--no-cache", input="noir\nbleak\n")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["no_repeat"] is True
    assert [t["question"] for t in session["turns"]] == QUESTIONS[:2]
    assert session["turns"][1]["guard"] == {"repeat": QUESTIONS[0], "replaced": True}
    assert "--no-repeat: the model repeated" in result.stderr


def test_a_model_call_that_fails_for_good_keeps_the_session_and_says_so(files):
    only_noir = write_json(files["dir"] / "only-noir.json", TAGGER_RULES[:1])
    out = files["dir"] / "session.jsonl"
    result = run_cli("chat", "-q", f"fake:{files['questioner']}", "--target", files["forward"], "--id", "ann",
                     "--tagger", f"fake:{only_noir}", "--no-cache", "--out", out, input="noir\nsomething else\n")
    assert result.returncode == 4
    assert result.stderr.strip().splitlines()[-1].startswith("funnelqa: error: tagger: fake backend: no rule matches")
    session = read_session(out)
    assert session["stop"] == "error" and len(session["turns"]) == 1
    assert session["error"]["stage"] == "chat" and session["error"]["message"].startswith("tagger:")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "say who asks"),
        ({"questioner": "local", "simulator": "local", "target": "f"}, "say who asks"),
        ({"simulator": "local"}, "give --target"),
        ({"questioner": "oracle"}, "funnel questions"),
        ({"questioner": "local", "tagger": "local"}, "--tagger maps answers"),
        ({"questioner": "local", "profile_form": "answers"}, "'answers' profile form"),
        ({"questioner": "local", "profile_form": "prose"}, "unknown profile form"),
        ({"simulator": "local", "target": "f", "no_repeat": True}, "--no-repeat is for a model questioner"),
        ({"questioner": "local", "target": "-"}, "stdin carries"),
        ({"questioner": "local", "max_questions": 0}, "at least 1"),
        ({"questioner": "nosuch:model"}, "unknown model spec"),
    ],
)
def test_options_that_do_not_fit_together(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        chat(**kwargs, stdin=io.StringIO(""))


def test_the_known_user_is_found_by_id_and_named_when_missing(files):
    missing = run_cli("chat", *answering(files)[:4], "--id", "zed", input="")
    assert missing.returncode == 2
    assert "has no user with id 'zed' (it has ann, bob)" in missing.stderr
    several = run_cli("chat", "-q", "oracle", "--target", files["forward"], input="")
    assert several.returncode == 2 and "holds 2 users; choose one with --id" in several.stderr
    alone = write_jsonl(files["dir"] / "one.jsonl", [BOB])
    result = run_cli("chat", "-q", "oracle", "--target", alone, "--tagger", f"fake:{files['tagger']}", "--no-cache",
                     input="Westerns\nSergio Leone\n")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["id"] == "bob" and session["stop"] == "complete"


# ---- real models ----

def test_a_tiny_transformers_model_asks_tags_and_answers(files):
    from tests.tiny import make_tiny_model

    model = make_tiny_model(files["dir"] / "tiny")
    answers = "".join(f"{line}\n" for line in ["Film noir, mostly", "skip", "bleak endings", "the forties"])
    asked = run_cli("chat", "-q", f"hf:{model}", "--target", files["forward"], "--id", "ann", "--tagger", f"hf:{model}",
                    "-T", "3", "--no-cache", input=answers)
    assert asked.returncode == 0, asked.stderr
    session = json.loads(asked.stdout)
    assert 1 <= len(session["turns"]) <= 3 and session["simulator"] == "human"
    assert all(set(t["tags"]) <= {"Genre", "Tone", "Era"} for t in session["turns"])
    human_file = files["dir"] / "human.jsonl"
    human_file.write_text(asked.stdout, encoding="utf-8")
    scored = run_cli("score", human_file)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["sessions"] == 1

    answered = run_cli("chat", "-s", f"hf:{model}", "--target", files["forward"], "--id", "ann", "-T", "2", "--no-cache",
                       input="What kinds of movies do you enjoy?\nHow should a film end?\n")
    assert answered.returncode == 0, answered.stderr
    session = json.loads(answered.stdout)
    assert session["questioner"] == "human" and len(session["turns"]) == 2
    assert all(t["raw"] is not None for t in session["turns"])


@pytest.mark.slow
def test_the_embedded_model_in_a_piped_chat(tmp_path):
    result = run_cli("chat", "-q", "local", "--target", EXAMPLES / "forward.jsonl", "--id", "ex-01", "-T", "2",
                     input="Film noir above all, hardboiled detective stories\nBilly Wilder and Fritz Lang\n")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["questioner"] == "local" and session["tagger"] == "local" and session["simulator"] == "human"
    assert len(session["turns"]) == 2 and all(t["question"] for t in session["turns"])
    (tmp_path / "human.jsonl").write_text(result.stdout, encoding="utf-8")
    scored = run_cli("score", tmp_path / "human.jsonl")
    assert scored.returncode == 0, scored.stderr


def test_the_words_tagger_maps_an_answer_by_the_tags_it_repeats_without_a_model(files):
    typed = "westerns mostly\nskip\nanything by Sergio Leone\n"
    result = run_cli("chat", "-q", f"fake:{files['questioner']}", "--target", files["forward"], "--id", "bob",
                     "--tagger", "words", "-T", "3", "--no-cache", input=typed)
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["tagger"] == "words"
    assert [turn["tags"] for turn in session["turns"]] == [["Genre"], [], ["Directors"]]
    assert all(turn.get("tagger_raw") is None for turn in session["turns"])
