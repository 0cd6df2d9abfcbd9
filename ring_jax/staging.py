"""Writing a folder all at once: it is built in a temporary sibling and renamed into place, so a
failed or killed writer never leaves a half-written folder under the name asked for."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time


@contextlib.contextmanager
def staged_folder(out_dir: str):
    """Yields a new empty folder `OUT.tmp-PID` beside out_dir (which must not exist), renamed to
    out_dir when the block ends. When the block fails, the temporary folder and the parent folders
    made for it are removed. Temporary folders that killed writers of the same out_dir left behind
    (their process is gone) are removed first."""
    out = os.path.abspath(out_dir)
    if os.path.exists(out):
        raise FileExistsError(f"{out_dir} exists; choose a new output folder")
    made, parent = [], os.path.dirname(out)
    while not os.path.exists(parent):                       # the parents this call will make
        made.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{out_dir}: {parent} is a file, not a folder")
    remove_stale(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        _remove_settled(tmp)
        for folder in made:                                 # innermost first; only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _remove_settled(path: str, quiet: float = 0.2, limit: float = 5.0) -> None:
    """Removes the folder at path and makes sure it stays gone for `quiet` seconds (up to `limit`):
    when a write fails, the writer's threads (TensorStore's) may still finish operations that
    Orbax gave up on, and put files back into it."""
    deadline = time.monotonic() + limit
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(quiet)
        if not os.path.exists(path) or time.monotonic() > deadline:
            return


def remove_stale(out: str) -> list[str]:
    """Removes `out.tmp-PID` folders whose process no longer runs on this machine; returns them."""
    removed = []
    for path in glob.glob(glob.escape(out) + ".tmp-*"):
        pid = path.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # another user's process
        return True
    return True
