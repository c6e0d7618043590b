"""Artifact helpers that do not need a Prefect server."""

from __future__ import annotations

import base64

from tasks.artifacts import inline_images


def test_plots_are_inlined_as_data_uris_so_the_ui_can_render_them(tmp_path):
    png = b"\x89PNG\r\n\x1a\nnot really a picture"
    (tmp_path / "loss.png").write_bytes(png)
    md = "# Report\n\n![pretraining loss](loss.png)\n\n![missing plot](gone.png)\n\n[a link](loss.png)\n"
    out = inline_images(md, tmp_path)
    assert f"![pretraining loss](data:image/png;base64,{base64.b64encode(png).decode()})" in out
    assert "![missing plot](gone.png)" in out  # left alone: nothing to embed
    assert "[a link](loss.png)" in out  # only images are embedded
