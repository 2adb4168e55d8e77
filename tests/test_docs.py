"""Every code block of the documentation runs, so the docs cannot rot.

The convention (docs/contributing.md): in ``docs/**/*.md``

* ```` ```python ```` blocks run as-is, top to bottom per page, in one namespace per page, in a
  fresh temporary directory, with top-level ``await``;
* a ```` ```python ```` block made only of snippet lines (``--8<-- "examples/FILE.py"``) shows a
  file instead: the file must exist and a test must run it;
* ```` ```bash ```` blocks: every ``livekit-resume ...`` command parses through the real command
  line; where its store is the page's SQLite store it also runs, in order, against a store
  that holds a real session under the key ``ROOM``, and must exit 0;
* ```` ```text ```` blocks (output, transcripts, layouts) are not run; one right after a
  python block (blank lines between only) must be exactly what that block prints;
* any other fence, a bare one included, fails, so that no block goes untested.

A ``--8<-- "FILE:SECTION"`` line outside a fence includes that part of a file (the home page
includes the README's); its blocks are checked as the page's own. ``mkdocs build --strict``
runs too, where mkdocs is installed.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from livekit_resume import ResumableSession, open_store
from livekit_resume.cli import app
from tests import _child_agent as child

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LANGUAGES = ("python", "bash", "text")
# The key the bash blocks' commands name; the store they run against holds it.
DOC_KEY = "ROOM"
PROG = "livekit-resume"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_SNIPPET = re.compile(r'^\s*-{1,}8<-{1,}\s+"(?P<path>[^"]+)"\s*$')


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts, its language, its text (dedented)."""

    where: str
    line: int
    lang: str
    text: str
    shows: str | None = None
    """For a python block: the text block right after it (blank lines between only),
    which must be exactly what the block prints."""

    @property
    def snippets(self) -> list[str]:
        """The files a block made only of snippet lines includes; [] for ordinary code."""
        lines = [line for line in self.text.splitlines() if line.strip()]
        found = [_SNIPPET.match(line) for line in lines]
        if lines and all(found):
            return [m["path"] for m in found if m]
        return []


def _section(path: str) -> str:
    """The text a page's ``--8<-- "FILE[:SECTION]"`` line includes."""
    name, _, section = path.partition(":")
    text = (ROOT / name).read_text()
    if not section:
        return text
    start = re.search(rf"--8<-- \[start:{re.escape(section)}\].*\n", text)
    end = re.search(rf"\n.*--8<-- \[end:{re.escape(section)}\]", text)
    assert start and end, f"{name} has no section {section!r}"
    return text[start.end() : end.start()]


def blocks(text: str, where: str) -> list[Block]:
    """The fenced blocks of markdown ``text``, with the parts it includes expanded."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    closed = -1  # the line after the last closing fence
    while i < len(lines):
        snippet = _SNIPPET.match(lines[i])
        if snippet:
            found += blocks(_section(snippet["path"]), f"{where} < {snippet['path']}")
            i += 1
            continue
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        lang = opening["info"].strip().split(" ")[0] if opening["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence)}[ \t]*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        assert j < len(lines), f"{where}:{i + 1}: a fence that is never closed"
        block = Block(where, i + 1, lang, "\n".join(body) + "\n")
        adjacent = closed >= 0 and not "".join(lines[closed:i]).strip()
        if adjacent and lang == "text" and found and found[-1].lang == "python":
            found[-1] = replace(found[-1], shows=block.text)
        found.append(block)
        i = closed = j + 1
    return found


def page_blocks(page: Path) -> list[Block]:
    return blocks(page.read_text(), str(page.relative_to(ROOT)))


def _param(page: Path) -> Any:
    return pytest.param(page, id=str(page.relative_to(DOCS)))


PAGE_PARAMS = [_param(page) for page in PAGES]


# ----------------------------------------------------------------- python blocks


def compile_block(block: Block) -> Any:
    """The block as a code object whose line numbers are the page's."""
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(block.text, block.where, "exec", flags=flags, dont_inherit=True)
    ast.increment_lineno(tree, block.line)
    return compile(
        tree, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )


