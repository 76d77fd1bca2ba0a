"""Interviews with a person in them: ``funnelqa chat``.

Two seats at the table:

- **The person answers** (``questioner=SPEC``). The questioner asks exactly as in a simulated
  interview: the same ``Interview``, the same questioners (``--no-repeat`` included), the same
  profile forms and renderer, so it sees what it would see in ``simulate``.
  * Playing a known user (``target`` + ``user_id``): the person answers for a user whose forward
    record is known, and each answer is mapped onto that user's tags by a user simulator model's
    tag mapping (``AnswerTagger``). An answer that reveals no tag becomes "No preference", as in
    Algorithm 2 (line 9); what the person typed stays in the turn's ``raw``. The session follows
    the contract of ``simulate`` with ``"simulator": "human"``, so ``funnelqa score`` scores it.
  * Nobody in particular (no ``target``): every answer is kept as typed and the elicited profile
    is the transcript, the answered questions with their answers, in the session's ``profile``
    field, so ``funnelqa structure`` turns it into tags.
- **The person asks** (``simulator=SPEC`` + ``target`` + ``user_id``): the user simulator answers
  from the known user's profile JP^u and shows the tags it claims to reveal, with their contents
  and its raw output: a live faithfulness check of a (trained) simulator. ``"questioner": "human"``.

The person's lines come from ``stdin``, a terminal or a pipe (one line per answer or question);
an empty line or "skip" answers "No preference", ``/done`` ends, ``/profile`` shows the known
user, ``/help`` the commands. Ctrl-C and the end of input end the session too and keep every
finished turn. Everything shown goes to stderr; the session is one JSON line on stdout or ``out``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from rich.text import Text

from funnelqa import parsing, render
from funnelqa.backends import Backend, BackendOptions, ModelSpec, Request, answer_status, open_backend
from funnelqa.errors import BackendError, UsageError
from funnelqa.interview import STOP_COMPLETE, STOP_ERROR, STOP_EXHAUSTED, STOP_LIMIT, Interview
from funnelqa.prompts import load
from funnelqa.questioners import (
    ORACLE_SHUFFLED,
    REFERENCE_QUESTIONERS,
    Questioner,
    default_profile_form,
    open_questioner,
    parse_questioner,
)
from funnelqa.records import Record, RecordWriter, check_questions, check_tags, read_records, source_name
from funnelqa.redact import redact
from funnelqa.simulate import ANSWER_MAX_TOKENS, ANSWER_SCHEMA, UserSimulator

# Who sat in a role a model plays in `simulate`: a session's "questioner" or "simulator".
HUMAN = "human"
# Why a chat stopped, besides simulate's limit / complete / exhausted / error.
STOP_DONE = "done"  # the person typed /done
STOP_INTERRUPTED = "interrupted"  # Ctrl-C
STOP_END_OF_INPUT = "end-of-input"  # Ctrl-D, or a pipe ran out of lines

SKIP = "skip"
DONE_COMMANDS = ("/done", "/quit", "/exit")
PROFILE_COMMAND = "/profile"
HELP_COMMAND = "/help"


class Transcript(Interview):
    """An interview with nobody in particular: there is no target profile, so no tag mapping.

    Each answer is kept as typed; "No preference" (for a blank line, "skip", or a phrase
    ``parsing.is_no_preference`` knows) makes the turn unanswered. The questioner still reads
    the interview through ``Interview.history``, so it sees what it would see in ``simulate``.
    """

    def add_turn(self, question: str, answer: str, tags: Sequence[str], raw: str | None) -> None:
        """Record one turn as simulate does; an empty or "No preference" answer is kept as
        NO_PREFERENCE and marked unanswered. ``raw``: what the person typed."""
        answered = bool(answer.strip()) and not parsing.is_no_preference(answer)
        self.turns.append(
            {
                "question": question,
                "answer": answer.strip() if answered else render.NO_PREFERENCE,
                "tags": [],
                "answered": answered,
                "raw": raw,
                **({"guard": self.guard} if self.guard else {}),
            }
        )
        self.guard = None

    def complete(self) -> bool:
        """Always False: without a known profile nothing says the transcript is whole."""
        return False  # nothing to complete: only the person knows when the profile is whole

    def session(self, meta: dict) -> Record:
        """``{"id", "profile": transcript_text(turns), "turns", **meta, "stop"}`` (+ ``error``):
        a record ``funnelqa structure`` reads (it keeps the fields it does not own)."""
        return {
            "id": self.record["id"],
            "profile": transcript_text(self.turns),
            "turns": self.turns,
            **meta,
            "stop": self.stop,
            **({"error": {"stage": "chat", "message": self.error}} if self.error else {}),
        }


def transcript_text(turns: Sequence[dict]) -> str:
    """The elicited profile of a chat without a known user: one ``Q: question`` / ``A: answer``
    pair of lines per answered turn, in asking order ("" when nothing was answered)."""
    return "\n".join(f"Q: {turn['question']}\nA: {turn['answer']}" for turn in turns if turn["answered"])


# The --tagger value that maps answers by their words alone, without a model.
WORDS_TAGGER = "words"


class AnswerTagger:
    """A user simulator model's tag mapping (paper Eq. 10: answer A_i -> revealed tags T_i),
    applied to a person's answer.

    The model gets the simulator's own prompt (``render.simulator_messages``: the profile JP^u in
    the system prompt, the interview so far as the simulator said it), with the question followed
    by the person's answer (prompt ``tagger``), and replies as a simulator does,
    ``{"answer": ..., "tags": [...]}``. Its tags are read as ``simulate`` reads a simulator's
    (``parsing.parse_simulator``: names matched onto the profile, unknown ones dropped); when it
    names none, the tags whose content the person's own words repeat count (``parsing.infer_tags``).
    """

    def __init__(self, backend: Backend, max_tokens: int = ANSWER_MAX_TOKENS):
        self.backend = backend
        self.spec = backend.spec
        self.max_tokens = max_tokens

    def request(self, interview: Interview, question: str, answer: str) -> Request:
        """The simulator's own prompt for ``question`` (profile JP^u in the system prompt, the
        interview so far as turns) with the person's ``answer`` to map: prompts/tagger.txt."""
        asked = load("tagger").replace("{question}", question.strip()).replace("{answer}", answer.strip())
        messages = render.simulator_messages(interview.target, asked, interview.simulator_history())
        return Request(messages=tuple(messages), max_tokens=self.max_tokens, json_schema=ANSWER_SCHEMA)

    def tags(self, interview: Interview, question: str, answer: str) -> tuple[list[str], str | None] | None:
        """(revealed tag names, as the profile spells them; the model's raw output) for the person's
        ``answer`` to ``question``. A "No preference" answer reveals nothing and costs no call
        (raw None). None when the call failed for good: ``interview.fail`` then says why."""
        if parsing.is_no_preference(answer):
            return [], None
        text = self.backend.generate_each([self.request(interview, question, answer)])[0]
        finish, detail = answer_status(text)
        if finish == "failed":
            interview.fail("tagger", detail)
            return None
        _, named = parsing.parse_simulator(text, interview.target)
        return (named or parsing.infer_tags(answer, interview.target)), str(text)


