"""TFDS's one-time download-and-prepare: fail fast offline, leave nothing behind, say the fix."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
import shutil
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path


from kd_jax.data._specs import DataNotFoundError

_log = logging.getLogger("kd_jax.data")

def _checkout_dir() -> Path | None:
    """The kd_jax source checkout this module runs from (an editable install), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def _prepare_command(dataset: str, data_dir: str) -> str:
    """Shell commands that install the ``[prepare]`` extra and prepare ``dataset``."""
    if "://" not in data_dir:
        data_dir = os.path.abspath(data_dir)  # The command may change directory first.
    checkout = _checkout_dir()
    install = 'pip install -e ".[prepare]"'
    if checkout is not None:
        install = f"cd {shlex.quote(str(checkout))} && {install}"
    return (
        f'{install} && python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{dataset}', data_dir='{data_dir}')"
        ".download_and_prepare(file_format='array_record')\""
    )


def _where_to_install() -> str:
    if _checkout_dir() is not None:
        return ""
    return " (run the pip command in a kd_jax source checkout, where pyproject.toml is)"


_PROBE_TIMEOUT_S = 5.0


def _prepare(builder, dataset: str) -> None:
    """Runs TFDS's download-and-prepare; any failure becomes one DataNotFoundError.

    Offline, TFDS retries each download ten times with back-off (about 3.5 minutes) before
    failing; when a connection to the download host fails first (:func:`_unreachable`), the
    attempt runs with TFDS's retries off, so it fails at once unless the archive is already in
    the download dir. A failed attempt removes the incomplete downloads and the empty folders
    it made (:func:`_remove_partial_prepare`); completed downloads stay for the next attempt.
    """
    root = str(builder.data_dir_root)
    local = "://" not in root
    before = _watched_entries(Path(root), dataset) if local else {}
    urls = list(getattr(builder, "url_infos", None) or ())
    unreachable = next(filter(None, map(_unreachable, urls)), None)
    try:
        with _tfds_download_retries(0 if unreachable else None):
            builder.download_and_prepare(file_format="array_record")
    except BaseException as err:  # Interrupted too: the partial download is removed.
        if local:
            _remove_partial_prepare(before, _watched_entries(Path(root), dataset))
        if not isinstance(err, Exception):
            raise
        reason = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        if importlib.util.find_spec("tensorflow") is None:
            reason += " (TensorFlow is not installed; TFDS needs it to prepare CIFAR)"
        raise DataNotFoundError(
            f"{dataset} {builder.info.version} is not prepared in the TFDS data dir {root} "
            f"(looked for {builder.data_dir}), and preparing it there failed: {reason}.\n"
            f"Fix: with network access, run{_where_to_install()}\n"
            f"  {_prepare_command(dataset, root)}\n"
            "or point kd_jax at a prepared TFDS data dir (e.g. one copied from a machine "
            "where that ran) with --data-dir / data_dir= / TFDS_DATA_DIR."
        ) from err


def _unreachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> OSError | None:
    """Why a TCP connection to ``url``'s host fails within ``timeout`` s, or None if it opens.

    None also when a proxy serves the URL (the proxy, not this machine, reaches the host).
    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        return None
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[OSError | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True, name="kd_jax-probe")
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        return TimeoutError(f"no answer from {host}:{port} within {timeout:g} s")
    return outcome[0]


@contextlib.contextmanager
def _tfds_download_retries(retries: int | None):
    """TFDS's download retries (``downloader.MAX_RETRIES``) set for a block; None: as is."""
    from tensorflow_datasets.core.download import downloader

    saved = getattr(downloader, "MAX_RETRIES", None)
    if retries is not None and saved is not None:
        downloader.MAX_RETRIES = retries
    try:
        yield
    finally:
        if saved is not None:
            downloader.MAX_RETRIES = saved


def _watched_entries(root: Path, dataset: str) -> dict[Path, set[str] | None]:
    """The entries of the folders TFDS's prepare writes to (None: the folder is absent)."""
    folders = [root, root / dataset, root / "downloads", root / "downloads" / dataset,
               root / "downloads" / "extracted"]
    entries: dict[Path, set[str] | None] = {}
    for folder in folders:
        try:
            entries[folder] = {entry.name for entry in os.scandir(folder)}
        except OSError:
            entries[folder] = None
    return entries


def _remove_partial_prepare(before: dict[Path, set[str] | None],
                            after: dict[Path, set[str] | None]) -> None:
    """Removes what a failed prepare added: TFDS's ``*.tmp.*`` downloads and ``incomplete.*``
    folders, then the folders it created that are left empty (deepest first). Entries that
    existed before, and completed downloads, are kept."""
    for folder, names in after.items():
        for name in sorted((names or set()) - (before.get(folder) or set())):
            if ".tmp." in name or name.startswith("incomplete."):
                path = folder / name
                try:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError as err:
                    _log.warning("kd_jax: could not remove %s (%s).", path, err)
    for folder in sorted(after, key=lambda f: len(f.parts), reverse=True):
        if before.get(folder) is None and after[folder] is not None:
            try:
                folder.rmdir()  # Only if empty.
            except OSError:
                pass


