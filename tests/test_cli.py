"""``python -m stages``: errors a user can act on are one line, never a traceback."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def cli(cwd, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": ""}
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_bad_parameter_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("max_boxes: 2000", "max_boxes: lots"))
    result = cli(tmp_path, "proposals", "--split", "test", "--shard", "0")
    assert result.returncode == 1
    assert "proposals:max_boxes" in result.stderr and "Traceback" not in result.stderr


def test_missing_artifact_and_inspect(workspace):
    result = cli(workspace, "inspect", "features_cache/nothing.h5")
    assert result.returncode == 1 and "no such artifact" in result.stderr and "Traceback" not in result.stderr
    result = cli(workspace, "inspect", "features_cache/index/test.h5")
    assert result.returncode == 0 and "gt_boxes" in result.stdout and "4 images" in result.stdout
    result = cli(workspace, "recall")
    assert result.returncode == 1 and "run its stage first" in result.stderr


def test_show_command(workspace):
    result = cli(workspace, "show", "--image", "syn_000001", "--out", "x.png")
    assert result.returncode == 0 and (workspace / "x.png").is_file()
