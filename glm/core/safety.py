"""Deleting directories without ever deleting the wrong one.

Stages regenerate their outputs by removing the old directory first. A path built from a config
value (`finetune.task.name: ..`) or a symlink planted in the run directory must not turn that into
removing the run directory itself or anything outside it, so every recursive delete in glm/ goes
through `remove_tree`, which refuses unless the resolved target lies strictly inside the directory
the caller owns.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class UnsafeDelete(ValueError):
    """A recursive delete aimed outside the directory that owns it (a bug or a hostile path).

    A ValueError: retrying cannot fix it (tasks.options treats ValueErrors as permanent).
    """


def _strictly_inside(target: Path, root: Path) -> bool:
    return target != root and root in target.parents


def check_inside(path: str | Path, inside: str | Path) -> Path:
    """`path` resolved, if both where it is and what it points to lie strictly below `inside`; else UnsafeDelete.

    Both: a path that is (or passes through) a symlink to somewhere outside is refused even though
    it is spelled as a path inside, and so is a link that itself lies outside.
    """
    path, root = Path(path), Path(inside).resolve()
    location = Path(os.path.normpath(path.parent.resolve() / path.name))  # `..` and parent links resolved, the last link not
    target = path.resolve()
    for what in (location, target):
        if not _strictly_inside(what, root):
            shown = str(path) if what == path.absolute() else f"{path} (which resolves to {what})"
            where = "is the directory that owns it" if what == root else "lies outside the directory that owns it"
            raise UnsafeDelete(f"refusing to delete {shown}: it {where}, {root}; only paths strictly inside may be deleted")
    return target


def remove_tree(path: str | Path, *, inside: str | Path, ignore_errors: bool = False) -> None:
    """`shutil.rmtree(path)`, only if `path` resolves to somewhere strictly inside `inside`.

    A missing (but safe) `path` is fine: nothing to do. `ignore_errors` applies to the deletion only: an
    unsafe target always raises UnsafeDelete. Symlinks inside the tree are unlinked, never followed (rmtree).
    """
    path = Path(path)
    check_inside(path, inside)  # even when there is nothing to delete: an unsafe path is a bug to report
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():  # a link to somewhere inside: remove the link, which is what lived at `path`
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=ignore_errors)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
