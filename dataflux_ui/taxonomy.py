"""The paralinguistic / acoustic taxonomy (``assets/taxonomy.json``): L0 > L1 > L2 > L3 leaves with exemplars.

DataFlux hands the question generator one category at a time. Trying every leaf on every clip wastes generator
calls, so leaves are first ranked by how many of their keywords the caption mentions; the generator then confirms the
fit itself (``is_success``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

TAXONOMY_PATH = Path(__file__).resolve().parent.parent / "assets" / "taxonomy.json"
SEPARATOR = " > "


class TaxonomyError(ValueError):
    """The taxonomy file is malformed."""


@dataclass(frozen=True)
class TaxonomyCategory:
    key: str
    levels: tuple[str, str, str, str]
    keywords: tuple[str, ...]
    exemplars: tuple[str, ...]

    @property
    def path(self) -> str:
        """``L0 > L1 > L2 > L3``, as the published prompt shows it."""
        return SEPARATOR.join(self.levels)


def _category(entry: dict) -> TaxonomyCategory:
    levels = entry.get("path")
    if not isinstance(levels, list) or len(levels) != 4 or not all(isinstance(x, str) and x for x in levels):
        raise TaxonomyError(f"category {entry.get('key')!r}: path must be four non-empty names (L0..L3)")
    exemplars = entry.get("exemplars", [])
    if not 2 <= len(exemplars) <= 3:
        raise TaxonomyError(f"category {entry['key']!r}: needs 2-3 exemplar questions")
    return TaxonomyCategory(entry["key"], tuple(levels), tuple(k.lower() for k in entry.get("keywords", [])),
                            tuple(exemplars))


def load_taxonomy(path: str | os.PathLike | None = None) -> list[TaxonomyCategory]:
    """All leaves of the taxonomy file (default: the bundled ``assets/taxonomy.json``)."""
    return list(_load(str(path or TAXONOMY_PATH)))


@cache
def _load(path: str) -> tuple[TaxonomyCategory, ...]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    categories = tuple(_category(entry) for entry in data["categories"])
    keys = [c.key for c in categories]
    if len(set(keys)) != len(keys):
        raise TaxonomyError("category keys must be unique")
    return categories


def keyword_hits(category: TaxonomyCategory, text: str) -> int:
    """How many of the leaf's keywords occur in the text as whole words."""
    lower = text.lower()
    return sum(1 for word in category.keywords if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lower))


def candidates(categories: list[TaxonomyCategory], caption: str, limit: int,
               rng: np.random.Generator) -> list[TaxonomyCategory]:
    """The ``limit`` leaves the caption most likely belongs to (most keyword hits; ties broken by ``rng``)."""
    scored = [(keyword_hits(c, caption), float(rng.random()), c) for c in categories]
    scored = [s for s in scored if s[0] > 0]
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [c for _, _, c in scored[:limit]]
