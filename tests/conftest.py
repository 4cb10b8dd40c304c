"""Session-wide test setup, in one place.

DeepSpeed JIT-compiles a small CPU op the first time an engine starts; its build cache goes under the
checkout (``.cache/torch_extensions``, what scripts/test.sh exports), so that ``pytest`` run by hand and
every spawned rank (they inherit the environment) reuse one build instead of compiling per test.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: object) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
