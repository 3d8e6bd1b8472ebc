"""docs/cli.md's command synopsis ("## Synopsis") and the argparse parsers stay in step.

Every option of every subcommand appears in that subcommand's synopsis line (required ones
outside brackets, the rest inside), with its default where it has one that is not a path; the
synopsis names no option, subcommand or positional argument that does not exist. Conventions
the page states under the block: a value shown is the default, UPPER CASE names a value to
give, a|b lists the choices (the default first), and `[MODEL OPTIONS]` stands for the
`MODEL OPTIONS:` entry.
"""

import argparse
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
GROUP = "MODEL OPTIONS"
ENV = (
    "SHARDINFER_API_KEY",
    "SHARDINFER_BACKEND_API_KEY",
    "SHARDINFER_WEIGHT_CACHE",
    "SHARDINFER_COMPILATION_CACHE",
    "SHARDINFER_GGUF_THREADS",
)


def _synopsis() -> dict[str, str]:
    """{"generate": "...", ..., GROUP: "..."} from the first code block of the section."""
    text = PAGE.read_text()
    section = text.split("\n## Synopsis\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if not line.strip():
            current = None
        elif line.startswith("shardinfer "):
            current = line.split()[1]
            entries[current] = line.split(None, 2)[2] if len(line.split()) > 2 else ""
        elif line.startswith(GROUP + ":"):
            current = GROUP
            entries[current] = line[len(GROUP) + 1 :]
        elif line[0].isspace() and current is not None:
            entries[current] += " " + line.strip()
        else:
            raise AssertionError(f"unexpected synopsis line {line!r}")
    group = entries.pop(GROUP, None)
    for command, usage in entries.items():
        if f"[{GROUP}]" in usage:
            assert group is not None, f"{command} uses [{GROUP}], which the block never defines"
            entries[command] = usage.replace(f"[{GROUP}]", group)
    return entries


def _items(usage: str) -> list[tuple[str, str | None, int]]:
    """(word, its value or None, bracket depth) for every option and positional of a usage
    string; an option's value is the word right after it, which is not listed itself."""
    tokens = re.findall(r"\[|\]|[^\s\[\]]+", usage)
    items, depth, i = [], 0, 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok == "[":
            depth += 1
        elif tok == "]":
            depth -= 1
            assert depth >= 0, f"unbalanced brackets in {usage!r}"
        elif tok != "--" and tok.startswith("-") and i < len(tokens) and tokens[i] not in "[]":
            if tokens[i].startswith("-"):
                items.append((tok, None, depth))
            else:
                items.append((tok, tokens[i], depth))
                i += 1
        else:
            items.append((tok, None, depth))
    assert depth == 0, f"unbalanced brackets in {usage!r}"
    return items


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:  # defaults read from the environment: take the built-in ones
            mp.delenv(name, raising=False)
        from shardinfer.cli import _parser

        parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _is_path(default) -> bool:
    text = str(default)
    if re.fullmatch(r"\d+/\d+", text):  # a fraction (batch --shard K/N), not a path
        return False
    return isinstance(default, str | Path) and ("/" in text or text == "~")


def _placeholder(value: str | None) -> bool:
    return value is not None and re.fullmatch(r"[A-Z][A-Z0-9_]*|\.\.\.", value) is not None


def test_the_synopsis_lists_every_subcommand_and_no_other(parsers):
    assert sorted(_synopsis()) == sorted(parsers)


def test_every_option_appears_with_its_default(parsers):
    synopsis = _synopsis()
    for command, parser in parsers.items():
        items = _items(synopsis[command])
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"shardinfer {command} {'/'.join(action.option_strings) or action.dest}"
            if not action.option_strings:  # a positional: its name in capitals, unbracketed
                name = (action.metavar or action.dest).upper()
                assert (name, 0) in [(w, d) for w, _, d in items], f"{where}: not as {name}"
                continue
            found = [(v, d) for w, v, d in items if w in action.option_strings]
            assert found, f"{where} is missing from the synopsis in docs/cli.md"
            depths = {d for _, d in found}
            if action.required:
                assert 0 in depths, f"{where} is required: it belongs outside brackets"
            else:
                assert 0 not in depths, f"{where} is optional: it belongs in brackets"
            if action.nargs == 0:  # a flag (store_true, ...): no value to show
                assert all(v is None or v.startswith("-") for v, _ in found), where
                continue
            values = [v for v, _ in found]
            assert all(v is not None for v in values), f"{where}: show a value or a placeholder"
            if action.choices is not None:
                shown = [v for v in values if "|" in v or v in action.choices]
                assert shown, f"{where}: list its choices a|b"
                alternatives = shown[0].split("|")
                assert sorted(alternatives) == sorted(action.choices), f"{where}: {shown[0]}"
                if action.default is not None:
                    assert alternatives[0] == action.default, f"{where}: the default goes first"
                continue
            if action.default is None or _is_path(action.default):
                for v in values:  # no value that reads like a default it does not have
                    assert _placeholder(v) or "|" in v, f"{where}: {v!r} is not its default"
                continue
            convert = action.type or str
            assert any(not _placeholder(v) and convert(v) == action.default for v in values), (
                f"{where}: show its default {action.default!r}, not {values}"
            )


def test_the_synopsis_names_no_option_that_does_not_exist(parsers):
    for command, usage in _synopsis().items():
        known = {s for a in parsers[command]._actions for s in a.option_strings}
        positionals = [
            (a.metavar or a.dest).upper()
            for a in parsers[command]._actions
            if not a.option_strings and not isinstance(a, argparse._HelpAction)
        ]
        for word, _, _ in _items(usage):
            if word == "--":  # the end of options, before a command to pass on (launch)
                continue
            if word.startswith("-"):
                assert word in known, f"docs/cli.md: shardinfer {command} has no option {word}"
            elif word != "...":
                assert word in positionals, f"docs/cli.md: shardinfer {command} takes no {word}"


def test_the_page_mentions_no_option_that_does_not_exist(parsers):
    known = {s for p in parsers.values() for a in p._actions for s in a.option_strings}
    for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", PAGE.read_text()):
        assert option in known, f"docs/cli.md names {option}, which no command has"
