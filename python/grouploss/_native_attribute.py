"""Read-only attributes that a Python class reads from its native object."""

from __future__ import annotations

from typing import Any, Generic, Optional, TypeVar, overload

T = TypeVar("T")


class NativeAttribute(Generic[T]):
    """``self._native.<name>``, read-only, under the attribute's own name::

    class Sampler:
        batch_size = NativeAttribute[int]("P x K.")
    """

    def __init__(self, doc: str = "") -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: Optional[type] = None) -> NativeAttribute[T]: ...
    @overload
    def __get__(self, obj: Any, owner: Optional[type] = None) -> T: ...
    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        return getattr(obj._native, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is read-only")
