"""Locating data files on disk: the ``CURVLAB_DATA`` convention.

curvlab never downloads anything. File-based loaders take ``root=`` or, when it is ``None``,
read the directory from the environment variable ``CURVLAB_DATA``. Each loader then looks for
its files in a short, documented list of sub-directories of that root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "find_file", "resolve_data_root"]

#: Name of the environment variable holding the default data directory.
DATA_ENV_VAR = "CURVLAB_DATA"


def resolve_data_root(root: str | os.PathLike[str] | None) -> Path:
    """Return ``root`` as a :class:`~pathlib.Path`, or ``$CURVLAB_DATA`` when ``root is None``.

    Raises:
        FileNotFoundError: If ``root`` is ``None`` and ``CURVLAB_DATA`` is unset or empty.
        TypeError: If ``root`` is not a path-like object.

    Example:
        >>> resolve_data_root("/tmp/data").as_posix()
        '/tmp/data'
    """
    if root is None:
        env = os.environ.get(DATA_ENV_VAR, "")
        if not env:
            raise FileNotFoundError(
                f"no data directory given: pass root=<directory> or set the environment "
                f"variable {DATA_ENV_VAR} (curvlab never downloads data)"
            )
        return Path(env).expanduser()
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a str, os.PathLike or None, got {type(root).__name__}")
    return Path(root).expanduser()


def find_file(name: str, directories: Sequence[Path], *, allow_gz: bool = False) -> Path:
    """Return the first existing ``directory / name`` (then ``name + '.gz'`` if ``allow_gz``).

    Directories are tried in order; within a directory the uncompressed file wins.

    Raises:
        FileNotFoundError: Naming the file, every location searched and ``CURVLAB_DATA``.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.bin").write_bytes(b"")
        >>> find_file("a.bin", [d / "missing", d]).name
        'a.bin'
    """
    tried: list[str] = []
    for directory in directories:
        candidates = [name, name + ".gz"] if allow_gz else [name]
        for candidate in candidates:
            path = directory / candidate
            tried.append(str(path))
            if path.is_file():
                return path
    listing = "\n  ".join(tried)
    raise FileNotFoundError(
        f"could not find data file {name!r}; searched:\n  {listing}\n"
        f"Put the file in one of these locations, or point root= / the environment variable "
        f"{DATA_ENV_VAR} at the directory holding it (curvlab never downloads data)."
    )
