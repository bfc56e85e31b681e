"""The README: its flag table matches `flag_table()`, its first commands exist."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_flag_table  # noqa: E402

from comet_megatron.cli import markdown_flag_table  # noqa: E402


def test_flag_table_matches_the_config():
    table = gen_flag_table.readme_table((ROOT / "README.md").read_text())
    assert table is not None, "README.md lost its flag-table markers"
    assert table == markdown_flag_table(), (
        "README.md's flag table is stale: run `python scripts/gen_flag_table.py --write`"
    )


def test_first_lines_are_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "the README must open with the commands"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()
                if line.strip()]
    assert commands == ["./scripts/bootstrap.sh && ./scripts/run-main.sh", "./scripts/test.sh"]
    for script in ("scripts/bootstrap.sh", "scripts/run-main.sh", "scripts/test.sh", ".ci/run"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
