"""Security basics: our code never executes model output or data.

A static check over every module of the package: no ``eval``/``exec``/``compile`` of strings, no unpickling
(``pickle``/``dill``/``marshal`` loads, ``torch.load`` without ``weights_only=True``), no ``yaml.load`` without a
safe loader, no ``shell=True`` subprocesses. Model responses reach only the reward's regex/math_verify parsing
(``tests/test_reward_on_cpu.py::test_to_number_parses_without_eval``), and image paths from data files are
confined to the data folder (``tests/test_data_validate_on_cpu.py``, ``tests/test_data_preprocess_on_cpu.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import calibrl_verl

PACKAGE = Path(calibrl_verl.__file__).parent
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
BANNED_ATTR_CALLS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("dill", "loads"),
                     ("marshal", "load"), ("marshal", "loads"), ("cloudpickle", "loads"), ("os", "system")}


def _call_name(node: ast.Call) -> tuple[str | None, str]:
    func = node.func
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else "<expr>"  # e.g. load(...).eval()
        return owner, func.attr
    return None, ""


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every call in ``source`` that could execute data or model output, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        owner, name = _call_name(node)
        where = f"{filename}:{node.lineno}"
        if owner is None and name in BANNED_CALLS:
            found.append(f"{where}: {name}()")
        elif (owner, name) in BANNED_ATTR_CALLS:
            found.append(f"{where}: {owner}.{name}()")
        elif (owner, name) == ("torch", "load"):
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: torch.load() without weights_only=True")
        elif (owner, name) == ("yaml", "load") and _keyword(node, "Loader") is None:
            found.append(f"{where}: yaml.load() without a safe Loader")
        shell = _keyword(node, "shell")
        if isinstance(shell, ast.Constant) and shell.value is True:
            found.append(f"{where}: subprocess with shell=True")
    return found


def test_the_checker_catches_each_unsafe_pattern() -> None:
    bad = ("eval(x)\nexec(code)\npickle.loads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "yaml.load(s)\nsubprocess.run(c, shell=True)\nos.system(c)\n")
    assert len(unsafe_calls(bad, "bad.py")) == 8
    assert unsafe_calls("model.eval()\nload(p).eval()\n", "methods.py") == []  # nn.Module.eval is not eval
    assert unsafe_calls("torch.load(p, weights_only=True)\nyaml.safe_load(s)\nsubprocess.run([c])\n", "ok.py") == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_executes_data_or_model_output(path: Path) -> None:
    assert unsafe_calls(path.read_text(), str(path.relative_to(PACKAGE))) == []
