"""lmms-eval 0.7.3's own scoring functions, for tests that check ours against them.

CI installs lmms-eval without its dependencies (``scripts/setup_cpu.sh``: its runtime stack is torch, datasets and
model wrappers we do not need). Importing ``lmms_eval.tasks.<task>`` normally runs ``lmms_eval/tasks/__init__.py``,
which loads that whole stack; registering a bare ``lmms_eval.tasks`` package first skips it, so only the task modules
themselves are imported (they need pyyaml, loguru, numpy, pandas, Levenshtein). MathVista's evaluator builds an
OpenAI client at import time and needs a key variable set; a dummy one is set for the import only, and nothing is
ever sent.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any


def load(module: str) -> Any | None:
    """``lmms_eval.tasks.<module>``, or None when lmms-eval is not installed."""
    try:
        import lmms_eval
    except ImportError:
        return None
    if "lmms_eval.tasks" not in sys.modules:
        package = types.ModuleType("lmms_eval.tasks")
        package.__path__ = [os.path.join(os.path.dirname(lmms_eval.__file__), "tasks")]
        sys.modules["lmms_eval.tasks"] = package
    before = os.environ.get("OPENAI_API_KEY")
    os.environ.setdefault("OPENAI_API_KEY", "not-used-by-tests")
    try:
        return importlib.import_module(f"lmms_eval.tasks.{module}")
    finally:  # other tests check what happens without a key
        if before is None:
            del os.environ["OPENAI_API_KEY"]
