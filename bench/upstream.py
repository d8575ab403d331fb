"""llama.cpp's own programs (llama-perplexity, llama-bench, ...) for the tests and the bench: the
workflow's one build of them (`resources/tools/`, made by workflow/setup.sh from the llama.cpp source
vendored in the pinned llama-cpp-python sdist), the upstream implementation of the revision quantbench
runs, against which the tests check its numbers and the bench times it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))

from quantbench import llamacpp, paths  # noqa: E402

TOOLS = ROOT / paths.LLAMA_TOOLS


def tool(name: str) -> Path:
    """One of llamacpp.TOOLS, built (and sealed) by the workflow's own stage if setup has not built them."""
    if not all((TOOLS / t).exists() for t in llamacpp.TOOLS):
        subprocess.run([sys.executable, "-m", "quantbench", "build-llama-tools", "--out", str(TOOLS)], check=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")})
    return TOOLS / name
