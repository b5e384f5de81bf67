"""A deterministic English-like corpus from a small grammar: text without a download.

Sentences are built from a phrase grammar over a fixed vocabulary:

    sentence  := clause [", " conjunction clause] ("." | "!")  |  question "?"
    clause    := noun_phrase verb_phrase
    question  := ("Did" | "Does" | "Do") noun_phrase verb_phrase_in_base_form
    noun_phrase := determiner [adjective] noun [preposition determiner noun]
    verb_phrase := transitive_verb noun_phrase | intransitive_verb [adverb]

with number agreement (a singular subject takes "sees", a plural one "see"), a tense per
sentence (present or past), "a" / "an" by the next word's first letter, and a capital at the
start of each sentence. Paragraphs are sentences joined by spaces; they are separated by a
blank line and the text ends with a newline. The words are lower-case ASCII letters, so the
byte-level units of :mod:`fastlab.data.text` find exactly the grammar's words and sentences.

Determinism. Choices come from ``random.Random(seed).random()`` only, whose sequence Python
guarantees across versions for the same integer seed, so a seed names the same corpus
everywhere.
"""
import random
from typing import List, Sequence, Tuple

#: (singular, plural)
NOUNS: Tuple[Tuple[str, str], ...] = (
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("child", "children"),
    ("teacher", "teachers"), ("farmer", "farmers"), ("river", "rivers"), ("city", "cities"),
    ("house", "houses"), ("tree", "trees"), ("apple", "apples"), ("book", "books"),
    ("letter", "letters"), ("horse", "horses"), ("window", "windows"), ("garden", "gardens"),
    ("engine", "engines"), ("island", "islands"), ("owl", "owls"), ("student", "students"),
    ("mountain", "mountains"), ("song", "songs"), ("box", "boxes"), ("idea", "ideas"),
)
#: (third person singular present, plural present and base form, past)
TRANSITIVE_VERBS: Tuple[Tuple[str, str, str], ...] = (
    ("sees", "see", "saw"), ("finds", "find", "found"), ("likes", "like", "liked"),
    ("follows", "follow", "followed"), ("carries", "carry", "carried"),
    ("builds", "build", "built"), ("reads", "read", "read"), ("watches", "watch", "watched"),
    ("paints", "paint", "painted"), ("remembers", "remember", "remembered"),
    ("opens", "open", "opened"), ("chases", "chase", "chased"),
)
INTRANSITIVE_VERBS: Tuple[Tuple[str, str, str], ...] = (
    ("sleeps", "sleep", "slept"), ("runs", "run", "ran"), ("sings", "sing", "sang"),
    ("waits", "wait", "waited"), ("laughs", "laugh", "laughed"), ("falls", "fall", "fell"),
    ("wanders", "wander", "wandered"), ("shines", "shine", "shone"),
)
ADJECTIVES = ("old", "young", "quiet", "green", "small", "large", "bright", "happy",
              "ancient", "empty", "red", "clever", "heavy", "early", "gentle", "strange")
ADVERBS = ("slowly", "quickly", "often", "again", "quietly", "together", "today", "outside")
PREPOSITIONS = ("near", "behind", "under", "with", "beside", "across", "above")
CONJUNCTIONS = ("and", "but", "while", "because", "so")
SINGULAR_DETERMINERS = ("the", "a", "this", "that", "every", "one")
PLURAL_DETERMINERS = ("the", "some", "these", "those", "many", "two", "three")

# how often each optional part appears: every sentence shape occurs within a few sentences,
# while most sentences stay short (about ten words, a byte-level model's easy case)
ADJECTIVE_CHANCE = 0.4
PREPOSITION_CHANCE = 0.15
PLURAL_CHANCE = 0.35
TRANSITIVE_CHANCE = 0.6
ADVERB_CHANCE = 0.5
COMPOUND_CHANCE = 0.25
QUESTION_CHANCE = 0.1
EXCLAMATION_CHANCE = 0.05
PAST_CHANCE = 0.5


class _Chooser:
    """Choices drawn from ``random()`` alone (the part of ``random.Random`` whose sequence
    is stable across Python versions)."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def chance(self, p: float) -> bool:
        return self._rng.random() < p

    def pick(self, options: Sequence):
        return options[int(self._rng.random() * len(options))]

    def between(self, low: int, high: int) -> int:
        return low + int(self._rng.random() * (high - low + 1))


def _noun_phrase(c: _Chooser, plural: bool, with_preposition: bool = True) -> List[str]:
    words = [c.pick(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)]
    if c.chance(ADJECTIVE_CHANCE):
        words.append(c.pick(ADJECTIVES))
    words.append(c.pick(NOUNS)[1 if plural else 0])
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    if with_preposition and c.chance(PREPOSITION_CHANCE):
        words.append(c.pick(PREPOSITIONS))
        words += _noun_phrase(c, c.chance(PLURAL_CHANCE), with_preposition=False)
    return words


def _verb_phrase(c: _Chooser, form: int) -> List[str]:
    """``form`` indexes the verb tuples: 0 singular present, 1 plural present / base, 2 past."""
    if c.chance(TRANSITIVE_CHANCE):
        return [c.pick(TRANSITIVE_VERBS)[form]] + _noun_phrase(c, c.chance(PLURAL_CHANCE))
    words = [c.pick(INTRANSITIVE_VERBS)[form]]
    if c.chance(ADVERB_CHANCE):
        words.append(c.pick(ADVERBS))
    return words


def _clause(c: _Chooser, past: bool) -> List[str]:
    plural = c.chance(PLURAL_CHANCE)
    return _noun_phrase(c, plural) + _verb_phrase(c, 2 if past else int(plural))


def _sentence(c: _Chooser) -> str:
    past = c.chance(PAST_CHANCE)
    if c.chance(QUESTION_CHANCE):
        plural = c.chance(PLURAL_CHANCE)
        auxiliary = "did" if past else ("do" if plural else "does")
        words, end = [auxiliary] + _noun_phrase(c, plural) + _verb_phrase(c, 1), "?"
    else:
        words = _clause(c, past)
        if c.chance(COMPOUND_CHANCE):
            words[-1] += ","
            words += [c.pick(CONJUNCTIONS)] + _clause(c, past)
        end = "!" if c.chance(EXCLAMATION_CHANCE) else "."
    text = " ".join(words) + end
    return text[0].upper() + text[1:]


def english_corpus(n_paragraphs: int = 16, *, seed: int = 0,
                   sentences_per_paragraph: Tuple[int, int] = (3, 8)) -> str:
    """``n_paragraphs`` paragraphs of grammar sentences, each paragraph of a number of
    sentences drawn uniformly from ``sentences_per_paragraph`` (inclusive); the same text
    for the same arguments."""
    if not isinstance(n_paragraphs, int) or n_paragraphs < 0:
        raise ValueError(f"n_paragraphs must be an int >= 0, got {n_paragraphs!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    low, high = sentences_per_paragraph
    if not 1 <= low <= high:
        raise ValueError(f"sentences_per_paragraph must be (low, high) with "
                         f"1 <= low <= high, got {sentences_per_paragraph!r}")
    c = _Chooser(seed)
    paragraphs = [" ".join(_sentence(c) for _ in range(c.between(low, high)))
                  for _ in range(n_paragraphs)]
    return "\n\n".join(paragraphs) + "\n" if paragraphs else ""
