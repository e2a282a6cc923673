"""Model variants served side by side (InfAdapter, arXiv 2304.10892): which variant serves a request.

A deployment may serve several variants of its model (two sizes of one family, or fp32 and bf16
of one checkpoint). Each variant is a whole pipeline: its own encoder, prefill and decode
workers, registered under the variant's name, since embeddings and KV of one variant mean
nothing to another's layers. A request pins a variant (`GenerateRequest.variant`) or accepts
any whose profiled accuracy is at or above its floor; among those, the scheduler's variant mix
(weights the adapter sets from its integer program: the share of traffic each variant should
take) decides, by smooth weighted round robin: over any run of requests each variant's count
stays within one of its weighted share, deterministically.

Pure Python: no gRPC, no Redis.
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Variant", "VariantError", "VariantMix", "parse_variants"]

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class VariantError(ValueError):
    """A request's variant cannot be served; `field` names the request field at fault."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Variant:
    """A variant: its name (what workers register under and requests pin), its checkpoint
    directory (as given; empty in tests) and its expected accuracy in [0, 1]."""

    name: str
    accuracy: float
    model_dir: str = ""

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"variant name {self.name!r}: use 1..64 letters, digits, '.', '_' or '-'")
        if not (isinstance(self.accuracy, (int, float)) and math.isfinite(self.accuracy)
                and 0.0 <= self.accuracy <= 1.0):
            raise ValueError(f"variant {self.name}: accuracy {self.accuracy!r} is not in [0, 1]")


def parse_variants(spec: str) -> tuple[tuple[str, str, float | None], ...]:
    """``NAME=DIR[:ACCURACY],...`` -> ((name, dir, accuracy or None), ...), in order.

    Raises:
        ValueError: a malformed entry, a bad name or accuracy, a name given twice.
    """
    out: list[tuple[str, str, float | None]] = []
    for raw in (p.strip() for p in spec.split(",")):
        if not raw:
            continue
        name, sep, rest = raw.partition("=")
        if not sep or not rest:
            raise ValueError(f"variant {raw!r}: expected NAME=DIR[:ACCURACY]")
        if not NAME.match(name):
            raise ValueError(f"variant name {name!r}: use 1..64 letters, digits, '.', '_' or '-'")
        directory, accuracy = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                accuracy = float(tail)
            except ValueError:
                pass  # a ':' in the path itself
            else:
                directory = head
                if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
                    raise ValueError(f"variant {name}: accuracy {tail} is not in [0, 1]")
        if any(n == name for n, _, _ in out):
            raise ValueError(f"variant {name} is named twice")
        out.append((name, directory, accuracy))
    return tuple(out)


class VariantMix:
    """Chooses the variant of each request (module docstring). Weights default to 1 each."""

    def __init__(self, variants: Sequence[Variant], weights: Mapping[str, float] | None = None):
        if not variants:
            raise ValueError("VariantMix: at least one variant")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"VariantMix: variant names must be distinct, got {names}")
        self.variants: Mapping[str, Variant] = MappingProxyType({v.name: v for v in variants})
        self._weights: dict[str, float] = {n: 1.0 for n in names}
        self._credit: dict[str, float] = {n: 0.0 for n in names}
        self.served: dict[str, int] = {n: 0 for n in names}
        if weights is not None:
            self.set_weights(weights)

    @property
    def names(self) -> list[str]:
        return list(self.variants)

    @property
    def weights(self) -> Mapping[str, float]:
        return MappingProxyType(dict(self._weights))

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """The share each variant should take (any non-negative scale; variants not named get 0).

        Raises:
            ValueError: an unknown variant, a negative or non-finite weight, all zero.
        """
        unknown = sorted(set(weights) - set(self.variants))
        if unknown:
            raise ValueError(f"weights: unknown variants {unknown}; known: {self.names}")
        new = {n: float(weights.get(n, 0.0)) for n in self.variants}
        if any(not math.isfinite(w) or w < 0 for w in new.values()) or not any(new.values()):
            raise ValueError(f"weights: must be finite, >= 0 and not all 0, got {dict(weights)}")
        self._weights = new
        self._credit = {n: 0.0 for n in self.variants}

    def resolve(self, pin: str, floor: float = 0.0, available: Collection[str] | None = None) -> str:
        """The variant to serve a request: `pin` when set; else, among the variants at or above
        `floor` (and in `available`, the variants with live workers, when any of those qualify),
        the next by smooth weighted round robin (a variant of weight 0 only when no eligible one
        has weight: then the most accurate eligible).

        Raises:
            VariantError: `pin` names no variant (field ``variant``); no variant reaches
                `floor` (field ``selection.accuracy_floor``).
        """
        if pin:
            if pin not in self.variants:
                raise VariantError("variant", f"unknown variant {pin!r}; this deployment serves {self.names}")
            self.served[pin] += 1
            return pin
        eligible = [n for n, v in self.variants.items() if v.accuracy >= floor]
        if not eligible:
            best = max(v.accuracy for v in self.variants.values())
            raise VariantError("selection.accuracy_floor",
                               f"no variant reaches accuracy {floor} (the most accurate has {best})")
        if available is not None and any(n in available for n in eligible):
            eligible = [n for n in eligible if n in available]
        weighted = [n for n in eligible if self._weights[n] > 0]
        if not weighted:
            choice = max(eligible, key=lambda n: (self.variants[n].accuracy, n))
        else:
            total = sum(self._weights[n] for n in weighted)
            for n in weighted:
                self._credit[n] += self._weights[n]
            choice = max(weighted, key=lambda n: (self._credit[n], self._weights[n], n))
            self._credit[choice] -= total
        self.served[choice] += 1
        return choice
