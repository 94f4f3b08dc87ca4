"""Each file in app/ holds one idea and stays short enough to read in one sitting."""

from __future__ import annotations

from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
MAX_LINES = 450


def test_no_python_file_in_app_is_longer_than_the_limit() -> None:
    lengths = {
        path.relative_to(APP).as_posix(): len(path.read_text().splitlines()) for path in APP.rglob("*.py")
    }
    assert len(lengths) > 40
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
