"""The repository root and the command line as a user runs it (a subprocess), for every CLI test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m vae_fix ARGS...` in `cwd`; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "vae_fix", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def strict_json(path):
    """A JSON file read the strict way (NaN/Infinity refused), as any JSON reader would."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name} in {path}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)
