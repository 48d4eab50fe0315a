"""Mutable hyperparameters: numeric ranges (`RLParameter`) and choices (`RLChoice`), how each
moves (perturbed, or sampled from its prior) and their validation."""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_DTYPES = {"int": int, "float": float}


@dataclass(frozen=True)
class RLParameter:
    """Bounds and multiplicative mutation factors of one numeric hyperparameter. An int one may
    be held to multiples of `multiple_of`."""

    min: float
    max: float
    shrink_factor: float = 0.8
    grow_factor: float = 1.2
    dtype: type = float
    scale: str = "linear"  # how values are spread over [min, max] when sampled: "linear" or "log"
    multiple_of: int = 1

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
            object.__setattr__(self, name, _factor(getattr(self, name), f"RLParameter: {name}"))
        if self.multiple_of != 1:
            if self.dtype is float:
                raise ValueError(f"RLParameter: multiple_of={self.multiple_of} applies to int parameters only")
            self.multiple_bounds(self.multiple_of)

    def mutate(self, value, rng: np.random.Generator, multiple_of: int = 1):
        """Grow or shrink `value` (50/50) by this parameter's factors and keep it within bounds."""
        return self.perturb(value, rng, (self.grow_factor, self.shrink_factor), multiple_of)

    def perturb(self, value, rng: np.random.Generator, factors, multiple_of: int = 1):
        """Multiply `value` by one of `factors` (each equally likely), within bounds. An int
        value that the factor would leave in place moves by one step (of the multiple) in the
        factor's direction, or the other way at a bound."""
        factor = factors[int(rng.random() * len(factors))]
        m = self._multiple(multiple_of)
        if self.dtype is float:
            return float(np.clip(value * factor, self.min, self.max))
        return self._mutate_int(value, factor, +1 if factor > 1 else -1, m)

    def sample(self, rng: np.random.Generator, multiple_of: int = 1):
        """A value drawn from the prior: uniform over [min, max] on this parameter's scale (an int
        one rounded to the nearest allowed multiple)."""
        return self.at(rng.random(), multiple_of)

    def at(self, quantile: float, multiple_of: int = 1):
        """The prior's value at `quantile` in [0, 1]: that far from min to max on this parameter's
        scale. An int one on a linear scale takes its allowed multiples as equal shares of [0, 1]
        (so each is as likely as the next); on a log scale it is rounded to the nearest multiple."""
        m = self._multiple(multiple_of)
        if self.dtype is int and self.scale == "linear":
            lo, hi = self.multiple_bounds(m)
            count = (hi - lo) // m + 1
            return int(lo + min(int(quantile * count), count - 1) * m)
        if self.scale == "log":
            value = math.exp(math.log(self.min) + quantile * (math.log(self.max) - math.log(self.min)))
        else:
            value = self.min + quantile * (self.max - self.min)
        if self.dtype is float:
            return float(min(max(value, self.min), self.max))
        lo, hi = self.multiple_bounds(m)
        return int(min(max(int(round(value / m)) * m, lo), hi))

    def _multiple(self, multiple_of: int) -> int:
        """The step an int value moves in: `multiple_of` and this parameter's own, both."""
        if self.dtype is float:
            if multiple_of != 1:
                raise ValueError(f"RLParameter: multiple_of={multiple_of} applies to int parameters only")
            return 1
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, numbers.Integral) or multiple_of < 1:
            raise ValueError(f"RLParameter: multiple_of must be an int >= 1, got {multiple_of!r}")
        return math.lcm(self.multiple_of, int(multiple_of))

    def _mutate_int(self, value, factor: float, direction: int, m: int) -> int:
        lo, hi = self.multiple_bounds(m)
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

    def check(self, name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"hyperparameter '{name}'={value!r} must be a number")
        if self.dtype is int and not float(value).is_integer():
            raise ValueError(f"hyperparameter '{name}'={value!r} must be an integer")
        if not self.min <= value <= self.max:
            raise ValueError(f"hyperparameter '{name}'={value!r} is outside [{self.min}, {self.max}]")

    def to_dict(self) -> dict:
        return {
            "min": self.min,
            "max": self.max,
            "shrink_factor": self.shrink_factor,
            "grow_factor": self.grow_factor,
            "dtype": self.dtype.__name__,
            "scale": self.scale,
            "multiple_of": self.multiple_of,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RLParameter":
        d = dict(d)
        dtype = d.pop("dtype", "float")
        if dtype not in _DTYPES:
            raise ValueError(f"RLParameter: dtype must be 'int' or 'float', got {dtype!r}")
        return cls(**d, dtype=_DTYPES[dtype])


@dataclass(frozen=True)
class RLChoice:
    """A hyperparameter that takes one of `choices` (in their order: neighbours are adjacent)."""

    choices: tuple

    def __post_init__(self):
        choices = tuple(self.choices)
        if not choices:
            raise ValueError("RLChoice: choices must not be empty")
        if len(set(choices)) != len(choices):
            raise ValueError(f"RLChoice: choices must be distinct, got {list(choices)}")
        for choice in choices:
            if isinstance(choice, bool) or not isinstance(choice, (str, numbers.Real)):
                raise ValueError(f"RLChoice: a choice must be a string or a number, got {choice!r}")
        object.__setattr__(self, "choices", choices)

    def mutate(self, value, rng: np.random.Generator, multiple_of: int = 1):
        """A neighbouring choice: the one before or after `value` (50/50; at an end, the only
        neighbour). With one choice, `value` stays."""
        index = self.choices.index(value)
        neighbours = [i for i in (index - 1, index + 1) if 0 <= i < len(self.choices)]
        if not neighbours:
            return value
        return self.choices[neighbours[int(rng.random() * len(neighbours))]]

    def perturb(self, value, rng: np.random.Generator, factors, multiple_of: int = 1):
        """Explore's perturbation of a categorical value: a neighbouring choice."""
        return self.mutate(value, rng)

    def sample(self, rng: np.random.Generator, multiple_of: int = 1):
        """A choice drawn uniformly."""
        return self.choices[int(rng.integers(len(self.choices)))]

    def at(self, quantile: float, multiple_of: int = 1):
        """The choice whose equal share of [0, 1] holds `quantile`."""
        return self.choices[min(int(quantile * len(self.choices)), len(self.choices) - 1)]

    def check(self, name: str, value) -> None:
        if isinstance(value, bool) or value not in self.choices:
            raise ValueError(f"hyperparameter '{name}'={value!r} is not one of {list(self.choices)}")

    def to_dict(self) -> dict:
        return {"choices": list(self.choices)}

    @classmethod
    def from_dict(cls, d: dict) -> "RLChoice":
        return cls(tuple(d["choices"]))


def _factor(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


class HyperparameterConfig(Mapping):
    """The named hyperparameters that mutation may change."""

    def __init__(self, **params: RLParameter | RLChoice):
        for name, param in params.items():
            if not isinstance(param, (RLParameter, RLChoice)):
                raise ValueError(f"HyperparameterConfig: '{name}' must be an RLParameter or RLChoice, "
                                 f"got {type(param).__name__}")
        if "lr" in params and isinstance(params["lr"], RLParameter) and params["lr"].min <= 0:
            raise ValueError(f"HyperparameterConfig: 'lr' needs min > 0, got min={params['lr'].min}")
        if "batch_size" in params and isinstance(params["batch_size"], RLParameter):
            bs = params["batch_size"]
            if bs.dtype is not int or bs.min < 1:
                raise ValueError(
                    f"HyperparameterConfig: 'batch_size' needs dtype=int and min >= 1, "
                    f"got dtype={bs.dtype.__name__}, min={bs.min}"
                )
        self._params = dict(params)

    def __getitem__(self, name: str) -> RLParameter | RLChoice:
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
            param.check(name, hyperparameters[name])

    def to_dict(self) -> dict:
        return {name: param.to_dict() for name, param in self._params.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "HyperparameterConfig":
        return cls(**{name: (RLChoice if "choices" in p else RLParameter).from_dict(p) for name, p in d.items()})