class WordTagger:
    """``--tagger words``: no model; an answer reveals the tags whose distinctive words it repeats
    (``parsing.infer_tags``, the rule ``simulate`` applies to a simulator's prose answers).

    Literal, so a paraphrase reveals nothing; but it never names a tag the person did not speak to,
    which the small models do (the demo simulator as tagger named tags in profile order, one per
    turn, whatever the answer said: docs/evaluation.md).
    """

    spec = WORDS_TAGGER

    def tags(self, interview: Interview, question: str, answer: str) -> tuple[list[str], None]:
        """(revealed tag names, None): the same contract as AnswerTagger.tags, never failing."""
        if parsing.is_no_preference(answer):
            return [], None
        return parsing.infer_tags(answer, interview.target), None


class Terminal:
    """The person's side of a chat: lines in from ``stdin``, everything shown on ``console`` (stderr).

    A line read from a pipe is echoed after its prompt, so the stderr transcript of a scripted chat
    reads like one typed at a terminal. Rendering is rich's: colours on a terminal, plain text elsewhere.
    """

    def __init__(self, stdin: TextIO, console):
        self.stdin = stdin
        self.console = console
        try:
            self.echo = not stdin.isatty()
        except (AttributeError, ValueError):
            self.echo = True

    def read(self, prompt: str) -> str:
        """One line without its newline. Raises EOFError at the end of input; Ctrl-C raises
        KeyboardInterrupt, as anywhere in Python."""
        self.console.print(Text(prompt, style="bold green"), end="")
        self.console.file.flush()
        line = self.stdin.readline()
        if not line:
            self.console.print()
            raise EOFError
        line = line.rstrip("\r\n")
        if self.echo:
            self.console.print(Text(line), highlight=False)
        return line

    def say(self, text: str | Text, style: str = "") -> None:
        """One line on stderr (rich ``style``, e.g. "bold"); markup in ``text`` is not interpreted."""
        self.console.print(text if isinstance(text, Text) else Text(text, style=style), highlight=False)

    def busy(self, what: str):
        """A spinner while a model works, on an interactive terminal only (a log gets no frames)."""
        if getattr(self.console, "is_interactive", False):
            return self.console.status(Text(what, style="dim"))
        return contextlib.nullcontext()


