"""A `dask worker --preload` for tests/flows/test_dask_cluster.py: this worker SIGKILLs itself at its first
blank-infilling shard, its temporary file written and not yet renamed, as a lost machine would. The
marker file (GLM_TEST_KILL_MARKER) makes it fire once, so the nanny's restarted worker carries on."""

import os
import signal
from pathlib import Path

_replace = getattr(os, "_glm_real_replace", os.replace)  # the preload may be imported twice: wrap the real one
os._glm_real_replace = _replace


def _replace_or_die(src, dst, *args, **kwargs):
    marker = os.environ.get("GLM_TEST_KILL_MARKER")
    target = Path(dst)
    if marker and target.parent.parent.name == "infill" and target.name.startswith("part-") and not Path(marker).exists():
        Path(marker).write_text(f"{src} -> {dst}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)


os.replace = _replace_or_die