async def run_python(code_blocks: list[Block]) -> dict[str, Any]:
    """Run the blocks top to bottom in one namespace, awaiting those with top-level await."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in code_blocks:
        code = compile_block(block)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = eval(code, namespace)  # a docs block is the test's code, as written
            if code.co_flags & inspect.CO_COROUTINE:
                await result
        if block.shows is not None:
            assert printed.getvalue().rstrip() == block.shows.rstrip(), (
                f"{block.where}:{block.line}: the text block after it shows other output"
            )
    return namespace


@pytest.fixture
def docs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, with none of the RESUME_* settings of the caller's shell."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("RESUME_")]:
        monkeypatch.delenv(name)
    return tmp_path


@pytest.mark.parametrize("page", PAGE_PARAMS)
def test_python_blocks_run(page: Path, docs_dir: Path) -> None:
    code = [b for b in page_blocks(page) if b.lang == "python" and not b.snippets]
    if not code:
        return
    asyncio.run(run_python(code))


# ----------------------------------------------------------------- snippets


def _tested(path: str) -> bool:
    """Whether some test (besides this one) names ``path`` by its folder and file name."""
    folder, name = Path(path).parent.name, Path(path).name
    for test in ROOT.joinpath("tests").rglob("*.py"):
        if test.name == Path(__file__).name:
            continue
        source = test.read_text()
        if (f'"{folder}"' in source and name in source) or path in source:
            return True
    return False


@pytest.mark.parametrize("page", PAGE_PARAMS)
def test_snippets_exist_and_are_run_by_a_test(page: Path) -> None:
    for block in page_blocks(page):
        for path in block.snippets:
            assert (ROOT / path).is_file(), f"{block.where}:{block.line}: no file {path}"
            assert _tested(path), f"{block.where}:{block.line}: no test runs {path}"


# ----------------------------------------------------------------- fences


def test_every_block_has_a_known_language() -> None:
    unknown = [
        f"{b.where}:{b.line}: ```{b.lang}"
        for page in PAGES
        for b in page_blocks(page)
        if b.lang not in LANGUAGES
    ]
    assert not unknown, "fences must be python, bash or text:\n" + "\n".join(unknown)


# ----------------------------------------------------------------- bash blocks


def cli_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The arguments of every ``livekit-resume`` command in a shell ``script``.

    Comments go, ``\\`` continuations join, ``$(...)`` runs as a command of its own,
    ``${...}`` expansions are left out, and ``$NAME`` takes its value from ``env``.
    """
    script = script.replace("\\\n", " ")
    script = re.sub(r"\$\{[^}]*\}", "", script)
    script = script.replace("$(", " ; ").replace(")", " ; ")
    found: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|"):
                while command and re.match(r"^[A-Za-z_]\w*=", command[0]):
                    command.pop(0)  # NAME=value before a command: its environment
                if command[:1] == [PROG]:
                    found.append(command[1:])
                elif command[:3] == [Path(sys.executable).name, "-m", "livekit_resume"]:
                    found.append(command[3:])
                command = []
            else:
                command.append(re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), token))
    return found


class Refused(Exception):
    """The command line refused a docs command as a usage error."""


def parse(args: list[str]) -> None:
    """Parse ``args`` through the real command line without running it: a usage error
    (unknown command or option, a bad value, a missing argument) raises `Refused`."""
    # typer >= 0.22 runs on its own copy of click: its types stay behind typer's API, so
    # they are reached through the command objects, not imported.
    root: Any = typer.main.get_command(app)
    try:
        with root.make_context(PROG, list(args)) as ctx:
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                return
            name, command, more = root.resolve_command(ctx, rest)
            with command.make_context(name, more, parent=ctx):
                pass
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code == 0:  # --help, --version: the parser answered before running anything
            return
        if code == 2 and hasattr(e, "format_message"):
            raise Refused(e.format_message()) from e
        raise


def runs_here(args: list[str], url: str) -> bool:
    """Whether a command runs against the page's SQLite store (not a server, not the demo)."""
    stores = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--store"]
    stores += [a.split("=", 1)[1] for a in args if a.startswith("--store=")]
    return "demo" not in args and all(s == url for s in stores)


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store holding a real conversation under ``ROOM``: six versions, written by a
    real ``AgentSession`` (five turns, then a suspend)."""
    path = tmp_path_factory.mktemp("seed") / "resume.db"

    async def converse() -> None:
        store = open_store(f"sqlite:///{path}")
        try:
            _model, session = child.build_session()
            rs = ResumableSession(
                store, DOC_KEY, registry=child.registry(), userdata_type=child.Notes
            )
            await session.start(await rs.restore(session, default=child.Scribe))
            for n in range(5):
                await session.run(user_input=f"note {n}")
                await rs.checkpoint("turn")
            await rs.suspend()
        finally:
            await store.aclose()

    asyncio.run(converse())
    return path


def check_bash_block(block: Block, work: Path, seeded_store: Path) -> None:
    """Parse every ``livekit-resume`` command of ``block``; run, in order, those on the
    block's own copy of the seeded store (in ``work``), each of which must exit 0."""
    work.mkdir()
    store = work / "resume.db"
    shutil.copy(seeded_store, store)
    url = f"sqlite:///{store}"
    env = {"RESUME_STORE": url}
    for args in cli_commands(block.text, env):
        where = f"{block.where}:{block.line}: {PROG} {shlex.join(args)}"
        try:
            parse(args)
        except Refused as e:
            raise AssertionError(f"{where}: {e}") from None
        if not runs_here(args, url) or "--help" in args:
            continue
        result = CliRunner().invoke(app, args, env=env, input="y\n")
        assert result.exit_code == 0, f"{where}: exit {result.exit_code}\n{result.output}"


@pytest.mark.parametrize("page", PAGE_PARAMS)
def test_bash_blocks_use_the_real_command_line(
    page: Path, docs_dir: Path, seeded_store: Path
) -> None:
    for block in [b for b in page_blocks(page) if b.lang == "bash"]:
        check_bash_block(block, docs_dir / f"block{block.line}", seeded_store)


