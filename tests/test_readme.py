"""The README's Python examples run as written (a new user pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# The SyncBatchNorm snippet needs torchrun and a `model`; examples/ddp_cpu.py is its runnable
# form, exercised by tests/test_sync.py.
RUNNABLE = [b for b in BLOCKS if "init_process_group" not in b]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 7


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.strip().splitlines()[-1][:40])
def test_readme_example_runs(block):
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
