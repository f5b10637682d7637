"""The web extension: node's test runner over web/tests/, and a parse check of the entry script."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def test_heatmap_unit_tests_pass_under_node():
    run = subprocess.run([NODE, "--test", "web/tests/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout


def test_extension_script_parses():
    run = subprocess.run([NODE, "--check", "web/sparse_vdit.js"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
