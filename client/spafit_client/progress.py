"""A dependency-free progress bar for stderr, and the view `jobs.wait(progress=True)` draws from a job's
events. On a terminal the bar redraws in place; elsewhere (CI logs, pipes) it prints a line now and then."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .models import JobEvent


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """`bar.update(step, total, loss=0.41)`; `bar.write(line)` prints above the bar; `bar.close()`."""

    def __init__(self, desc: str = "", *, file: TextIO | None = None, width: int = 28,
                 min_interval: float | None = None):
        self.file = file or sys.stderr
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.desc, self.width = desc, width
        self.min_interval = min_interval if min_interval is not None else (0.1 if self.tty else 5.0)
        self.step: int = 0
        self.total: int | None = None
        self.postfix: dict[str, Any] = {}
        self._last_draw, self._last_line, self._drawn = 0.0, "", False

    def update(self, step: int | None = None, total: int | None = None, **postfix: Any) -> None:
        if step is not None:
            self.step = step
        if total is not None:
            self.total = total
        self.postfix.update({k: v for k, v in postfix.items() if v is not None})
        self._draw(force=self.total is not None and self.step >= self.total)

    def set_description(self, desc: str) -> None:
        if desc != self.desc:
            self.desc = desc
            self._draw(force=True)

    def write(self, line: str) -> None:
        """A line of its own above the bar (an evaluation, a log message)."""
        if self.tty and self._drawn:
            self.file.write("\r\x1b[2K")
        self.file.write(line + "\n")
        self.file.flush()
        if self.tty and self._drawn:
            self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)
        if self.tty and self._drawn:
            self.file.write("\n")
            self.file.flush()

    def render(self) -> str:
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(1.0, self.step / self.total)
            filled = int(frac * self.width)
            parts.append(f"{frac:4.0%} [{'#' * filled}{'.' * (self.width - filled)}] {self.step}/{self.total}")
        for k, v in self.postfix.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        line = self.render()
        if not line or (not self.tty and line == self._last_line):
            return
        self._last_draw, self._last_line, self._drawn = now, line, True
        self.file.write(f"\r\x1b[2K{line}" if self.tty else line + "\n")
        self.file.flush()


class JobProgress:
    """Turns a job's events into the bar: progress steps, loss and ETA; a line per evaluation."""

    def __init__(self, job_id: str = "", *, desc: str | None = None, file: TextIO | None = None):
        self.bar = ProgressBar(desc or f"job {job_id[:8]}", file=file)

    def __call__(self, event: JobEvent) -> None:
        d = event.data
        if event.type == "progress":
            self.bar.update(d.get("step"), d.get("total_steps"), epoch=_round(d.get("epoch")),
                            loss=_round(d.get("loss")), eta=_duration(d.get("eta_seconds")))
        elif event.type == "status":
            self.bar.set_description(f"{self.bar.desc.split(' [')[0]} [{d.get('status')}]")
        elif event.type == "eval":
            metrics = d.get("metrics") or {}
            scores = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            self.bar.write(f"epoch {d.get('epoch')}: {scores}{'  (best)' if d.get('is_best') else ''}")
        elif event.type in ("resumed", "early_stop", "trial"):
            self.bar.write(f"{event.type}: {', '.join(f'{k}={v}' for k, v in d.items())}")

    def close(self) -> None:
        self.bar.close()


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x
