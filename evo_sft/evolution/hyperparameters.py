"""Mutable hyperparameters: bounds, mutation steps and their validation."""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_DTYPES = {"int": int, "float": float}


@dataclass(frozen=True)
class RLParameter:
    """Bounds and multiplicative mutation factors of one hyperparameter."""

    min: float
    max: float
    shrink_factor: float = 0.8
    grow_factor: float = 1.2
    dtype: type = float
    scale: str = "linear"  # how values are spread over [min, max]: "linear" or "log"

    def __post_init__(self):
        if self.dtype not in (int, float):
            raise ValueError(f"RLParameter: dtype must be int or float, got {self.dtype!r}")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"RLParameter: scale must be 'linear' or 'log', got {self.scale!r}")
        for name in ("min", "max"):
            bound = getattr(self, name)
            if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound):
                raise ValueError(f"RLParameter: {name} must be a finite number, got {bound!r}")
            if self.dtype is int and not float(bound).is_integer():
                raise ValueError(f"RLParameter: dtype=int needs integer bounds, got {name}={bound!r}")
            object.__setattr__(self, name, self.dtype(bound))
        if self.min > self.max:
            raise ValueError(f"RLParameter: min ({self.min}) is greater than max ({self.max})")
        if self.scale == "log" and self.min <= 0:
            raise ValueError(f"RLParameter: a log scale needs min > 0, got {self.min}")
        for name in ("shrink_factor", "grow_factor"):
            factor = getattr(self, name)
            if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not factor > 0:
                raise ValueError(f"RLParameter: {name} must be > 0, got {factor!r}")
            if not math.isfinite(factor):
                raise ValueError(f"RLParameter: {name} must be finite, got {factor!r}")
            object.__setattr__(self, name, float(factor))

    def mutate(self, value, rng: np.random.Generator, multiple_of: int = 1):
        """Grow or shrink `value` (50/50) and keep it within bounds."""
        if self.dtype is float and multiple_of != 1:
            raise ValueError(f"RLParameter: multiple_of={multiple_of} applies to int parameters only")
        grow = bool(rng.random() < 0.5)
        factor = self.grow_factor if grow else self.shrink_factor
        if self.dtype is float:
            return float(np.clip(value * factor, self.min, self.max))
        return self._mutate_int(value, factor, +1 if grow else -1, multiple_of)

    def _mutate_int(self, value, factor: float, direction: int, m: int) -> int:
        lo, hi = self.multiple_bounds(m)
        m = int(m)
        new = min(max(int(round(value * factor / m)) * m, lo), hi)
        if new != value:
            return new
        for step in (direction * m, -direction * m):
            if lo <= value + step <= hi:
                return int(value + step)
        return new

    def multiple_bounds(self, m: int) -> tuple[int, int]:
        """Smallest and largest multiple of `m` within [min, max]."""
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"RLParameter: multiple_of must be an int >= 1, got {m!r}")
        m = int(m)
        lo = -(-self.min // m) * m
        hi = self.max // m * m
        if lo > hi:
            raise ValueError(f"RLParameter: no multiple of {m} lies in [{self.min}, {self.max}]")
        return lo, hi

    def to_dict(self) -> dict:
        return {
            "min": self.min,
            "max": self.max,
            "shrink_factor": self.shrink_factor,
            "grow_factor": self.grow_factor,
            "dtype": self.dtype.__name__,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RLParameter":
        d = dict(d)
        dtype = d.pop("dtype", "float")
        if dtype not in _DTYPES:
            raise ValueError(f"RLParameter: dtype must be 'int' or 'float', got {dtype!r}")
        return cls(**d, dtype=_DTYPES[dtype])


class HyperparameterConfig(Mapping):
    """The named hyperparameters that mutation may change."""

    def __init__(self, **params: RLParameter):
        for name, param in params.items():
            if not isinstance(param, RLParameter):
                raise ValueError(f"HyperparameterConfig: '{name}' must be an RLParameter, got {type(param).__name__}")
        if "lr" in params and params["lr"].min <= 0:
            raise ValueError(f"HyperparameterConfig: 'lr' needs min > 0, got min={params['lr'].min}")
        if "batch_size" in params:
            bs = params["batch_size"]
            if bs.dtype is not int or bs.min < 1:
                raise ValueError(
                    f"HyperparameterConfig: 'batch_size' needs dtype=int and min >= 1, "
                    f"got dtype={bs.dtype.__name__}, min={bs.min}"
                )
        self._params = dict(params)

    def __getitem__(self, name: str) -> RLParameter:
        return self._params[name]

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return f"HyperparameterConfig({self._params!r})"

    def names(self) -> list[str]:
        return list(self._params)

    def check(self, hyperparameters: dict) -> None:
        """Raise ValueError naming the first key that is missing or out of bounds."""
        for name, param in self._params.items():
            if name not in hyperparameters:
                raise ValueError(f"hyperparameter '{name}' is missing")
            value = hyperparameters[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"hyperparameter '{name}'={value!r} must be a number")
            if param.dtype is int and not float(value).is_integer():
                raise ValueError(f"hyperparameter '{name}'={value!r} must be an integer")
            if not param.min <= value <= param.max:
                raise ValueError(f"hyperparameter '{name}'={value!r} is outside [{param.min}, {param.max}]")

    def to_dict(self) -> dict:
        return {name: param.to_dict() for name, param in self._params.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "HyperparameterConfig":
        return cls(**{name: RLParameter.from_dict(p) for name, p in d.items()})
