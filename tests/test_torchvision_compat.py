"""diffrl._torchvision_compat: torchvision and transformers' image processors import after `import diffrl`.

Run in fresh interpreters, since a process can import torchvision only once.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_torchvision_and_clip_processor_import_after_diffrl():
    result = run_python("import diffrl, torchvision\n"
                        "import transformers\n"
                        "from transformers import CLIPProcessor\n"
                        "print(torchvision.__version__, CLIPProcessor.__name__)")
    assert result.returncode == 0, result.stderr
    assert "CLIPProcessor" in result.stdout


def test_import_diffrl_stays_cheap():
    result = run_python("import sys, diffrl\n"
                        "print(sorted({'torch', 'torchvision', 'transformers'} & set(sys.modules)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_the_fix_torchvision_fails_on_this_cpu_torch():
    """Shows the fix is what makes the first test pass here (skipped where torchvision's own ops load, e.g. GPU)."""
    result = run_python("import torchvision")
    if result.returncode == 0:
        pytest.skip("torchvision imports without the fix on this machine")
    assert "torchvision::nms does not exist" in result.stderr
