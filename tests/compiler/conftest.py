"""The compiler tests share hand-built graphs (compiler_testlib.py, beside this file)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # compiler_testlib, whatever pytest's import mode
