"""The docs cannot drift from the code (Ray's doc_code habit): every command a Markdown file shows names a module,
Make target or Ray CLI subcommand that exists, with flags it accepts; the long-running ones are run by `make run`
and the job tests, and each command here is checked with --help. No Markdown line is over 120 characters, the
README's headline table is docs/results.md's, and every doc that quotes serving's default retrieval quotes it right.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import typing
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_MODULES = ("jobs", "bench", "serve_app", "seminar_ray")
INLINE = re.compile(r"`((?:\.venv/bin/)?python3? (?:-m )?[\w./]+[^`]*)`")


def markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split()]  # generated tables too: jobs/compare.py writes them within 120 columns


def shell_lines(text: str) -> list[str]:
    """The command lines of a Markdown text: fenced shell blocks and 4-space blocks (continuations joined,
    comments dropped), and inline `python ...` commands in prose."""
    found, block, fence = [], [], None
    for line in text.split("\n"):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        in_block = (fence is not None and fence in ("", "bash", "sh")) or (fence is None and line.startswith("    "))
        if in_block and line.strip() and not line.lstrip().startswith("- "):
            block.append(line.strip())
        elif fence is None:
            found += INLINE.findall(line)
    lines, current = [], ""
    for line in block:
        current += line[:-1].rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return found + [re.sub(r"\s+#.*$", "", cmd) for line in lines for cmd in line.split("&&")]


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every project, make, ray or serve command the docs show."""
    out = []
    for path in markdown_files():
        for line in shell_lines(path.read_text()):
            try:
                argv = shlex.split(line)
            except ValueError:
                argv = line.split()
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value cmd
                argv = argv[1:]
            if "--" in argv and argv[0] == "ray":  # ray job submit ... -- python jobs/x.py ...
                cut = argv.index("--")
                out.append((str(path.relative_to(ROOT)), argv[cut + 1 :]))
                argv = argv[:cut]
            if argv and argv[0] in ("python", "python3", ".venv/bin/python", "make", "ray", "serve"):
                out.append((str(path.relative_to(ROOT)), argv))
    return out


def module_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) of a `python -m pkg.mod ...` or `python pkg/mod.py ...` command of this project."""
    if argv[0] not in ("python", "python3", ".venv/bin/python") or len(argv) < 2:
        return None
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
    elif argv[1].endswith(".py"):
        module, args = argv[1][:-3].replace("/", "."), argv[2:]
    else:
        return None
    if module.split(".")[0] not in PROJECT_MODULES or module.split(".")[-1].isupper():  # jobs.X: a placeholder
        return None
    return module, args


def flags(args: list[str]) -> set[str]:
    return {a.split("=")[0] for a in args if a.startswith("--") and len(a) > 2}


INSPECT_SCRIPT = """
import contextlib, io, json, runpy, sys
import click
want = json.loads(sys.argv[1])
out = {"modules": {}, "cli": {}}
for module in want["modules"]:
    buf = io.StringIO()
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    except ImportError as exc:
        code, buf = f"no such module: {exc}", io.StringIO()
    out["modules"][module] = [code, buf.getvalue()]
from ray.scripts.scripts import cli as ray_cli
from ray.serve.scripts import cli as serve_cli
for words in want["cli"]:
    cmd = {"ray": ray_cli, "serve": serve_cli}[words[0]]
    for word in words[1:]:
        cmd = cmd.commands.get(word) if isinstance(cmd, click.Group) else None
    opts = None if cmd is None else [o for p in cmd.params for o in p.opts + p.secondary_opts]
    out["cli"][" ".join(words)] = opts
