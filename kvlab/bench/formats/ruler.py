"""RULER's generated files (``scripts/data/prepare.py``): ``<task>/<subset>.jsonl`` rows with ``input`` (the whole
prompt, the answer prefix cut off), ``outputs`` (the answers), ``answer_prefix`` and ``index``.

The task comes from the folder the file sits in, as RULER names it (``niah_single_1``, ``vt``, ``cwe``, ``fwe``,
``qa_1``, ...; a file named after its task also works). Scoring is RULER's: ``string_match_part`` for QA tasks,
``string_match_all`` for the rest; generation budgets are RULER's ``tokens_to_generate``. kvlab needs the
document apart from the question, so ``input`` is cut before its last "Question:" (vt, cwe, fwe, qa) or, failing
that, its last line (niah). Generate with RULER's ``base`` model template: a chat template inside ``input``
would end up in the question.
"""

from __future__ import annotations

from kvlab.bench.data import Row
from kvlab.bench.formats import fields
from kvlab.bench.tasks.base import Sample
from kvlab.errors import DataError

# task family -> (metric, tokens_to_generate), from RULER's synthetic task constants
FAMILIES = {"niah": ("contains_all", 128), "vt": ("contains_all", 30), "cwe": ("contains_all", 120),
            "fwe": ("contains_all", 50), "qa": ("contains_any", 32)}


def family_of(name: str) -> str | None:
    return next((family for family in FAMILIES if name == family or name.startswith(family + "_")), None)


def parse(row: Row) -> Sample:
    task = _task(row)
    metric, max_new_tokens = FAMILIES[family_of(task) or ""]
    context, question = split_input(row, fields.text(row, "input"))
    return Sample(id=f"{task}/{row.number}", task=task, context=context, questions=(question,),
                  answers=(fields.answers(row, "outputs"),), metric=metric, length_tokens=0,
                  max_new_tokens=max_new_tokens, answer_prefix=fields.optional_text(row, "answer_prefix").strip())


def split_input(row: Row, text: str) -> tuple[str, str]:
    cut = text.rfind("Question:")
    if cut > 0:
        context, question = text[:cut], text[cut + len("Question:"):]
    else:
        context, _, question = text.rstrip().rpartition("\n")
    if not context.strip() or not question.strip():
        raise DataError(f"{row.where}: 'input' must end with the question, after a 'Question:' or on its own last "
                        f"line, as RULER's templates write it")
    return context.rstrip(), question.strip()


def _task(row: Row) -> str:
    candidates = [row.path.parent.name, row.path.stem] if row.path is not None else [row.source]
    for name in candidates:
        if family_of(name):
            return name
    raise DataError(f"{row.where}: cannot tell the RULER task from the path; keep the file in a folder named "
                    f"after its task, as RULER writes it (e.g. niah_single_1/validation.jsonl)")