class Chat:
    """One chat in progress: the interview, who sits where, and how it is shown.

    ``asker`` (a Questioner) is set when the person answers; ``answerer`` (a UserSimulator) when
    the person asks; ``tagger`` maps the person's answers when the user is known.
    """

    def __init__(self, interview: Interview, terminal: Terminal, *, max_questions: int, known: bool,
                 asker: Questioner | None = None, answerer: UserSimulator | None = None,
                 tagger: AnswerTagger | WordTagger | None = None, source: str = ""):
        self.interview = interview
        self.terminal = terminal
        self.max_questions = max_questions
        self.known = known
        self.asker = asker
        self.answerer = answerer
        self.tagger = tagger
        self.source = source
        self.calling = ""  # the role whose model is being called, named if the call fails

    # ---- the two loops ----

    def run(self) -> None:
        """Play the chat to its end; sets ``interview.stop``. Ctrl-C and the end of input end it
        like /done does, keeping every finished turn (a turn whose answer was typed but not yet
        mapped to tags is not finished). A model call that fails for good ends it with the error
        (``Interview.fail``), the finished turns kept as well."""
        try:
            if self.asker is not None:
                self._person_answers()
            else:
                self._person_asks()
        except KeyboardInterrupt:
            self.terminal.say("")
            self.interview.stop = STOP_INTERRUPTED
        except EOFError:
            self.interview.stop = STOP_END_OF_INPUT
        except BackendError as exc:  # a fault that stops every request: no server, a rejected key
            self.interview.fail(self.calling, str(exc))

    def _person_answers(self) -> None:
        interview = self.interview
        while interview.stop is None:
            self.calling = "questioner"
            with self.terminal.busy("the questioner is thinking..."):
                question = self.asker.ask([interview])[0]
            if interview.stop is not None:  # its call failed for good
                return
            if question is None:
                interview.stop = STOP_EXHAUSTED
                return
            turn = len(interview.turns) + 1
            if not question.strip():
                # As in simulate: nothing to put to the user, the turn is spent all the same.
                interview.add_turn("", render.NO_PREFERENCE, [], None)
                self.terminal.say(f"Q{turn}  (the questioner wrote no question; the turn counts as unanswered)", "yellow")
            else:
                self._show_question(turn, question)
                typed = self._read_line(f"A{turn}> ")
                if typed is None:
                    interview.stop = STOP_DONE
                    return
                answer = render.NO_PREFERENCE if typed.strip().lower() in ("", SKIP) else typed.strip()
                tags: list[str] = []
                mapping: str | None = None
                if self.tagger is not None:
                    self.calling = "tagger"
                    with self.terminal.busy("mapping your answer to the user's tags..."):
                        mapped = self.tagger.tags(interview, question, answer)
                    if mapped is None:
                        return
                    tags, mapping = mapped
                interview.add_turn(question, answer, tags, typed)
                if mapping is not None:
                    interview.turns[-1]["tagger_raw"] = mapping
                self._show_mapping()
            self._show_status()
            self._check_end()

    def _person_asks(self) -> None:
        interview = self.interview
        while interview.stop is None:
            turn = len(interview.turns) + 1
            typed = self._read_line(f"Q{turn}> ")
            if typed is None:
                interview.stop = STOP_DONE
                return
            question = typed.strip()
            if not question:
                continue  # nothing asked
            self.calling = "simulator"
            with self.terminal.busy("the user simulator is answering..."):
                reply = self.answerer.answer([(interview, question)])[0]
            if reply is None:  # its call failed for good
                return
            interview.add_turn(question, *reply)
            self._show_claims()
            self._show_status()
            self._check_end()

    def _check_end(self) -> None:
        # simulate's order: a complete profile first, then the question limit.
        if self.known and self.interview.complete():
            self.interview.stop = STOP_COMPLETE
        elif len(self.interview.turns) >= self.max_questions:
            self.interview.stop = STOP_LIMIT

    def _read_line(self, prompt: str) -> str | None:
        """The person's next line that is not a command; None for /done."""
        while True:
            line = self.terminal.read(prompt)
            command = line.strip().lower()
            if command in DONE_COMMANDS:
                return None
            if command == PROFILE_COMMAND:
                self._show_profile()
            elif command == HELP_COMMAND:
                self._show_help()
            elif command.startswith("/") and " " not in command:
                self.terminal.say(f"unknown command {line.strip()!r}; /help lists them", "yellow")
            else:
                return line

    # ---- what the person sees ----

    def opening(self, *, questioner: str = "", simulator: str = "", tagger: str = "", form: str = "") -> None:
        """The lines before the first question: who asks, who answers, how answers become tags
        (specs as redacted strings), and the commands the person can type."""
        user = self.interview.record["id"]
        size = len(self.interview.target)
        if self.asker is not None:
            if self.known:
                who = f"you answer as user {user} ({size} tags; /profile shows them); your answers are mapped to tags by {tagger}"
            else:
                who = "you answer as yourself; the answered questions become the profile (pipe it into `funnelqa structure`)"
            self.terminal.say(f"funnelqa chat: the questioner {questioner} asks ({form} form), {who}.", "bold")
            self.terminal.say("Enter or 'skip': No preference · /profile · /done ends · Ctrl-C / Ctrl-D end too, keeping every turn", "dim")
        else:
            self.terminal.say(f"funnelqa chat: you ask; the user simulator {simulator} answers as user {user} "
                              f"({size} tags; /profile shows them) and names the tags it reveals.", "bold")
            self.terminal.say("an empty line asks nothing · /profile · /done ends · Ctrl-C / Ctrl-D end too, keeping every turn", "dim")
        self.terminal.say(f"at most {self.max_questions} questions", "dim")

    def _show_question(self, turn: int, question: str) -> None:
        text = Text(f"Q{turn}  ", style="bold cyan")
        text.append(question, style="bold")
        self.terminal.say(text)
        guard = self.interview.guard
        if guard:
            outcome = "asked a fresh sample instead" if guard["replaced"] else "no sample avoided it, so it stays"
            self.terminal.say(f"   (--no-repeat: the model repeated {guard['repeat']!r}; {outcome})", "dim")

    def _show_mapping(self) -> None:
        turn = self.interview.turns[-1]
        typed = (turn["raw"] or "").strip()
        if turn["answered"]:
            if self.known:
                self.terminal.say(f"   -> reveals {', '.join(turn['tags'])}", "magenta")
        elif not self.known or typed.lower() in ("", SKIP) or parsing.is_no_preference(typed):
            self.terminal.say("   -> No preference", "yellow")
        else:
            self.terminal.say("   -> reveals none of the user's tags: recorded as No preference", "yellow")

    def _show_claims(self) -> None:
        turn = self.interview.turns[-1]
        content = {tag["tag"]: tag["content"] for tag in self.interview.target}
        text = Text(f"A{len(self.interview.turns)}  ", style="bold cyan")
        text.append(turn["answer"])
        self.terminal.say(text)
        if not turn["tags"]:
            self.terminal.say("   claims no tag (No preference)", "yellow")
        for name in turn["tags"]:
            claim = Text(f"   claims {name}: ", style="magenta")
            claim.append(content[name], style="dim")
            self.terminal.say(claim)
        if turn.get("raw") is not None:
            self.terminal.say(f"   raw: {turn['raw']}", "dim")

    def _show_status(self) -> None:
        interview = self.interview
        line = f"turn {len(interview.turns)}/{self.max_questions}"
        if self.known:
            names = [tag["tag"] for tag in interview.elicited]
            line += f" · revealed {len(names)}/{len(interview.target)} tags" + (f": {', '.join(names)}" if names else "")
        else:
            answered = sum(turn["answered"] for turn in interview.turns)
            line += f" · answered {answered} of {len(interview.turns)}"
        self.terminal.say(line, "dim")

    def _show_profile(self) -> None:
        if not self.known:
            self.terminal.say("no known user: start with --target FILE --id ID to play one", "yellow")
            return
        record = self.interview.record
        revealed = self.interview.revealed()
        self.terminal.say(f"user {record['id']} ({self.source}); revealed so far: {len(revealed)}/{len(self.interview.target)}", "bold")
        if isinstance(record.get("profile"), str):
            self.terminal.say(record["profile"], "italic")
        for tag in self.interview.target:
            line = Text(f"  {tag['tag']}" + (" (revealed)" if tag["tag"] in revealed else "") + ": ",
                        style="magenta" if tag["tag"] in revealed else "bold")
            line.append(tag["content"])
            self.terminal.say(line)

    def _show_help(self) -> None:
        if self.asker is not None:
            self.terminal.say("type your answer and press Enter; an empty line or 'skip' answers No preference", "dim")
        else:
            self.terminal.say("type a question and press Enter; an empty line asks nothing", "dim")
        self.terminal.say("/profile: the known user's profile · /done (or /quit): end and keep the session · "
                          "Ctrl-C or Ctrl-D: the same", "dim")

    def closing(self, where: str) -> None:
        """The last line: turns kept, why the chat stopped, tags revealed, and ``where`` the
        session went (a path, or "stdout")."""
        interview = self.interview
        words = {STOP_DONE: "ended with /done", STOP_INTERRUPTED: "interrupted (Ctrl-C)",
                 STOP_END_OF_INPUT: "end of input", STOP_LIMIT: f"asked {self.max_questions} question{'s' * (self.max_questions != 1)}",
                 STOP_COMPLETE: "every tag revealed", STOP_EXHAUSTED: "the questioner had no question left",
                 STOP_ERROR: "a model call failed for good"}
        line = f"session {interview.record['id']}: {len(interview.turns)} turn(s) kept, {words.get(interview.stop, interview.stop)}"
        if self.known:
            line += f"; revealed {len(interview.elicited)}/{len(interview.target)} tags"
        self.terminal.say(f"{line} -> {where}", "bold")
        if not self.known and self.asker is not None and not any(turn["answered"] for turn in interview.turns):
            self.terminal.say("nothing was answered: the session's profile is empty", "yellow")