sys.stdout.write(json.dumps(out))
"""


def cli_words(argv: list[str]) -> tuple[str, ...]:
    """`ray job submit`, `ray start`, `serve deploy`: the CLI and its subcommand words."""
    words = [a for a in argv[1:3] if re.fullmatch(r"[a-z][\w-]*", a)]
    return tuple(argv[:1] + words[: 2 if words[:1] == ["job"] else 1])


@cache
def inspected() -> dict:
    """Every documented project module's exit code and --help text, and every documented Ray/Serve CLI
    subcommand's options (None when it does not exist), from one fresh process: some benchmarks set thread counts
    on import, and Ray's CLI is slow to import."""
    found = commands()
    want = {
        "modules": sorted({m[0] for _, argv in found if (m := module_of(argv))}),
        "cli": sorted({cli_words(argv) for _, argv in found if argv[0] in ("ray", "serve")}),
    }
    proc = subprocess.run(
        [sys.executable, "-c", INSPECT_SCRIPT, json.dumps(want)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_no_markdown_line_is_over_120_characters():
    long = [
        f"{p.relative_to(ROOT)}:{n}: {len(line)}"
        for p in markdown_files()
        for n, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1)
        if len(line) > 120
    ]
    assert long == []


def test_docs_show_commands_and_the_collector_finds_them():
    found = commands()
    shown = {" ".join(argv[:3]) for _, argv in found}
    for expected in ("python jobs/pretrain.py", "ray job submit", "make run", "python -m bench.retrieval"):
        assert any(s.startswith(expected) for s in shown), expected
    assert shell_lines("```bash\npython jobs/x.py --a 1 \\\n    --b 2   # note\n```\nrun `python -m bench.y --q`") == [
        "python -m bench.y --q",
        "python jobs/x.py --a 1 --b 2",
    ]


def test_every_documented_project_command_exists_with_its_flags():
    texts = inspected()["modules"]
    bad = []
    for where, argv in commands():
        if (m := module_of(argv)) is None:
            continue
        module, args = m
        code, text = texts[module]
        missing = sorted(f for f in flags(args) if f not in text)
        if code != 0 or missing:
            bad.append(f"{where}: python -m {module}: exit {code}, flags not in --help: {missing}")
    assert bad == []


def test_every_documented_make_target_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    shown = {(where, a) for where, argv in commands() if argv[0] == "make" for a in argv[1:] if "=" not in a}
    assert {(where, t) for where, t in shown if t not in targets} == set()


def test_every_documented_ray_and_serve_command_exists_with_its_flags():
    options = inspected()["cli"]
    bad = []
    for where, argv in commands():
        if argv[0] in ("ray", "serve"):
            words = " ".join(cli_words(argv))
            known = options[words]
            bad += [f"{where}: {words} {f}" for f in sorted(flags(argv)) if known is None or f not in known]
    assert bad == []


def test_serving_has_one_default_retrieval_and_every_doc_quotes_it():
    from seminar_ray.serving.stages import DEFAULT_RETRIEVAL, RETRIEVAL_METHODS, RetrievalStage
    from serve_app.app import AppArgs

    assert AppArgs.model_fields["retrieval"].default == DEFAULT_RETRIEVAL
    assert typing.get_args(AppArgs.model_fields["retrieval"].annotation) == RETRIEVAL_METHODS
    assert RetrievalStage.__init__.__defaults__[-1] == DEFAULT_RETRIEVAL
    quoted = [
        (str(p.relative_to(ROOT)), line)
        for p in markdown_files()
        for line in p.read_text().split("\n")
        if "DEFAULT_RETRIEVAL" in line
    ]
    assert len({name for name, _ in quoted}) >= 3, "design, serving and retrieval docs name the constant"
    window = {str(p.relative_to(ROOT)): p.read_text() for p in markdown_files()}
    for name, line in quoted:
        text = window[name]
        at = text.index(line)
        assert f"`{DEFAULT_RETRIEVAL}`" in text[max(0, at - 200) : at + len(line) + 200], (name, line)


def test_readme_headline_table_is_the_results_headline_table():
    def headline(path: str) -> str:
        text = (ROOT / path).read_text()
        return text.split("<!-- headline -->")[1].split("<!-- /headline -->")[0]

    assert headline("README.md") == headline("docs/results.md")
    assert "SEMINAR" in headline("README.md")
