"""The workdir: atomic JSON files, the exclusive lock, writability and full-disk reporting."""

from __future__ import annotations

import errno
import json
import os
import shutil

from kd_jax.experiment.config import ConfigError

__all__ = ["DiskFullError", "acquire_lock", "check_not_locked", "disk_full_message",
           "ensure_writable", "is_disk_full", "read_json", "read_json_or_none", "write_json"]


class DiskFullError(OSError):
    """The disk filled while the run wrote under its workdir; the message is one line naming
    the workdir and the space needed. Rerunning resumes from the last complete checkpoint."""


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_json_or_none(path: str, warn=None):
    """The JSON at ``path``; ``None`` if absent or unreadable (a file cut by a kill or a full
    disk is recomputed from the checkpoints, not trusted). ``warn(text)`` hears of the latter."""
    if not os.path.exists(path):
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        if warn is not None:
            warn(f"warning: {path} is unreadable ({type(err).__name__}); recomputing it from "
                 "the checkpoints")
        return None


def ensure_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"workdir {path!r} is not writable ({err.strerror}); pass --workdir "
                          "with a directory you can write to.") from err


def _in_use(workdir: str, owner: str) -> ConfigError:
    return ConfigError(f"workdir {workdir} is in use by a running experiment (pid {owner}); "
                       "wait for it to finish or pass another --workdir.")


def check_not_locked(workdir: str) -> None:
    """Refuses a workdir that a running experiment holds, creating nothing."""
    import fcntl
    path = os.path.join(workdir, ".lock")
    if not os.path.exists(path):
        return
    try:
        f = open(path)
    except OSError:
        return  # unreadable: acquire_lock will tell
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(workdir, f.read().strip() or "another process") from None
        fcntl.flock(f, fcntl.LOCK_UN)


def acquire_lock(workdir: str):
    """An exclusive lock on ``workdir`` for this process's lifetime (released by the kernel
    when the process ends, however it ends); a second run in the same workdir is refused."""
    import fcntl
    path = os.path.join(workdir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise _in_use(workdir, owner) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the chain (Orbax and TensorStore wrap the OSError, or report it as
    a ``RESOURCE_EXHAUSTED`` error while writing a file)."""
    while err is not None:
        text = str(err)
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) \
                or "No space left on device" in text \
                or ("RESOURCE_EXHAUSTED" in text and "rror writing" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(workdir: str, checkpoint_bytes: int) -> str:
    wd = os.path.abspath(workdir or ".")
    free = shutil.disk_usage(wd).free if os.path.isdir(wd) else 0
    return (f"no space left on device while writing under {wd} ({free / 1e6:.0f} MB free; a "
            f"checkpoint of this run needs about {max(checkpoint_bytes, 1e6) / 1e6:.0f} MB, keep "
            "a few times that free); free space and rerun the same command: it resumes from "
            "the last complete checkpoint.")
