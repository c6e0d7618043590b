"""metrics.jsonl: the one format every training loop logs to, and the one reader.

One JSON object per line, appended and flushed, so the file can be read (and plotted, and
tailed by the orchestrator) while training runs. A crash can leave a torn last line: the reader
skips it, and a resumed run drops it along with every record past its checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from glm.core.shards import atomic_write_text


class MetricsLog:
    """Appends records to a metrics.jsonl file; `fresh=True` starts it anew, `enabled=False` writes nothing
    (ranks other than 0)."""

    def __init__(self, path: str | Path, *, fresh: bool = False, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._f: TextIO | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self._f = open(self.path, "w", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run writes them again) and any torn last line."""
        if not self.enabled:
            return
        kept = (
            [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= step]
            if self.path.is_file()
            else []
        )
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))

    def write(self, record: dict[str, Any] | None = None, **fields: Any) -> None:
        """Append one record (a dict, or keyword fields)."""
        if not self.enabled:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps({**(record or {}), **fields}, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn or foreign line (a crash mid-write) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
