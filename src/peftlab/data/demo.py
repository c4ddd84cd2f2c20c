"""The built-in demo dataset: generated restaurant descriptions in the E2E NLG format.

Real corpora cannot ship with the package, so ``data.path=demo`` uses this small table-to-text set instead. Each row
is ``{"id", "meaning_representation", "references"}`` exactly as in ``shared/data/e2e_nlg``: an attribute list such
as ``name[The Copper Kettle], eatType[pub], food[Italian], area[riverside]`` and one or more descriptions written
by fixed sentence plans (four styles that differ in clause order and wording). The style is consistent enough to
learn in a few dozen steps, while a zero-shot model does not guess the exact wording (low BLEU).

Splits: train (600 rows, one reference each), validation (100 rows, 1-3 references in different styles) and test
(100 rows, 2-4). Restaurant names never cross splits, so copying a name from the prompt must be learned, not
memorized. Everything comes from ``random.Random`` with fixed integer seeds, so the rows are identical on every
machine and under any ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# split -> (rows, min references, max references, seed)
DEMO_SPLITS: dict[str, tuple[int, int, int, int]] = {
    "train": (600, 1, 1, 11),
    "validation": (100, 1, 3, 12),
    "test": (100, 2, 4, 13),
}
# How many distinct restaurant names each split draws from (disjoint slices of one shuffled name list).
_NAMES_PER_SPLIT = {"train": 150, "validation": 40, "test": 40}

_NAME_FIRST = ("Golden", "Copper", "Silver", "Red", "Blue", "Green", "Old", "Little", "Crooked", "Royal", "Hidden",
               "Lucky", "Velvet", "Iron", "Wild", "Painted", "Sleepy", "Brass", "Amber", "Jolly")
_NAME_SECOND = ("Kettle", "Lantern", "Anchor", "Fox", "Oak", "Harbour", "Mill", "Spoon", "Crown", "Bell", "Garden",
                "Heron", "Barrel", "Lion", "Orchard", "Compass", "Teapot", "Bridge", "Swan", "Candle")
_NEAR = ("Café Rouge", "Burger King", "The Portland Arms", "Express by Holiday Inn", "All Bar One", "Ranch",
         "Crowne Plaza Hotel", "The Bakers", "Yippee Noodle Bar", "Café Sicilia", "Raja Indian Cuisine",
         "The Sorrento")
_EAT_TYPES = ("coffee shop", "pub", "restaurant")
_FOODS = ("Japanese", "Italian", "French", "Indian", "Chinese", "English", "Fast food")
_AREAS = ("riverside", "city centre")
# value -> (noun phrase after "has", participle phrase after "is")
_PRICE = {
    "cheap": ("low prices", "cheap"),
    "moderate": ("moderate prices", "moderately priced"),
    "high": ("high prices", "expensive"),
    "less than £20": ("prices under £20", "priced under £20"),
    "£20-25": ("prices of £20-25", "priced at £20-25"),
    "more than £30": ("prices above £30", "priced above £30"),
}
_RATING = {  # value -> (noun phrase after "has", participle phrase, adverb after "Customers rate it")
    "low": ("a low customer rating", "rated low by customers", "low"),
    "average": ("an average customer rating", "rated average by customers", "as average"),
    "high": ("a high customer rating", "rated highly by customers", "highly"),
    "1 out of 5": ("a customer rating of 1 out of 5", "rated 1 out of 5 by customers", "1 out of 5"),
    "3 out of 5": ("a customer rating of 3 out of 5", "rated 3 out of 5 by customers", "3 out of 5"),
    "5 out of 5": ("a customer rating of 5 out of 5", "rated 5 out of 5 by customers", "5 out of 5"),
}
# E2E attribute order of the meaning representation; name and eatType are always present.
_OPTIONAL = ("food", "priceRange", "customer rating", "area", "familyFriendly", "near")
_MR_ORDER = ("name", "eatType") + _OPTIONAL
_VALUES = {"food": _FOODS, "priceRange": tuple(_PRICE), "customer rating": tuple(_RATING), "area": _AREAS,
           "familyFriendly": ("yes", "no"), "near": _NEAR}


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _kind(attrs: dict[str, str]) -> str:
    """'Italian pub', 'fast food coffee shop', or just 'pub'."""
    food = attrs.get("food")
    return f"{food.lower() if food == 'Fast food' else food} {attrs['eatType']}" if food else attrs["eatType"]


def _place(attrs: dict[str, str], near_word: str = "near") -> str:
    """' in the riverside area near Ranch' (leading space) or ''."""
    parts = []
    if "area" in attrs:
        parts.append(f"in the {attrs['area']}" + (" area" if attrs["area"] == "riverside" else ""))
    if "near" in attrs:
        parts.append(f"{near_word} {attrs['near']}")
    return "".join(" " + part for part in parts)


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _style_plain(attrs: dict[str, str]) -> str:
    """Name first, then facts: 'X is an Italian pub in the city centre near Y. It has ... It is family friendly.'"""
    text = f"{attrs['name']} is {_a(_kind(attrs))}{_place(attrs)}."
    has = [_PRICE[attrs["priceRange"]][0]] if "priceRange" in attrs else []
    has += [_RATING[attrs["customer rating"]][0]] if "customer rating" in attrs else []
    if has:
        text += f" It has {_join(has)}."
    if "familyFriendly" in attrs:
        text += " It is family friendly." if attrs["familyFriendly"] == "yes" else " It is not family friendly."
    return text


def _style_located(attrs: dict[str, str]) -> str:
    """Place first: 'Located in the riverside area near Y, X is a family-friendly Italian pub, priced ...'."""
    place = _place(attrs, near_word="close to").strip()
    opener = f"Located {place}, {attrs['name']}" if place else attrs["name"]
    family = {"yes": "family-friendly ", "no": "adults-only "}.get(attrs.get("familyFriendly", ""), "")
    text = f"{opener} is {_a(family + _kind(attrs))}"
    facts = [_PRICE[attrs["priceRange"]][1]] if "priceRange" in attrs else []
    facts += [_RATING[attrs["customer rating"]][1]] if "customer rating" in attrs else []
    return text + (f", {_join(facts)}." if facts else ".")


def _style_there_is(attrs: dict[str, str]) -> str:
    """Existential: 'There is a pub called X in the city centre. It serves Italian food ...'."""
    text = f"There is {_a(attrs['eatType'])} called {attrs['name']}{_place(attrs, near_word='by')}."
    does = []
    if "food" in attrs:
        does.append(f"serves {'fast' if attrs['food'] == 'Fast food' else attrs['food']} food")
    if "priceRange" in attrs:
        does.append(f"is {_PRICE[attrs['priceRange']][1]}")
    if does:
        text += f" It {_join(does)}."
    if "customer rating" in attrs:
        text += f" Customers rate it {_RATING[attrs['customer rating']][2]}."
    if "familyFriendly" in attrs:
        text += " Kids are welcome." if attrs["familyFriendly"] == "yes" else " Kids are not welcome."
    return text


def _style_for(attrs: dict[str, str]) -> str:
    """Audience first: 'For a family-friendly meal, try X, an Italian pub ... with low prices.'"""
    audience = {"yes": "For a family-friendly meal", "no": "For an evening without children"}
    opener = audience.get(attrs.get("familyFriendly", ""), "For a good meal")
    text = f"{opener}, try {attrs['name']}, {_a(_kind(attrs))}{_place(attrs)}"
    has = [_PRICE[attrs["priceRange"]][0]] if "priceRange" in attrs else []
    has += [_RATING[attrs["customer rating"]][0]] if "customer rating" in attrs else []
    return text + (f" with {_join(has)}." if has else ".")


_STYLES: tuple[Callable[[dict[str, str]], str], ...] = (_style_plain, _style_located, _style_there_is, _style_for)


def _split_names(split: str) -> list[str]:
    """This split's slice of one fixed shuffle of all first x second name pairs (slices never overlap)."""
    names = [f"The {first} {second}" for first in _NAME_FIRST for second in _NAME_SECOND]
    random.Random(7).shuffle(names)
    start = 0
    for other in DEMO_SPLITS:
        if other == split:
            return names[start:start + _NAMES_PER_SPLIT[split]]
        start += _NAMES_PER_SPLIT[other]
    raise AssertionError(split)


