"""`animal-stories`: generated stories of about 150-250 words about a child and a pet, one token per word.

The word-preference experiment of the paper (GPT-Neo on TinyStories, prefer word B where the model predicts
word A, A and B animals) needs documents long enough to hold a budget of about 8% of their tokens, recurring
characters, and a family of words whose frequencies differ, so that the trained model prefers some of them
strongly and others hardly. Each story has a child (a name with its pronouns), a pet drawn from ANIMALS by
ANIMAL_WEIGHTS (the commonest is drawn about 40 times as often as the rarest), mentioned 8-15 times, each
animal with its own sound and its usual food, and in about half of the stories a friend with a second
animal. Sentences are drawn from a pool, so a story is a short episode, not a fixed template; nothing is
downloaded and everything follows from the seed.

Where the pet is first named ("tom had a little ___") the model can only go by how often each animal is a
pet; at every later mention it copies the story's animal, and the animal's sound and food follow from it.
"""

from __future__ import annotations

import re

import numpy as np

from ..data import DatasetSplit
from ..errors import DataError
from ..registry import DATASETS
from .data import TextDataset, WordVocabulary

# The animal family, commonest first; weights are the chance of being a story's pet (and the friend's).
ANIMALS = ("cat", "dog", "bird", "rabbit", "duck", "fish", "horse", "frog", "mouse", "bear", "fox", "owl")
ANIMAL_WEIGHTS = (30.0, 22.0, 15.0, 11.0, 8.0, 6.0, 4.5, 3.5, 2.5, 1.8, 1.2, 0.8)
SOUNDS = dict(zip(ANIMALS, ("purred", "barked", "sang", "hopped", "quacked", "splashed", "neighed", "croaked",
                            "squeaked", "growled", "howled", "hooted")))
FOODS = dict(zip(ANIMALS, ("milk", "bones", "seeds", "carrots", "bread", "flakes", "hay", "flies", "cheese",
                           "honey", "berries", "mice")))
NAMES = {"tom": "he", "ben": "he", "max": "he", "sam": "he", "jack": "he",
         "anna": "she", "lily": "she", "mia": "she", "lucy": "she", "emma": "she"}
NAME_WEIGHTS = (5, 3, 3, 2, 2, 5, 3, 3, 2, 2)
PRONOUNS = {"he": ("he", "his", "him", "boy"), "she": ("she", "her", "her", "girl")}
FILLERS = {
    "place": ("park", "garden", "forest", "river", "field", "beach", "farm", "hill"),
    "thing": ("ball", "kite", "box", "book", "hat", "stick", "shoe", "cup"),
    "color": ("red", "blue", "green", "yellow", "white", "black", "pink", "brown"),
    "mood": ("happy", "sad", "tired", "scared", "excited", "sleepy"),
    "time": ("morning", "evening", "afternoon"),
    "size": ("big", "small", "little", "old", "young", "fluffy"),
    "sky": ("blue", "grey", "bright"),
}

INTROS = (
    "once upon a time , there was a {kind} named {name} . {name} had a {size} {pet} .",
    "{name} was a {kind} who lived in a {color} house . {pos} best friend was a {size} {pet} .",
    "there once was a {size} {pet} who lived with a {kind} named {name} .",
)
# (template, weight); {pet2}/{sound2}/{food2} sentences are drawn only once the friend's animal is introduced.
MIDDLE = (
    ("every {time} , {name} played with the {pet} .", 3),
    ("the {pet} {sound} at the {thing} .", 3),
    ("{name} gave the {pet} some {food} .", 3),
    ("the {pet} liked to sleep in the {place} .", 2),
    ("one day , {name} and the {pet} went to the {place} .", 3),
    ("the {pet} {sound} and {name} laughed .", 2),
    ("{name} saw a {color} {thing} near the {place} .", 2),
    ("{pron} picked up the {thing} and showed it to the {pet} .", 2),
    ("the sun was warm and the sky was {sky} .", 1),
    ("the {pet} was very {mood} .", 2),
    ("{name} felt {mood} .", 1),
    ("it started to rain , so they went home .", 1),
    ("{name} hugged the {pet} .", 2),
    ("the {pet} ate all the {food} .", 2),
    ("{name} said , \" good {pet} ! \"", 2),
    ("{pron} looked for the {pet} everywhere .", 1),
    ("the {pet} was hiding under the {thing} .", 2),
    ("{name} and the {pet} ran up the hill .", 1),
    ("the {pet} and the {pet2} played together .", 3),
    ("the {pet2} {sound2} and ran to {friend} .", 2),
    ("{friend} gave the {pet2} some {food2} .", 2),
    ("{friend} laughed and said , \" my {pet2} likes your {pet} . \"", 1),
)
FRIEND = "{name} met {friend} at the {place} . {friend} had a {size2} {pet2} ."
ENDINGS = (
    "at night , the {pet} slept next to {name} . the end .",
    "{name} and the {pet} went to bed . they were {mood} . the end .",
    "{name} loved {pos} {pet} very much . the end .",
)
MAX_LENGTH = 256


