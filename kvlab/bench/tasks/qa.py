"""Multi-document question answering, RULER's QA tasks (Hsieh et al., 2024, arXiv:2404.06654) made offline.

RULER hides the gold paragraph(s) of a SQuAD (``qa_1``) or HotpotQA (``qa_2``) question among distractor
paragraphs. With no datasets here, the documents describe a generated fictional world (``qa_world``): ``qa_1`` is
single-hop (a person's birth town or employer), ``qa_2`` is two-hop (the person's document names the employer, the
employer's document names its headquarters town, and neither holds both). Scoring accepts the answer anywhere in
the prediction (RULER's ``string_match_part``).

The gold document the question is about goes at the requested depth, counted in documents; ``qa_2``'s second gold
document goes at a random other depth. The last distractor may be cut after a sentence so the length lands close
to the target. The name pools hold distractors for roughly 60k tokens of documents.
"""

from __future__ import annotations

from kvlab.bench.tasks.base import Draft, Request, register_task
from kvlab.bench.tasks.fit import Units, fit_to_tokens
from kvlab.bench.tasks.qa_world import Document, World

ASK = "Based on the documents above, "


class DocumentStream:
    """Distractor documents as fitting units (one per sentence) and the rendering of n units plus gold documents."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.documents: list[Document] = []
        self.first_unit: list[int] = []  # index of each document's first sentence unit

    def units(self):
        unit_index = 0
        while (document := self.world.distractor()) is not None:
            self.documents.append(document)
            self.first_unit.append(unit_index)
            for position, sentence in enumerate(document.sentences):
                unit_index += 1
                # the header's number is a placeholder for costing; render writes the real one
                yield (f"\n\nDocument 10: {document.title}\n" if position == 0 else " ") + sentence

    def render(self, n: int, gold: list[tuple[float, Document]]) -> str:
        """The first ``n`` distractor sentences as documents (the last one maybe cut short), with each gold
        document placed after ``round(depth * distractors)`` of them, all numbered from 1."""
        distractors = []
        for document, start in zip(self.documents, self.first_unit):
            if start >= n:
                break
            distractors.append(Document(document.title, document.sentences[:n - start]))
        slots: dict[int, list[Document]] = {}
        for depth, document in gold:
            slots.setdefault(round(depth * len(distractors)), []).append(document)
        ordered: list[Document] = []
        for index in range(len(distractors) + 1):
            ordered.extend(slots.get(index, ()))
            if index < len(distractors):
                ordered.append(distractors[index])
        return "\n\n".join(f"Document {number}: {document.title}\n{' '.join(document.sentences)}"
                           for number, document in enumerate(ordered, start=1))


def fitted_context(request: Request, world: World, gold: list[tuple[float, Document]], task: str) -> str:
    stream = DocumentStream(world)
    units = Units(stream.units(), request.count_tokens)
    return fit_to_tokens(lambda n: stream.render(n, gold), units, request.count_tokens, request.length_tokens,
                         task)


def _depth(request: Request) -> float:
    return 0.5 if request.depth is None else request.depth


@register_task("qa_1", "single-hop QA: a person's birth town or employer, from one document among distractors",
               metric="contains_any", max_new_tokens=32, uses_depth=True)
def qa_1(request: Request) -> Draft:
    world = World(request.rng("world"))
    person = world.new_person()
    gold = [(_depth(request), world.person_document(person))]
    if world.rng.random() < 0.5:
        question, answer = f"in which town was {person.name} born? Answer with the town name only.", \
            person.birth_town
    else:
        question, answer = f"which company does {person.name} work for? Answer with the company name only.", \
            person.employer
    return Draft(fitted_context(request, world, gold, "qa_1"), (ASK + question,), ((answer,),),
                 answer_prefix="Answer:")


@register_task("qa_2", "two-hop QA: the headquarters town of a person's employer, chaining two documents",
               metric="contains_any", max_new_tokens=32, uses_depth=True)
def qa_2(request: Request) -> Draft:
    world = World(request.rng("world"))
    company = world.new_company()
    # born elsewhere than the firm's town, so the person's document alone never holds the answer
    birth_town = world.rng.choice([town for town in world.towns if town != company.headquarters])
    person = world.new_person(birth_town=birth_town, employer=company.name)
    gold = [(_depth(request), world.person_document(person)),
            (world.rng.random(), world.company_document(company))]
    question = (f"in which town is the company that {person.name} works for headquartered? "
                f"Answer with the town name only.")
    return Draft(fitted_context(request, world, gold, "qa_2"), (ASK + question,), ((company.headquarters,),),
                 answer_prefix="Answer:")
