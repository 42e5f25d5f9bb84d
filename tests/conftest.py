"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import install_firmware


@pytest.fixture
def board(tmp_path: Path) -> Path:
    """A fresh board filesystem holding the firmware exactly as deployed."""
    return install_firmware(tmp_path / "board")
