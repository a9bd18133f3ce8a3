"""Renamed keywords and attributes of the curvlab optimizers (kept for one release).

Old keywords are caught by a ``**deprecated`` parameter and mapped with :func:`renamed_kwargs`;
old attributes are :func:`deprecated_alias` properties. Both warn with a ``DeprecationWarning``
naming the new spelling. Nothing here is public API.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from curvlab.optim.base import deprecated_kwarg

__all__ = ["deprecated_alias", "renamed_kwargs"]


def renamed_kwargs(who: str, deprecated: dict[str, Any], renames: dict[str, str],
                   given: dict[str, Any]) -> dict[str, Any]:
    """Map old keywords in ``deprecated`` to their new names (warning for each).

    ``given`` holds the new keywords' values as passed (``None`` = not passed); passing both
    spellings, or an unknown keyword, raises ``TypeError``. Returns ``{new: value}`` for the
    old keywords that were used.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     renamed_kwargs("Opt", {"lambd": 0.5}, {"lambd": "damping"}, {"damping": None})
        {'damping': 0.5}
        >>> w[0].category.__name__
        'DeprecationWarning'
    """
    unknown = sorted(set(deprecated) - set(renames))
    if unknown:
        raise TypeError(f"{who}: unexpected keyword argument(s) {unknown}")
    out: dict[str, Any] = {}
    for old in list(deprecated):
        new = renames[old]
        if given.get(new) is not None:
            raise TypeError(f"{who}: pass {new!r} only (its deprecated name {old!r} was given "
                            "too)")
        out[new] = deprecated_kwarg(deprecated, old, new, who)
    return out


def deprecated_alias(old: str, new: str, getter: Callable[[Any], Any],
                     setter: Callable[[Any, Any], None] | None = None) -> property:
    """A property ``old`` that warns (``DeprecationWarning``, naming ``new``) and delegates."""

    def fget(self: Any) -> Any:
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use {new}",
                      DeprecationWarning, stacklevel=2)
        return getter(self)

    def fset(self: Any, value: Any) -> None:
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use {new}",
                      DeprecationWarning, stacklevel=2)
        setter(self, value)  # type: ignore[misc]

    return property(fget, fset if setter is not None else None,
                    doc=f"Deprecated alias: use {new}.")
