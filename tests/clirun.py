"""Running the CLI in-process for tests: exit code, stdout and stderr (tests/conftest.py puts this folder on
sys.path)."""
from __future__ import annotations

import pytest

from didbq.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