def _attributes(rng: random.Random, name: str) -> dict[str, str]:
    """A random attribute set: name, eatType and two to five of the optional attributes."""
    attrs = {"name": name, "eatType": rng.choice(_EAT_TYPES)}
    for key in rng.sample(_OPTIONAL, rng.randint(2, 5)):
        attrs[key] = rng.choice(_VALUES[key])
    return attrs


def meaning_representation(attrs: dict[str, str]) -> str:
    """E2E form: ``name[X], eatType[pub], ...`` in the dataset's attribute order."""
    return ", ".join(f"{key}[{attrs[key]}]" for key in _MR_ORDER if key in attrs)


def demo_rows(split: str) -> list[dict]:
    """The rows of one demo split (a fresh list on every call; identical across calls and machines).

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        ``{"id": "demo-<split>-NNNN", "meaning_representation": str, "references": list[str]}`` rows.

    Raises:
        ValueError: an unknown split; the message lists the splits.
    """
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo dataset: unknown split {split!r}; splits: {', '.join(DEMO_SPLITS)}")
    count, min_refs, max_refs, seed = DEMO_SPLITS[split]
    rng = random.Random(seed)
    names = _split_names(split)
    rows = []
    for index in range(count):
        attrs = _attributes(rng, rng.choice(names))
        styles = rng.sample(range(len(_STYLES)), rng.randint(min_refs, max_refs))
        rows.append({"id": f"demo-{split}-{index:04d}", "meaning_representation": meaning_representation(attrs),
                     "references": [_STYLES[style](attrs) for style in styles]})
    return rows
