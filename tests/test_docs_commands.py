"""The commands the README and the docs show are the commands the parser takes.

Every ``lat COMMAND ...`` (also after ``accelerate launch ... -m`` or ``torchrun ... -m``)
and every ``scripts/NAME.py ...`` in the README's and docs' code is checked against that
command's own argparse parser. A line of a code block is a command to copy: it is parsed
whole, so a renamed or removed flag, a missing required option or a bad choice fails
here (UPPERCASE placeholders stand for values; ``...`` marks elided arguments, and then
only what is shown is checked). Inline code names flags in prose: each flag, each value
of a flag with choices, and each config key (``section.key=value``) must exist. A
synopsis's ``[--flag VALUE]`` shows the default.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from autoencoderkl.config import VAEConfig, valid_keys
from lat.cli import COMMANDS
from latent_diffusion.config import LDMConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = {module.rsplit(".", 1)[1] + ".py": name for name, (module, _) in COMMANDS.items()}
SCRIPTS["benchmark.py"] = "benchmark"
CONFIG_KEYS = {"train-vae": set(valid_keys(VAEConfig)), "train-ldm": set(valid_keys(LDMConfig))}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # FOLDER, DIR, R: a value to fill in
COMMAND_RE = re.compile(r"(?:^|\s)(?:-m\s+)?lat\s+([a-z][a-z-]+)|(?:^|\s)(?:scripts/)?([a-z_]+\.py)\b")


def code_snippets(page: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, whole) of every code block line (continuations joined; whole) and inline code span."""
    text = page.read_text()
    found: list[tuple[int, str]] = []
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).split("\n")
        k = 0
        while k < len(lines):
            start, line = k, lines[k]
            while line.endswith("\\") and k + 1 < len(lines):
                k += 1
                line = line[:-1] + " " + lines[k].strip()
            found.append((first + start, line, True))
            k += 1
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for span in re.finditer(r"`([^`]+)`", prose):
        found.append((prose.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " "), False))
    return found


def invocations() -> list[tuple[str, str, list[str], bool]]:
    """(where, command name, its argument tokens, whether it is a whole command) of every command shown."""
    out = []
    for page in PAGES:
        for line_no, text, whole in code_snippets(page):
            text = re.sub(r"\s+#.*$", "", text.strip()).removeprefix("$ ")
            match = COMMAND_RE.search(text)
            if not match or "$" in text or "<" in text:  # shell variables, loops, placeholders <...>
                continue
            name = match.group(1) or SCRIPTS.get(match.group(2))
            if name is None or (match.group(1) and name not in COMMANDS):
                if match.group(1):  # `lat nosuch`: a command that does not exist
                    out.append((f"{page.name}:{line_no}", name, [], whole))
                continue
            rest = text[match.end():].replace("\\|", "|")
            try:
                tokens = shlex.split(rest)
            except ValueError:
                continue
            if not tokens:  # the command's name alone, in prose
                continue
            out.append((f"{page.name}:{line_no}: {text[:90]}", name, tokens, whole))
    return out


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser, intermixed: bool):
        self.parser, self.intermixed = parser, intermixed


def parser_of(name: str, monkeypatch) -> tuple[argparse.ArgumentParser, bool]:
    """The command's own ``ArgumentParser`` (caught as its ``parse_args`` would run)."""
    module = importlib.import_module("lat.benchmark.cli" if name == "benchmark" else COMMANDS[name][0])

    def catch(intermixed):
        def parse(self, args=None, namespace=None):
            raise _Parser(self, intermixed)
        return parse

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", catch(False))
        m.setattr(argparse.ArgumentParser, "parse_intermixed_args", catch(True))
        with pytest.raises(_Parser) as caught:
            module.parse_args([])
    return caught.value.parser, caught.value.intermixed


def check(name: str, tokens: list[str], whole: bool, monkeypatch) -> list[str]:
    """What is wrong with ``lat NAME TOKENS`` (empty: nothing); ``whole``: parse it, not only its flags."""
    if name not in COMMANDS:
        return [f"there is no command lat {name}"]
    parser, intermixed = parser_of(name, monkeypatch)
    options = parser._option_string_actions
    problems, args, elided = [], [], not whole
    for k, token in enumerate(tokens):
        if token in ("...", "…"):
            elided = True
            continue
        if token.startswith("[") and token.lstrip("[").startswith("-"):  # a synopsis: [--flag VALUE]
            flag = token.strip("[]")
            value = tokens[k + 1].rstrip("]") if not token.endswith("]") and k + 1 < len(tokens) else None
            default = options[flag].default if flag in options else None
            if default is not None and value is not None and PLACEHOLDER.match(value) is None and "|" not in value:
                if str(default) != value and _number(value) != default:
                    problems.append(f"the synopsis shows [{flag} {value}], the default is {default!r}")
            args.append(flag)
            continue
        token = token.strip("[]")
        if "|" in token and not token.startswith("-") and "=" not in token:
            token = token.split("|")[0]  # alternatives: the first stands for them
        action = options.get(args[-1]) if args else None
        if PLACEHOLDER.match(token) and action is not None and action.type in (int, float):
            token = "1"  # --resolution R: a number
        args.append(token)
    for k, token in enumerate(args):
        flag = token.split("=")[0]
        if token.startswith("--") and flag not in options:
            problems.append(f"no option {flag}")
        elif token.startswith("--") and options[flag].choices and k + 1 < len(args) and "=" not in token:
            value = args[k + 1]
            if not value.startswith("-") and not PLACEHOLDER.match(value) and value not in options[flag].choices:
                problems.append(f"{flag} {value}: not one of {list(options[flag].choices)}")
        if re.match(r"^[a-z_]+\.[a-z_.]+=", token) and name in CONFIG_KEYS and flag not in CONFIG_KEYS[name]:
            problems.append(f"no config key {flag}")
    if not problems and not elided:
        parse = parser.parse_intermixed_args if intermixed else parser.parse_args

        def exit(status=0, message=None):
            raise ValueError(message if status else "")

        monkeypatch.setattr(parser, "exit", exit)
        try:
            parse(args)
        except ValueError as exc:
            if str(exc):
                problems.append(str(exc).strip().splitlines()[-1])
    return problems


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_the_pages_show_commands_at_all():
    shown = {name for _, name, _, _ in invocations()}
    assert {"train-vae", "encode-latents", "train-ldm", "sample-ldm", "eval-vae", "eval-ldm", "make-shards",
            "benchmark"} <= shown


def test_every_command_in_the_readme_and_docs_parses(monkeypatch, capsys):
    failures = []
    for where, name, tokens, whole in invocations():
        problems = check(name, tokens, whole, monkeypatch)
        capsys.readouterr()  # argparse's usage lines
        failures += [f"{where}\n    -> {p}" for p in problems]
    assert not failures, "\n".join(failures)
