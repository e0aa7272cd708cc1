"""Checkpoint files the tests make on purpose."""

from __future__ import annotations

import os
from pathlib import Path


class RunsCode:
    """Unpickling this would run a shell command (touch ``marker``); ``weights_only=True`` loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
