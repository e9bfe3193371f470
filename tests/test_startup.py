"""`synth --help` (and every command's --help) must be instant: no torch, transformers, vLLM, openai,
pandas or pyarrow import at start-up; heavy libraries load only when a stage that needs them runs.
Checked as behaviour (which modules got imported), not as a timing; bench/README.md has the time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "transformers", "vllm", "openai", "pandas", "pyarrow", "duckdb", "datasets", "trl"]


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["sql", "--help"]])
def test_help_imports_nothing_heavy(args):
    code = ("import sys\nfrom synth.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('\\n' + __import__('json').dumps(sorted(m for m in %r if m in sys.modules)))" % (args, HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