# ----------------------------------------------------------------- the site


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    cli_page = (tmp_path / "reference" / "cli" / "index.html").read_text()
    assert "livekit-resume ls" in cli_page  # generated from the app, not left empty
    assert (tmp_path / "reference" / "api" / "index.html").is_file()


# ----------------------------------------------------------------- the checker's own


def test_a_bare_fence_and_an_unknown_language_are_found() -> None:
    text = "```\nx\n```\n\n```json\n{}\n```\n\n  ```python\n  x = 1\n  ```\n"
    assert [(b.lang, b.line, b.text) for b in blocks(text, "t.md")] == [
        ("", 1, "x\n"),
        ("json", 5, "{}\n"),
        ("python", 9, "x = 1\n"),
    ]


def test_a_failing_python_block_fails_with_the_page_line() -> None:
    bad = blocks("text\n\n```python\nx = 1\n\nawait asyncio.sleep(0)\n```\n", "t.md")
    with pytest.raises(NameError) as e:
        asyncio.run(run_python(bad))
    lines = [t.lineno for t in traceback.extract_tb(e.value.__traceback__) if t.filename == "t.md"]
    assert lines == [6]


def test_a_text_block_right_after_a_python_block_must_be_its_output() -> None:
    page = "```python\nprint(1 + 1)\n```\n\n```text\n{}\n```\n"
    asyncio.run(run_python(blocks(page.format(2), "t.md")[:1]))
    with pytest.raises(AssertionError, match=r"t\.md:1: the text block after it shows other"):
        asyncio.run(run_python(blocks(page.format(3), "t.md")[:1]))
    apart = blocks("```python\nprint(2)\n```\n\nprose\n\n```text\nx\n```\n", "t.md")
    assert apart[0].shows is None  # prose between: the text block is not its output


def test_blocks_of_one_page_share_a_namespace() -> None:
    two = blocks("```python\nx = 1\n```\n```python\ny = x + 1\n```\n", "t.md")
    assert asyncio.run(run_python(two))["y"] == 2


def test_cli_commands_are_found_in_pipes_substitutions_and_continuations() -> None:
    script = textwrap.dedent(
        """\
        export X=1   # livekit-resume ls in a comment is not a command
        page=$(livekit-resume ls --json --limit 100 ${cursor:+--after "$cursor"})
        RESUME_TTL=60 livekit-resume --store "$RESUME_STORE" show ROOM | jq . && \\
          livekit-resume history \\
            ROOM
        """
    )
    assert cli_commands(script, {"RESUME_STORE": "sqlite:///x.db"}) == [
        ["ls", "--json", "--limit", "100"],
        ["--store", "sqlite:///x.db", "show", "ROOM"],
        ["history", "ROOM"],
    ]


@pytest.mark.parametrize(
    "args",
    [["lss"], ["ls", "--bogus"], ["show"], ["ls", "--limit", "many"], ["--store"]],
    ids=["command", "option", "argument", "value", "global"],
)
def test_a_command_line_the_cli_would_refuse_is_refused(args: list[str]) -> None:
    with pytest.raises(Refused):
        parse(args)


def test_a_docs_command_that_fails_on_the_store_fails(docs_dir: Path, seeded_store: Path) -> None:
    good = blocks("```bash\nlivekit-resume show ROOM && livekit-resume rm ROOM\n```\n", "t.md")
    check_bash_block(good[0], docs_dir / "good", seeded_store)
    bad = blocks("```bash\nlivekit-resume rm ROOM\nlivekit-resume show ROOM\n```\n", "t.md")
    with pytest.raises(AssertionError, match="show ROOM: exit 1"):
        check_bash_block(bad[0], docs_dir / "bad", seeded_store)


def test_commands_the_cli_accepts_parse() -> None:
    parse(["ls", "--store", "sqlite:///x.db", "--json"])
    parse(["--help"])
    parse(["diff", "ROOM", "3", "5"])


def test_the_api_reference_renders_every_public_name() -> None:
    import livekit_resume

    page = (DOCS / "reference" / "api.md").read_text()
    shown = set(re.findall(r"^::: livekit_resume\.(\w+)$", page, re.M))
    assert shown == set(livekit_resume.__all__)


def test_every_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [str(p.relative_to(DOCS)) for p in PAGES if f" {p.relative_to(DOCS)}" not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_the_guide_lists_every_metric_a_worker_exports() -> None:
    # Operators scrape these: one added in code and not in the guide's table is a
    # metric nobody knows to watch.
    from prometheus_client import REGISTRY

    import livekit_resume.agent_hooks  # noqa: F401  (registers every metric)

    exported = {
        f"{m.name}_total" if m.type == "counter" else m.name
        for m in REGISTRY.collect()
        if m.name.startswith("livekit_resume_")
    }
    table = set(
        re.findall(r"^\| `(livekit_resume_[a-z_]+)", (ROOT / "docs/guide.md").read_text(), re.M)
    )
    assert exported and exported == table
