"""Helpers of tests/test_docs_commands_on_cpu.py (not a test module): the commands of README.md and docs/**/*.md,
and a runner that executes many Python command lines in one interpreter.

Extraction. A code block is an indented block (4 spaces, after a blank line) or a fenced block (```, no language or
a shell one). A block is a shell block when its first line that is not a comment starts like a command
(``COMMAND_RE``: optional ``VAR=value`` prefixes, then python / bash / ray / ...). In a shell block, ``# ...``
comment lines are skipped, a trailing ``   # comment`` is cut, backslash continuations are joined, and every other
line is one command. Inline code spans (`...`) in the prose that start like a command are commands too. A
command's key is its text with runs of whitespace collapsed.

Runner. ``python tests/docs_commands.py JOBS.json RESULTS.json`` runs each job (``argv``: the arguments after
``python``, i.e. ``-m module ...`` or ``script.py ...``; ``cwd``; ``env``) in this one process through ``runpy``, as
``python`` would run it (or ``code``: Python source to exec), with stdout and stderr captured at the
file-descriptor level, and writes each job's exit status, output and seconds. One interpreter for every Python
command of the docs: a fresh one costs ~12 s of imports (torch, verl) per command on 2 cores, which is most of
what a dry run costs.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("python3", "python", "bash", "sh", "pytest", "pip", "uv", "export", "ray", "vllm", "wandb", "git",
            "diff", "grep", "cd", "torchrun", "huggingface-cli", "hf")  # fmt: skip
COMMAND_RE = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:" + "|".join(map(re.escape, PROGRAMS)) + r")(?:\s|$)")
SHELL_FENCES = ("", "bash", "sh", "shell", "console", "zsh")
_TRAILING_COMMENT = re.compile(r"(?:^|\s)#(?:\s.*)?$")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository
    line: int  # 1-based line where the command starts
    text: str  # the key: whitespace collapsed, continuations joined, trailing comment cut
    inline: bool  # from an inline code span, not a code block


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the block's first content line
    fence: str | None  # None: indented block; else the fence's language ("" for none)
    lines: tuple[str, ...]  # without the indentation / fences


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def normalise(text: str) -> str:
    return " ".join(text.split())


def code_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            blocks.append(Block(i + 2, line.strip()[3:].strip().lower(), tuple(lines[i + 1 : j])))
            i = j + 1
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = lines[i:j]
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(i + 1, None, tuple(b[4:] for b in body)))
            i = j
        else:
            i += 1
    return blocks


def is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def is_shell_block(block: Block) -> bool:
    if block.fence is not None and block.fence not in SHELL_FENCES:
        return False
    first = next((line for line in block.lines if line.strip() and not is_comment(line)), "")
    return bool(COMMAND_RE.match(first.strip()))


def block_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) for each command of a shell block: comments skipped, continuations joined."""
    commands, parts, start = [], [], 0
    for offset, raw in enumerate(block.lines):
        if not parts and (not raw.strip() or is_comment(raw)):
            continue
        if not parts:
            start = block.line + offset
        line = _TRAILING_COMMENT.sub("", raw).rstrip()
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        commands.append((start, normalise(" ".join(parts))))
        parts = []
    if parts:
        commands.append((start, normalise(" ".join(parts))))
    return commands


def prose(text: str) -> str:
    """The text with every code block's lines (fences included) blanked, line numbers kept."""
    lines = text.splitlines()
    for block in code_blocks(text):
        first = block.line - 1 if block.fence is None else block.line - 2
        last = block.line - 1 + len(block.lines) + (0 if block.fence is None else 1)
        for k in range(first, min(last, len(lines))):
            lines[k] = ""
    return "\n".join(lines)


def inline_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) for each inline code span of the prose that starts like a command."""
    body, found, offset = prose(text), [], 0
    for paragraph in re.split(r"(\n[ \t]*\n)", body):
        for match in _CODE_SPAN.finditer(paragraph):
            span = normalise(match.group(2))
            if COMMAND_RE.match(span):
                found.append((body.count("\n", 0, offset + match.start()) + 1, span))
        offset += len(paragraph)
    return found


def commands_in(path: Path, repo: Path = REPO) -> list[DocCommand]:
    text, name = path.read_text(encoding="utf-8"), str(path.relative_to(repo))
    found = [DocCommand(name, line, cmd, False) for block in code_blocks(text) if is_shell_block(block)
             for line, cmd in block_commands(block)]  # fmt: skip
    found += [DocCommand(name, line, cmd, True) for line, cmd in inline_commands(text)]
    return sorted(found, key=lambda c: c.line)


def all_commands(repo: Path = REPO) -> list[DocCommand]:
    return [command for path in doc_files(repo) for command in commands_in(path, repo)]


# -- the runner ----------------------------------------------------------------------------------------------------
class JobTimeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise JobTimeout


def run_job(job: dict) -> dict:
    """Run one ``python ARGV`` (or ``code``) in this process; returns rc, out, err and seconds."""
    argv, env, cwd = job.get("argv", []), job.get("env"), job.get("cwd") or os.getcwd()
    saved_env, saved_cwd, saved_argv, saved_path = dict(os.environ), os.getcwd(), sys.argv, list(sys.path)
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(job.get("timeout", 300)))
        rc = 0
        try:
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            os.chdir(cwd)
            if job.get("code"):
                exec(compile(job["code"], job["id"], "exec"), {"__name__": "__main__"})
            elif argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path.insert(0, cwd)
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, str(Path(cwd, argv[0]).resolve().parent))
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
            if code is None or isinstance(code, int):
                rc = code or 0
            else:
                print(code, file=sys.stderr)
                rc = 1
        except JobTimeout:
            print(f"[docs runner] timed out after {job.get('timeout', 300)} s", file=sys.stderr)
            rc = 124
        except BaseException:  # the job's failure is its result
            traceback.print_exc()
            rc = 1
        finally:
            signal.alarm(0)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(saved_cwd)
            sys.argv, sys.path[:] = saved_argv, saved_path
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "out": out.read().decode(errors="replace"), "err": err.read().decode(errors="replace"),
                "seconds": round(time.monotonic() - start, 2)}  # fmt: skip


def main(argv: list[str]) -> None:
    jobs = json.loads(Path(argv[0]).read_text())
    results = {}
    for job in jobs:
        results[job["id"]] = run_job(job)
        print(f"[docs runner] {job['id']}: rc={results[job['id']]['rc']} {results[job['id']]['seconds']} s",
              file=sys.stderr, flush=True)  # fmt: skip
    Path(argv[1]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
