"""A fictional world for the QA tasks: people, companies and towns with attributes, written as short documents.

Every name is drawn once per sample (no two documents describe the same entity), and a person's document names
only their birth town and their employer, so a question's answer sits in exactly the documents the task intends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_NAMES = """
Ada Alba Anselm Astrid Basil Beatrix Bruno Calla Cassius Celeste Clement Dagny Dorian Edda Elio Elspeth Emrys
Fenna Florian Greta Gideon Hester Ilse Ingram Isolde Jarvis Jonah Juno Kasimir Leda Linus Lorna Magnus Maren
Milo Nadia Niamh Oskar Orla Percival Petra Quentin Rosalind Rufus Saskia Silas Solveig Tobias Ursula Viggo
Wilma Xavier Yara Yorick Zelda Zeno
""".split()
LAST_NAMES = """
Abernathy Ashdown Bellweather Blackwood Brannigan Calloway Castellan Corrigan Dunmore Everleigh Fairbanks
Falconer Garroway Greenhalgh Halloran Hawthorne Iverson Jessop Kilbride Lachlan Larkspur Lockhart Marchetti
Merriweather Nightingale Northcott Oakenfold Pendleton Quimby Ravenscroft Redgrave Rutherford Salisbury Sinclair
Stanhope Thackeray Trevelyan Underhill Vance Wainwright Whitlock Wolcott Yardley Zabini
""".split()
TOWN_STARTS = "Amber Birch Bram Cold Dun Elder Fern Glen Hart Holly Iron Juniper Kings Lark Mere Nettle Otter " \
              "Pine Quarry Raven Salt Thorn Umber Vale Wren Yew".split()
TOWN_ENDS = "bury ford haven field mouth brook wick dale port stead combe moor".split()
COMPANY_STARTS = "Albatross Beacon Bluefin Cobalt Copperleaf Driftwood Ember Falconer Granite Harbourline " \
                 "Ironbark Juniper Keystone Lodestar Meridian Northwind Onyx Pinnacle Quicksilver Redwood " \
                 "Saltmarsh Silverline Tidewater Umbra Vantage Westbrook Zephyr".split()
INDUSTRIES = {  # industry word in the company name -> (what the firm is, what it is known for)
    "Shipping": ("shipping", "its fleet of coastal freighters"), "Textiles": ("textile", "its woollen blankets"),
    "Robotics": ("robotics", "its warehouse robots"), "Foods": ("food", "its tinned soups"),
    "Instruments": ("instrument-making", "its barometers"), "Press": ("publishing", "its pocket atlases"),
    "Energy": ("energy", "its small wind turbines"), "Ceramics": ("ceramics", "its glazed tiles"),
    "Optics": ("optics", "its binoculars"), "Bicycles": ("bicycle", "its folding bicycles"),
}
PROFESSIONS = ["surveyor", "pharmacist", "carpenter", "accountant", "geologist", "translator", "electrician",
               "veterinarian", "librarian", "architect", "pilot", "chemist"]
HOBBIES = ["restoring old clocks", "sailing on the lake", "growing rare orchids", "playing the cello",
           "hiking in the hills", "baking bread", "collecting stamps", "painting landscapes", "keeping bees"]
RIVERS = ["Aske", "Brennan", "Colde", "Dorran", "Elver", "Fessing", "Garrow", "Hollin"]
FEATURES = ["its stone bridge", "a weekly cheese market", "an old lighthouse", "its spring fair",
            "a ruined abbey", "its salt marshes", "a long pier", "a famous rose garden"]


def with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass(frozen=True)
class Document:
    title: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class Person:
    name: str
    birth_town: str
    employer: str


@dataclass(frozen=True)
class Company:
    name: str
    headquarters: str


class World:
    """Draws distinct entities from one ``random.Random`` and writes their documents."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
        self._companies = [f"{start} {industry}" for start in COMPANY_STARTS for industry in INDUSTRIES]
        self._towns = [start + end for start in TOWN_STARTS for end in TOWN_ENDS]
        for pool in (self._names, self._companies, self._towns):
            rng.shuffle(pool)
        self.towns = [self._towns.pop() for _ in range(40)]  # places that people and firms refer to
        self.employers = [self._companies.pop() for _ in range(20)]  # firms that distractor people work for
        self._undescribed = list(self.employers)  # employers whose own document has not been written yet

    def new_person(self, birth_town: str | None = None, employer: str | None = None) -> Person:
        return Person(self._names.pop(), birth_town or self.rng.choice(self.towns),
                      employer or self.rng.choice(self.employers))

    def new_company(self, headquarters: str | None = None) -> Company:
        return Company(self._companies.pop(), headquarters or self.rng.choice(self.towns))

    def person_document(self, person: Person) -> Document:
        r, first = self.rng, person.name.split()[0]
        return Document(person.name, (
            f"{person.name} was born in {person.birth_town} in {r.randint(1950, 2000)}.",
            f"{first} trained as {with_article(r.choice(PROFESSIONS))} and has worked for {person.employer} since "
            f"{r.randint(2001, 2023)}.",
            f"Friends say that {first} spends most weekends {r.choice(HOBBIES)}.",
        ))

    def company_document(self, company: Company) -> Document:
        r = self.rng
        kind, known_for = INDUSTRIES[company.name.split()[-1]]
        return Document(company.name, (
            f"{company.name} is {with_article(kind)} firm founded in {r.randint(1890, 2015)}.",
            f"Its headquarters are in {company.headquarters}, where it employs about {r.randint(3, 90) * 10} people.",
            f"The firm is best known for {known_for}.",
        ))

    def town_document(self) -> Document:
        r, town = self.rng, self._towns.pop()
        return Document(town, (
            f"{town} is a small town on the River {r.choice(RIVERS)}.",
            f"About {r.randint(2, 60) * 500} people live there, and it is known for {r.choice(FEATURES)}.",
        ))

    def distractor(self) -> Document | None:
        """A document about a new person, firm or town; None once the name pools run out."""
        try:
            kind = self.rng.choice(("person", "person", "company", "town"))
            if kind == "person":
                return self.person_document(self.new_person())
            if kind == "town":
                return self.town_document()
            if self._undescribed and self.rng.random() < 0.5:  # some distractor people's employers get documents
                return self.company_document(Company(self._undescribed.pop(), self.rng.choice(self.towns)))
            return self.company_document(self.new_company())
        except IndexError:
            return None
