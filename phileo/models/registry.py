"""Name -> model factory registry, so configs and CLIs can say `--model geoaware-unet-44m`."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

ModelFactory = Callable[..., nn.Module]

_FACTORIES: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: `@register("my-model")` on a factory taking keyword overrides."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorator


def build(name: str, **overrides) -> nn.Module:
    """Instantiate a registered model; keyword overrides replace fields of its named config."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return factory(**overrides)


def list_models() -> list[str]:
    return sorted(_FACTORIES)
