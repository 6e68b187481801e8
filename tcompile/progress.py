"""A progress bar over the long steps of ``optimize`` (capture, plan, rewrite, lower, measure)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from tqdm.auto import tqdm


class Stages:
    """One bar, one tick per finished stage; the current stage's name shows beside it."""

    def __init__(self, enabled: bool, names: list[str], desc: str = "tcompile") -> None:
        self.bar = tqdm(total=len(names), desc=desc, disable=not enabled, unit="stage", leave=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        try:
            yield
        finally:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.set_postfix_str("done")
        self.bar.close()
