"""The docs stay true: every CLI flag is in docs/cli.md, every message and field in docs/protocol.md,
every request field in docs/api.md."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from skynet import schema, wire
from skynet.cli import parser

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = Path(__file__).resolve().parents[1] / "README.md"


def _subcommands():
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices.items()


@pytest.mark.parametrize("name,sub", list(_subcommands()))
def test_every_flag_is_documented(name, sub):
    text = (DOCS / "cli.md").read_text()
    assert f"`skynet {name}" in text
    for action in sub._actions:
        if action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        for flag in action.option_strings:
            assert f"`{flag}" in text, f"{name} {flag} is missing from docs/cli.md"


@pytest.mark.parametrize("mtype", sorted(wire.MESSAGES))
def test_every_message_is_documented(mtype):
    text = (DOCS / "protocol.md").read_text()
    row = next((l for l in text.splitlines() if l.startswith(f"| `{mtype}` |")), None)
    assert row is not None, f"message {mtype} missing from docs/protocol.md"
    for f in fields(wire.MESSAGES[mtype]):
        assert f"`{f.name}" in row, f"{mtype}.{f.name} missing from its row in docs/protocol.md"


def test_readme_starts_with_the_two_commands():
    lines = [l for l in README.read_text().splitlines() if l.strip()]
    code = lines[lines.index("```sh") + 1:lines.index("```sh") + 3]
    assert code[0].startswith("make demo") and code[1].startswith("make test")


@pytest.mark.parametrize("model", [schema.CompletionRequest, schema.ChatRequest, schema.TokenizeRequest,
                                   schema.DetokenizeRequest])
def test_every_request_field_is_documented(model):
    text = (DOCS / "api.md").read_text()
    for name in model.model_fields:
        assert f"`{name}`" in text, f"{model.__name__}.{name} is missing from docs/api.md"
