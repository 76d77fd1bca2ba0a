"""Session records for the scoring tests: a target profile of three tags, and sessions that reveal
them turn by turn as ``simulate`` writes them."""

TARGET = [
    {"tag": "Genre", "content": "The user loves crime films."},
    {"tag": "Tone", "content": "The user prefers dark stories."},
    {"tag": "Era", "content": "The user likes the 1970s."},
]


def make_session(user, tags_per_turn, *, questions, questioner, max_questions, target=TARGET, **meta):
    """One session of ``user``: turn i asks ``questions[i]`` and reveals the tags ``tags_per_turn[i]``
    (none: answered "No preference"); ``elicited`` holds each tag's content once, in reveal order."""
    content = {t["tag"]: t for t in target}
    elicited, seen = [], set()
    for tags in tags_per_turn:
        for name in tags:
            if name not in seen:
                seen.add(name)
                elicited.append(content[name])
    turns = [{"question": q, "answer": "A." if t else "No preference", "tags": t, "answered": bool(t)}
             for q, t in zip(questions, tags_per_turn)]
    return {"id": user, "turns": turns, "elicited": elicited, "target": target, "questioner": questioner,
            "simulator": "fake:s.json", "profile_form": "qa", "max_questions": max_questions, **meta}
