"""docs/cli.md documents every subcommand and every flag the parser has, with an example, and
the outputs it shows are what the commands print (tests/doc_examples.py)."""

import argparse
import re
from pathlib import Path

import pytest

from hessdiag.cli import build_parser
from tests import doc_examples

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


# -- documented outputs are real outputs (tests/doc_examples.py) -------------------------------

EXAMPLES = doc_examples.parse_examples(DOC)


@pytest.fixture(scope="module")
def real_runs():
    """Every documented command, run once in document order in one scratch folder (about
    30 s on one core: the tiny sweep and the `hessdiag check` battery take most of it)."""
    with doc_examples.scratch_folder() as folder:
        yield doc_examples.run_examples(EXAMPLES, folder)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.label for e in EXAMPLES])
def test_documented_output_has_the_shape_of_a_real_run(example, real_runs):
    code, lines = real_runs[example.line]
    assert code == doc_examples.expected_exit_code(example), "\n".join(lines)
    mismatch = doc_examples.shape_mismatch(example, lines)
    assert mismatch is None, mismatch + "\n(regenerate the docs: python -m tests.doc_examples)"


def test_the_documented_examples_are_found():
    commands = [e.argv[e.argv.index("hessdiag") + 1 if "hessdiag" in e.argv else 1] for e in EXAMPLES]
    assert {"measure", "psi", "sweep", "plot", "analyze", "check"} <= set(commands)
    assert any(e.argv[0] == "torchrun" for e in EXAMPLES)  # the distributed example runs too
    table = next(e for e in EXAMPLES if e.output and e.output[-2].startswith("estimator=exact"))
    assert table.argv[-4:] == ["--json", "out/result.json", "--plot", "out/layers.svg"]  # continuation joined


def test_a_changed_field_row_or_column_is_a_mismatch():
    example = next(e for e in EXAMPLES if e.output and e.output[-2].startswith("estimator=exact"))
    real = list(example.output)
    assert doc_examples.shape_mismatch(example, real) is None
    renumbered = [re.sub(r"\d", "7", line) for line in real]  # figures may differ
    assert doc_examples.shape_mismatch(example, renumbered) is None
    footer = len(real) - 2
    for changed in (
        real[:footer] + [real[footer].replace("  HVPs=0", "")] + real[footer + 1:],  # a field less
        real[:footer] + [real[footer] + "  seed=0"] + real[footer + 1:],  # a field more
        real[:2] + real[3:],  # a row less
        [real[0].replace("95% interval", "interval")] + real[1:],  # a column renamed
    ):
        assert doc_examples.shape_mismatch(example, changed) is not None


def test_abridged_outputs_compare_head_and_tail():
    example = doc_examples.Example("hessdiag check", ["$ hessdiag check"], ["a 1", "...", "z 2"], 1)
    assert doc_examples.shape_mismatch(example, ["a 3", "b", "c", "z 4"]) is None
    assert doc_examples.shape_mismatch(example, ["a 3", "b", "c", "y 4"]) is not None
    assert doc_examples.abridge_like(example.output, ["a 3", "b", "z 4"]) == ["a 3", "...", "z 4"]


def test_regenerating_with_the_documented_outputs_leaves_the_doc_unchanged():
    outputs = {e.line: [line for line in e.output if line != "..."] for e in EXAMPLES}
    assert doc_examples.regenerate(DOC, outputs) == DOC


def test_every_reference_to_the_docs_points_inside_the_repository():
    """Code, README and docs cite ``docs/NAME.md`` and often a section (``docs/NAME.md,
    "Section"``): each cited file exists and each cited section is one of its headings
    (or a paragraph's bold title),
    so a reader can follow every reference without anything outside the repository."""
    root = Path(__file__).resolve().parents[1]
    sources = [root / "README.md", *sorted((root / "docs").glob("*.md")),
               *sorted((root / "hessdiag").rglob("*.py")), *sorted((root / "benchmarks").glob("*.py"))]
    cited, broken = 0, []
    for source in sources:
        text = " ".join(source.read_text().split())  # a reference may wrap over lines
        for name, section in re.findall(r"docs/([\w/]+\.md)(?:\)?,? \"([^\"]+)\")?", text):
            target = root / "docs" / name
            cited += 1
            if not target.exists():
                broken.append(f"{source.name} cites docs/{name}, which does not exist")
            elif section:
                # headings, and the bold run-in titles of paragraphs ("**HVP route.** ...")
                headings = re.findall(r"^(?:#+ (.+)$|\*\*([^*]+?)\.?\*\*)", target.read_text(), flags=re.M)
                headings = [a or b for a, b in headings]
                if not any(section.strip("`") in heading.strip("`") for heading in headings):
                    broken.append(f"{source.name} cites {section!r} of docs/{name}, which has no such heading")
    assert not broken, "\n".join(broken)
    assert cited > 100  # the pattern still finds the references
