"""One small registry per strategy family (extractors, clusterers, samplers, scorers, ...).

Params validation and the CLI's `choices` read the same registry, so adding a strategy
is one `@REGISTRY.register("name")` in the module that implements it, and nothing else.
Each registry names the module(s) that fill it and imports them on first use, so this file
stays free of heavy imports and of import cycles (params -> registry -> implementation).
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from nds.errors import InvalidInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> strategy mapping with a clear error for unknown names."""

    def __init__(self, family: str, *modules: str, hint: str = "") -> None:
        self.family = family
        self.hint = hint
        self._modules = modules
        self._loaded = not modules
        self._items: dict[str, T] = {}

    def _load(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)
        return self._items

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self[name] = obj
            return obj

        return add

    def __setitem__(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.family} {name!r} is registered twice")
        self._items[name] = obj

    def __getitem__(self, name: str) -> T:
        try:
            return self._load()[name]
        except KeyError:
            raise InvalidInputError(
                f"unknown {self.family} {name!r}: choose one of {', '.join(self.names())}{self.hint}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def names(self) -> list[str]:
        return list(self._load())

    def items(self):
        return self._load().items()

    def keys(self):
        return self._load().keys()

    def values(self):
        return self._load().values()

    def get(self, name: str, default=None):
        return self._load().get(name, default)

    def check(self, name: str) -> str:
        """Return `name` if registered, else raise the one-line error (for validators)."""
        self[name]
        return name


# The families. Each implementing module registers its strategies with `@FAMILY.register(name)`.
EXTRACTORS: Registry = Registry("extractor", "nds.models.extractors")
CLUSTERERS: Registry = Registry("clustering method", "nds.index.cluster")
EXPERT_ARCHS: Registry = Registry("expert architecture", "nds.models.experts")
WEIGHT_SCHEMES: Registry = Registry("weight scheme", "nds.index.weights")
SCORERS: Registry = Registry("scorer", "nds.client.scoring")
SAMPLERS: Registry = Registry("sampler", "nds.select.samplers")
EVAL_STRATEGIES: Registry = Registry("evaluation strategy", "nds.evaluate.strategies")
PROFILES: Registry = Registry("corpus profile", "nds.corpus.build")
SOURCES: Registry = Registry("source", "nds.corpus.sources")
