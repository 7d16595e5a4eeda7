"""Multilingual: English sentences translated into three generated languages.

Each language is a fixed lexicon of invented words (its own syllables) and its own grammar: the
order of subject, verb and object, the side of the noun its adjectives take, a plural marker and
a past-tense marker. The lexicon and rules are the same for every seed (they are the task); the
seed only draws sentences. An eval sentence is an unseen combination of words and forms that the
training sentences teach, so the task is learnable by a small model, unlike translating unseen
phrases of a natural language (the Django catalogs this domain used before plateaued at 0.43).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.generated import GeneratedDomain

# English lemmas: (singular, plural) nouns, adjectives, (plural-subject, singular-subject, past) verbs.
_NOUNS = (
    ("fox", "foxes"), ("river", "rivers"), ("stone", "stones"), ("bird", "birds"), ("tree", "trees"),
    ("ship", "ships"), ("horse", "horses"), ("lamp", "lamps"), ("door", "doors"), ("cloud", "clouds"),
    ("child", "children"), ("farmer", "farmers"), ("king", "kings"), ("wolf", "wolves"), ("cat", "cats"),
    ("road", "roads"), ("house", "houses"), ("garden", "gardens"), ("bell", "bells"), ("boat", "boats"),
    ("sister", "sisters"), ("teacher", "teachers"), ("bridge", "bridges"), ("apple", "apples"),
    ("letter", "letters"), ("mountain", "mountains"), ("fish", "fish"), ("soldier", "soldiers"),
    ("window", "windows"), ("dog", "dogs"), ("queen", "queens"), ("wheel", "wheels"),
)
_ADJECTIVES = (
    "red", "blue", "green", "old", "young", "small", "big", "quiet", "bright", "cold", "warm",
    "dark", "happy", "tired", "strong", "gentle", "tall", "heavy", "clever", "brave",
)
_VERBS = (
    ("see", "sees", "saw"), ("find", "finds", "found"), ("like", "likes", "liked"),
    ("follow", "follows", "followed"), ("carry", "carries", "carried"), ("hear", "hears", "heard"),
    ("hold", "holds", "held"), ("paint", "paints", "painted"), ("watch", "watches", "watched"),
    ("help", "helps", "helped"), ("push", "pushes", "pushed"), ("call", "calls", "called"),
    ("build", "builds", "built"), ("lose", "loses", "lost"), ("visit", "visits", "visited"),
    ("know", "knows", "knew"),
)


@dataclass(frozen=True)
class Language:
    name: str
    syllables: tuple[str, ...]
    order: str  # permutation of "SVO"
    adjective_after: bool  # noun-adjective (True) or adjective-noun order
    plural_suffix: str  # appended to the noun
    past_particle: str  # a separate word after the verb
    article: str


LANGUAGES = (
    Language("Velan", ("ka", "lo", "mi", "ren", "tas", "vel", "dor", "ni", "bru", "sha"), "SOV", True, "i", "ta", "lo"),
    Language("Orsk", ("gor", "ak", "um", "thra", "ok", "zan", "kul", "ep", "ruk", "bel"), "SVO", False, "en", "ur", "da"),
    Language("Miru", ("fe", "ya", "no", "si", "pua", "le", "wi", "ho", "tae", "mu"), "VSO", True, "s", "ne", "an"),
)


def _lexicon(lang: Language) -> dict[str, str]:
    """One invented word per English lemma, fixed per language (seeded by its name only)."""
    rng = random.Random(f"multilingual|lexicon|{lang.name}")
    lemmas = [n for n, _ in _NOUNS] + list(_ADJECTIVES) + [v for v, _, _ in _VERBS]
    used: set[str] = {lang.article, lang.past_particle}
    out: dict[str, str] = {}
    for lemma in lemmas:
        word = ""
        while not word or word in used:
            word = "".join(rng.choice(lang.syllables) for _ in range(rng.choice((2, 2, 3))))
        used.add(word)
        out[lemma] = word
    return out


_LEXICONS = {lang.name: _lexicon(lang) for lang in LANGUAGES}


def _noun_phrase(rng: random.Random) -> tuple[int, str, bool]:
    return rng.randrange(len(_NOUNS)), rng.choice(_ADJECTIVES), rng.random() < 0.35


def _english_np(noun: int, adj: str, plural: bool) -> str:
    return f"the {adj} {_NOUNS[noun][1 if plural else 0]}"


def _target_np(lang: Language, noun: int, adj: str, plural: bool) -> str:
    lex = _LEXICONS[lang.name]
    n = lex[_NOUNS[noun][0]] + (lang.plural_suffix if plural else "")
    a = lex[adj]
    return " ".join((lang.article, n, a) if lang.adjective_after else (lang.article, a, n))


def make_example(rng: random.Random) -> Example:
    lang = rng.choice(LANGUAGES)
    subj, obj = _noun_phrase(rng), _noun_phrase(rng)
    verb = rng.randrange(len(_VERBS))
    past = rng.random() < 0.4
    lemma, third, past_form = _VERBS[verb]
    english_verb = past_form if past else (lemma if subj[2] else third)
    english = f"{_english_np(*subj)} {english_verb} {_english_np(*obj)}"
    verb_words = _LEXICONS[lang.name][lemma] + (f" {lang.past_particle}" if past else "")
    parts = {"S": _target_np(lang, *subj), "V": verb_words, "O": _target_np(lang, *obj)}
    target = " ".join(parts[c] for c in lang.order)
    return Example(f"English: {english}\n{lang.name}:", f" {target}")


def english_of(ex: Example) -> str:
    """The split key: the English sentence, so a held-out sentence is unseen in every language."""
    return ex.prompt.split("\n", 1)[0]


DOMAIN = GeneratedDomain("multilingual", make_example, key=english_of)
