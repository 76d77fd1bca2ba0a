"""Fake-backend scripts that answer the forward prompts like a perfect teacher model would."""

from __future__ import annotations

from funnelqa.render import format_tags


def first_line(tags) -> str:
    return format_tags(tags[:1])


def forward_rules(records: list[dict]) -> list[dict]:
    """Rules for `fake:SCRIPT`: structure returns the tags in reverse order, rank restores the
    record's order, generate-questions returns the record's questions."""
    rules = []
    for record in records:
        shuffled = list(reversed(record["tags"]))
        rules.append({"contains": record["profile"].strip(), "response": {"tags": shuffled}})
        rules.append({"contains": "Tags:\n" + first_line(shuffled), "response": {"ranking": [t["tag"] for t in record["tags"]]}})
        rules.append({"contains": "Tags, from general to specific:\n" + first_line(record["tags"]),
                      "response": {"questions": record["questions"]}})
    return rules
