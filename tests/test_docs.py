"""docs/cli.md documents every subcommand and every flag the parser has, with an example."""

import argparse
import re
from pathlib import Path

from hessdiag.cli import build_parser

DOC = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def _sections():
    """{command: its section text} split at '## `hessdiag NAME`' headings."""
    parts = re.split(r"^## `hessdiag (\w+)`", DOC, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_subcommand_has_a_section_with_an_example():
    _, commands = _subcommands()
    sections = _sections()
    for name in commands:
        assert name in sections, f"docs/cli.md lacks a section for `hessdiag {name}`"
        assert re.search(rf"^\$? ?hessdiag {name}\b", sections[name], flags=re.M), \
            f"no example command line for `hessdiag {name}`"


def test_every_flag_is_documented_with_an_example():
    parser, commands = _subcommands()
    sections = _sections()
    for flag in (o for a in parser._actions for o in a.option_strings if o.startswith("--")):
        if flag != "--help":
            assert f"`{flag}`" in DOC and re.search(rf"hessdiag {flag}\b", DOC), flag
    for name, sub in commands.items():
        text = sections.get(name, "")
        for action in sub._actions:
            flags = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            for flag in flags:
                assert f"**`{flag}" in text, f"`hessdiag {name} {flag}` is not documented in docs/cli.md"
                example = re.search(rf"^\$? ?hessdiag {name} .*{re.escape(flag)}\b", text, flags=re.M)
                continued = re.search(rf"\\\n\s+.*{re.escape(flag)}\b", text)
                assert example or continued, f"no example using `hessdiag {name} {flag}`"


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, as written, from another folder (it writes layers.png)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    code = re.search(r"## Python\s+```python\n(.*?)```", readme, flags=re.S).group(1)
    code = code.replace('"hessdiag/data/', f'"{root}/hessdiag/data/')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert (tmp_path / "layers.png").stat().st_size > 0
    assert scope["last"].num_params == 490 and scope["last"].params == ["5.*"]
    assert scope["last"].estimator == "hutchinson" and scope["last"].samples is not None