def animal_stories_vocabulary() -> WordVocabulary:
    words: set[str] = set()
    for text in (*INTROS, *(t for t, _ in MIDDLE), FRIEND, *ENDINGS):
        words |= set(re.sub(r"\{\w+\}", " ", text).split())
    words |= set(ANIMALS) | set(SOUNDS.values()) | set(FOODS.values()) | set(NAMES)
    words |= {w for forms in PRONOUNS.values() for w in forms}
    words |= {w for fillers in FILLERS.values() for w in fillers}
    return WordVocabulary(("<pad>", *sorted(words)))


def _story(rng: np.random.Generator, min_sentences: int, max_sentences: int) -> str:
    """One story: its cast drawn first (the child, the friend, the pet, the friend's animal), then its sentences."""
    p_animal = np.asarray(ANIMAL_WEIGHTS) / sum(ANIMAL_WEIGHTS)
    names = list(NAMES)
    name_p = np.asarray(NAME_WEIGHTS, float) / sum(NAME_WEIGHTS)

    def pick(options, p=None):
        return options[rng.choice(len(options), p=p)]

    name = pick(names, name_p)
    friend = pick([n for n in names if n != name])
    pet = pick(ANIMALS, p_animal)
    others = [a for a in ANIMALS if a != pet]
    p_others = p_animal[[ANIMALS.index(a) for a in others]]
    pet2 = pick(others, p_others / p_others.sum())
    pron, pos, _, kind = PRONOUNS[NAMES[name]]
    fixed = {"name": name, "friend": friend, "pet": pet, "pet2": pet2, "sound": SOUNDS[pet], "sound2": SOUNDS[pet2],
             "pron": pron, "pos": pos, "kind": kind}

    def fill(template: str) -> str:
        values = dict(fixed)
        for key in re.findall(r"\{(\w+)\}", template):
            if key in values:
                continue
            base = key.rstrip("2")
            if base == "food":  # the animal's usual food, sometimes another
                animal = pet2 if key.endswith("2") else pet
                values[key] = FOODS[animal] if rng.random() < 0.8 else pick(list(FOODS.values()))
            else:
                values[key] = pick(FILLERS[base])
        return template.format(**values)

    sentences = [fill(pick(INTROS))]
    n = int(rng.integers(min_sentences, max_sentences + 1))
    has_friend = rng.random() < 0.5
    friend_at = int(rng.integers(2, max(3, n // 2))) if has_friend else -1
    introduced = False
    for i in range(n):
        if i == friend_at:
            sentences.append(fill(FRIEND))
            introduced = True
            continue
        pool = [(t, w) for t, w in MIDDLE if introduced or "2}" not in t]
        weights = np.asarray([w for _, w in pool], float)
        sentences.append(fill(pool[rng.choice(len(pool), p=weights / weights.sum())][0]))
    sentences.append(fill(pick(ENDINGS)))
    return " ".join(sentences)


@DATASETS.register("animal-stories")
def animal_stories(n_train: int = 2000, n_test: int = 400, seed: int = 0, min_sentences: int = 16,
                   max_sentences: int = 24) -> DatasetSplit:
    """Stories of about 150-250 words about a child, a pet animal and sometimes a friend's animal (see the module)."""
    if n_train < 1 or n_test < 1:
        raise DataError("animal-stories: n_train and n_test must be positive")
    if not 1 <= min_sentences <= max_sentences:
        raise DataError("animal-stories: need 1 <= min_sentences <= max_sentences")
    vocab, rng = animal_stories_vocabulary(), np.random.default_rng(seed)
    train = [_story(rng, min_sentences, max_sentences) for _ in range(n_train)]
    test = [_story(rng, min_sentences, max_sentences) for _ in range(n_test)]
    return DatasetSplit(TextDataset.from_texts(train, vocab, MAX_LENGTH, "animal-stories-train"),
                        TextDataset.from_texts(test, vocab, MAX_LENGTH, "animal-stories-test"))


animal_stories.kind = "text"  # what `bench` dispatches on
