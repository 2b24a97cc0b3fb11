"""Word lists and value generators shared by the tasks: needle keys ("shiny-river"), numbers, UUIDs, the common
English words of ``cwe`` and the coded words of ``fwe``. Everything is drawn from a caller's ``random.Random``."""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Set as AbstractSet

ADJECTIVES = """
able acid angry amber ancient autumn bald bitter black blazing bold brave breezy brief bright broad brown bumpy
busy calm careful cheap cheerful chilly clean clever cloudy clumsy coastal cold cosmic crisp crooked curly
dancing daring dark dusty eager early eastern elegant empty faint fancy fast fierce flat fluffy foggy fragile
fresh friendly frozen gentle giant glad golden grand grassy gray greedy green hairy happy hasty heavy hidden
hollow honest humble hungry icy idle jolly keen kind lazy lively lonely loud lucky magic marble mellow merry
mighty misty modern muddy narrow neat noble noisy odd orange pale patient plain polite proud purple quick quiet
rapid rare restless rich rocky rosy rough round royal rusty sandy scarlet secret shiny short silent silky silver
simple sleepy slow smooth snowy soft solid sour spare spicy steady steep stormy strange strict sturdy sunny
swift tall tame tender thin tidy tiny tough vast violet wandering warm wavy wealthy wild windy wise witty wooden
young zealous
""".split()

NOUNS = """
acorn anchor apple arrow badger bakery balloon bamboo banjo barrel basket beacon beetle bell bicycle blanket
bottle boulder bridge bucket butter button cabin cactus camel candle canoe canyon carpet castle cedar cellar
chalk cherry chimney cliff clock cloud comet compass copper cottage crayon cricket crown crystal cupboard
curtain daisy desert dolphin dragon drum eagle elbow engine falcon feather fern ferry fiddle forest fountain
fox garden garlic glacier goose granite harbor harp hazel helmet heron hill honey horizon island ivory jacket
jungle kettle kite ladder lagoon lantern lemon library lizard locket magnet maple marble meadow melon mirror
moss mountain needle nest oak ocean orchard otter owl paddle panther parcel pebble pepper piano pillow pine
planet plum pocket pond puzzle quarry quill rabbit raft rainbow raven ribbon river robin rocket saddle salmon
satchel scarf shadow shell shovel sparrow spider spoon squirrel stable statue storm stream sunset swan teapot
temple thistle thunder tiger timber tower trumpet tulip tunnel turtle umbrella valley velvet violin volcano
wagon walnut whale whistle willow window wizard wolf yacht zebra
""".split()

VERBS = """
adapt admire allow answer arrive bake balance bless borrow bounce breathe bubble build calculate carry chase
cheer chew clap collect complain consider crawl cycle decide deliver describe discover divide drift educate
embrace encourage escape examine explain explore fasten fetch flash float flourish follow forgive gather gaze
glide govern grin guard guess hammer harvest hover hurry imagine improve invent invite juggle jump kneel knit
knock launch listen manage march measure melt mumble murmur navigate nod notice observe obtain offer operate
organize paint pause perform persuade polish pour practice pray preserve print promise protect punish question
quiver reach realize receive recognize relax remember repair replace rescue rinse roam scatter scribble search
settle shiver sketch slip smile sneeze solve sparkle squeeze stir stretch suggest surround swallow tickle tremble
trust tumble underline unfold unite vanish visit wander whisper wobble wonder worry wrestle yawn yell zoom
""".split()


def distinct_words(words: list[str]) -> list[str]:
    """Sorted unique words of which none contains another (a prediction holding "arrow" must not also match "row"
    under substring scoring)."""
    unique = sorted(set(words))
    return [w for w in unique if not any(w != other and w in other for other in unique)]


def key_words(rng: random.Random, count: int, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    """``count`` distinct adjective-noun keys like "shiny-river", none in ``exclude``."""
    keys: list[str] = []
    seen = set(exclude)
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def numbers(rng: random.Random, count: int, digits: int = 7, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    """``count`` distinct ``digits``-digit numbers (no leading zero) as strings."""
    values: list[str] = []
    seen = set(exclude)
    while len(values) < count:
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if value not in seen:
            seen.add(value)
            values.append(value)
    return values


def uuids(rng: random.Random, count: int) -> list[str]:
    """``count`` version-4 UUID strings built from the generator's bits (distinct with certainty in practice)."""
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def coded_words(rng: random.Random, count: int, length: int = 6) -> list[str]:
    """``count`` distinct random lowercase strings of ``length`` letters."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choices(string.ascii_lowercase, k=length))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def join_names(names: list[str]) -> str:
    """"a", "a and b", "a, b, and c"."""
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + ", and " + names[-1]