def find_user(path: str | Path, user_id: str | None, *, needs_questions: bool = False) -> Record:
    """The forward record of one user in ``path`` (JSONL): the one whose ``id`` is ``user_id``
    (compared as text), or the only one when ``user_id`` is None.

    Raises InputError for a malformed file (file and line named) and UsageError when no such
    user is there, when several are and no id was given, or when the record carries an ``error``.
    ``needs_questions``: the record must have funnel questions (the oracle questioners ask them).
    """
    if str(path) == "-":
        raise UsageError("--target must be a file: stdin carries the person's lines")
    found: Record | None = None
    ids: list[str] = []
    for record in read_records(path, check_questions if needs_questions else check_tags):
        ids.append(str(record["id"]))
        if user_id is None and found is None:
            found = record
        elif user_id is not None and str(record["id"]) == str(user_id):
            found = record
            break
    if not ids:
        raise UsageError(f"{source_name(path)} holds no users (it is empty)")
    if user_id is None and len(ids) != 1:
        raise UsageError(f"{source_name(path)} holds {len(ids)} users; choose one with --id "
                         f"(e.g. {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})")
    if found is None:
        raise UsageError(f"{source_name(path)} has no user with id {user_id!r} "
                         f"(it has {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})")
    if "error" in found:
        raise UsageError(f"user {found['id']!r} in {source_name(path)} carries an error from an earlier stage")
    return found


