"""glm.safety.remove_tree: recursive deletes that cannot leave the directory that owns them."""

from __future__ import annotations

import os

import pytest

from glm.core.safety import UnsafeDelete, remove_tree


@pytest.fixture
def layout(tmp_path):
    """run/ with a stage directory holding files, and a directory next to run/ that must survive."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "stage" / "sub").mkdir(parents=True)
    (run / "stage" / "sub" / "f.txt").write_text("x")
    (run / "keep.txt").write_text("x")
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    return run, outside


def test_removes_a_directory_strictly_inside(layout):
    run, _ = layout
    remove_tree(run / "stage", inside=run)
    assert not (run / "stage").exists() and (run / "keep.txt").is_file()
    remove_tree(run / "stage", inside=run)  # already gone: nothing to do


@pytest.mark.parametrize("spelled", ["run", "run/stage/..", "run/.", "outside", "run/../outside", "/"])
def test_refuses_the_owner_itself_and_anything_outside(layout, spelled):
    run, outside = layout
    target = run.parent / spelled if not spelled.startswith("/") else spelled
    with pytest.raises(UnsafeDelete, match="refusing to delete"):
        remove_tree(target, inside=run, ignore_errors=True)  # ignore_errors never covers an unsafe target
    assert (outside / "precious.txt").is_file() and (run / "keep.txt").is_file() and (run / "stage" / "sub" / "f.txt").is_file()


def test_refuses_an_unsafe_path_even_when_it_does_not_exist(layout):
    run, _ = layout
    with pytest.raises(UnsafeDelete):
        remove_tree(run.parent / "nowhere", inside=run)


def test_refuses_a_symlink_inside_that_points_outside(layout):
    run, outside = layout
    (run / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeDelete, match="resolves to"):
        remove_tree(run / "link", inside=run)
    with pytest.raises(UnsafeDelete, match="resolves to"):
        remove_tree(run / "link" / "anything", inside=run)  # a path through the link
    assert (outside / "precious.txt").is_file() and (run / "link").is_symlink()


def test_a_symlinked_owner_is_resolved_like_its_children(layout, tmp_path):
    """A run directory reached through a symlink (a scratch disk) still owns what is inside it."""
    run, _ = layout
    alias = tmp_path / "alias"
    alias.symlink_to(run, target_is_directory=True)
    remove_tree(alias / "stage", inside=alias)
    assert not (run / "stage").exists()
    with pytest.raises(UnsafeDelete):
        remove_tree(run, inside=alias)


def test_a_link_inside_to_inside_is_removed_not_its_target(layout):
    run, _ = layout
    (run / "link").symlink_to(run / "stage", target_is_directory=True)
    remove_tree(run / "link", inside=run)
    assert not os.path.lexists(run / "link") and (run / "stage" / "sub" / "f.txt").is_file()


def test_links_within_the_tree_are_unlinked_never_followed(layout):
    run, outside = layout
    (run / "stage" / "sub" / "out").symlink_to(outside, target_is_directory=True)
    remove_tree(run / "stage", inside=run)
    assert not (run / "stage").exists() and (outside / "precious.txt").is_file()


def test_a_link_lying_outside_is_refused_even_if_it_points_inside(layout):
    run, outside = layout
    (outside / "link").symlink_to(run / "stage", target_is_directory=True)
    with pytest.raises(UnsafeDelete, match="outside"):
        remove_tree(outside / "link", inside=run)
    assert (outside / "link").is_symlink()
