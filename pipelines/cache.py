"""The user cache: data manifests, converted images and .beton files (`pipelines.manifest`), mask
pattern banks (`noise.bank`) and, where the home folder cannot hold its own, matplotlib's font cache.

A container's uid often has no passwd entry and no writable home (`docker run --user`, HOME=/): the
cache then lives in the temporary folder, said once in a warning, and COLORMAE_CACHE moves it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from errors import UserError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$COLORMAE_CACHE``, else ``$XDG_CACHE_HOME/colormae``, else ``~/.cache/colormae``; where the home
    folder cannot hold it, the temporary folder's ``colormae-<uid>``. UserError when that fails too."""
    if os.environ.get("COLORMAE_CACHE"):
        return Path(os.environ["COLORMAE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "colormae"
    home = Path(os.path.expanduser("~/.cache/colormae"))  # left as it is when there is no home folder
    return home if _writable(home) else _outside_home(home)


def _writable(folder: Path) -> bool:
    """Whether `folder` (an absolute path) is, or can be made, a folder this process can write into."""
    if not folder.is_absolute():
        return False
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _outside_home(home: Path) -> Path:
    """`<temporary folder>/colormae-<uid>`, when this uid owns it and can write it; set as COLORMAE_CACHE,
    so later calls and child processes (the ffcv writer) use it without saying it again."""
    folder = Path(tempfile.gettempdir()) / f"colormae-{os.getuid()}"
    where = f"{home} (HOME={os.environ.get('HOME', 'unset')})"
    if not (_writable(folder) and folder.lstat().st_uid == os.getuid()):
        raise UserError(f"no writable cache folder: {where} and {folder} cannot be used; set COLORMAE_CACHE "
                        "to a writable folder")
    log.warning("cannot write the cache folder %s: using %s instead; set COLORMAE_CACHE to a lasting "
                "writable folder", where, folder)
    os.environ["COLORMAE_CACHE"] = str(folder)
    return folder


def matplotlib_config() -> None:
    """Point MPLCONFIGDIR at ``<cache root>/matplotlib`` when it is unset and the home folder cannot hold
    matplotlib's own (``~/.config/matplotlib``): matplotlib would otherwise rebuild its font cache in
    a new temporary folder, with two warnings, in every command. Call it before importing matplotlib."""
    default = Path(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")) / "matplotlib"
    if not os.environ.get("MPLCONFIGDIR") and not _writable(default):
        os.environ["MPLCONFIGDIR"] = str(cache_root() / "matplotlib")