def chat(
    *,
    questioner: str | None = None,
    simulator: str | None = None,
    target: str | Path | None = None,
    user_id: str | None = None,
    tagger: str | None = None,
    max_questions: int = 10,
    profile_form: str | None = None,
    no_repeat: bool = False,
    seed: int = 0,
    out: Path | None = None,
    options: BackendOptions | None = None,
    use_cache: bool = True,
    cache_path: Path | None = None,
    stdin: TextIO | None = None,
    console=None,
) -> Record:
    """`funnelqa chat`: one interview with a person in it; returns the session, written as one
    JSON line to ``out`` (atomically) or stdout.

    ``questioner`` (a spec, ``oracle`` or ``oracle-shuffled``): the model asks, the person
    answers. ``simulator`` (a spec, with ``target``): the person asks, the simulator answers.
    Exactly one of the two. ``target``: a forward file (JSONL), ``user_id`` the user in it (may be
    left out when the file holds one user; without ``target`` it names the session, default
    ``chat-<UTC time>``). ``tagger``: the model that maps the person's answers onto the known
    user's tags (default ``local``). ``max_questions`` (T), ``profile_form``, ``no_repeat`` and
    ``seed`` as in ``simulate``. ``stdin``/``console``: where lines come from and where the chat
    is shown (default: sys.stdin, funnelqa's stderr console).

    Sessions of a known user follow ``simulate``'s contract (``"simulator": "human"`` or
    ``"questioner": "human"``; ``tagger`` and each turn's ``tagger_raw`` added); a session without
    one has ``profile`` (``transcript_text``) instead of ``elicited``/``target``. ``stop`` adds
    ``done``, ``interrupted`` and ``end-of-input`` to simulate's reasons.

    Raises UsageError for options that do not fit together, InputError for a bad target file,
    BackendUnavailable when a model cannot start, and BackendError (after writing the session,
    with its ``error``) when a model call failed for good mid-chat.
    """
    from funnelqa.console import stderr

    if max_questions < 1:
        raise UsageError("--max-questions must be at least 1")
    if (questioner is None) == (simulator is None):
        raise UsageError("say who asks: --questioner SPEC (the model asks, you answer) "
                         "or --simulator SPEC with --target FILE --id ID (you ask, the simulator answers)")
    if simulator is not None:
        if target is None:
            raise UsageError("the user simulator answers from a known user's profile: give --target FILE --id ID")
        for flag, value in (("--tagger", tagger), ("--profile-form", profile_form), ("--no-repeat", no_repeat)):
            if value:
                raise UsageError(f"{flag} is for a model questioner (--questioner); with --simulator you ask")
    if target is None and tagger is not None:
        raise UsageError("--tagger maps answers onto a known user's tags: give --target FILE --id ID too")

    asker_spec = parse_questioner(questioner) if questioner is not None else None
    simulator_spec = ModelSpec.parse(simulator) if simulator is not None else None
    tagger_text = (tagger or "local") if questioner is not None and target is not None else None
    tagger_spec = ModelSpec.parse(tagger_text) if tagger_text not in (None, WORDS_TAGGER) else None
    form = "qa"  # a person who asks sees the conversation so far: the qa form
    if asker_spec is not None:
        if asker_spec in REFERENCE_QUESTIONERS and target is None:
            raise UsageError(f"{questioner!r} asks a known user's own funnel questions: give --target FILE --id ID")
        form = profile_form or default_profile_form(asker_spec)
        if form not in render.PROFILE_FORMS:
            raise UsageError(f"unknown profile form {form!r}; use one of {', '.join(render.PROFILE_FORMS)}")
        if form == "answers" and target is None:
            raise UsageError("the 'answers' profile form shows the questioner a known user's revealed tags: "
                             "give --target FILE --id ID, or use --profile-form qa")

    if target is not None:
        record = find_user(target, user_id, needs_questions=asker_spec in REFERENCE_QUESTIONERS)
        interview: Interview = Interview(record)
    else:
        session_id = user_id or f"chat-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        interview = Transcript({"id": session_id, "tags": []})

    meta: dict = {"max_questions": max_questions}
    if asker_spec is not None:
        meta.update(questioner=redact(questioner), simulator=HUMAN, profile_form=form)
        if tagger_text is not None:
            meta["tagger"] = redact(tagger_text)
        if no_repeat:
            meta["no_repeat"] = True
        if asker_spec == ORACLE_SHUFFLED:
            meta["seed"] = seed
    else:
        meta.update(questioner=HUMAN, simulator=redact(simulator), profile_form=form)

    terminal = Terminal(stdin if stdin is not None else sys.stdin, console if console is not None else stderr)
    where = str(out) if out is not None else "stdout"
    with RecordWriter(out, resume=False) as writer:
        opened: dict[ModelSpec, Backend] = {}

        def open_model(spec: ModelSpec) -> Backend:
            # One model in two roles (questioner and tagger) is loaded once.
            if spec not in opened:
                with terminal.busy(f"loading {spec.redacted()}..."):
                    opened[spec] = open_backend(spec, options, use_cache=use_cache, cache_path=cache_path)
            return opened[spec]

        try:
            if asker_spec is not None:
                talk = Chat(interview, terminal, max_questions=max_questions, known=target is not None,
                               asker=open_questioner(asker_spec, form, open_model, seed=seed, no_repeat=no_repeat),
                               tagger=(AnswerTagger(open_model(tagger_spec)) if tagger_spec is not None
                                       else WordTagger() if tagger_text == WORDS_TAGGER else None),
                               source=source_name(target) if target is not None else "")
                talk.opening(questioner=redact(questioner), tagger=redact(tagger_text or ""), form=form)
            else:
                talk = Chat(interview, terminal, max_questions=max_questions, known=True,
                               answerer=UserSimulator(open_model(simulator_spec)), source=source_name(target))
                talk.opening(simulator=redact(simulator))
            talk.run()
        finally:
            for backend in opened.values():
                backend.close()
        session = interview.session(meta)
        if "error" in session:
            session["error"]["stage"] = "chat"
        writer.write(session)
    talk.closing(where)
    if interview.error:
        raise BackendError(f"{interview.error} (failed for good); the session so far is written, with its 'error'")
    return session

