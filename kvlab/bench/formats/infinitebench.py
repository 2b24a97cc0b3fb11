"""InfiniteBench and SCBench rows as kvlab Samples.

InfiniteBench rows (its released ``<task>.jsonl`` files) hold ``context``, ``input`` (the question), ``answer``
(a string, number or list) and ``options`` (multiple choice); the task is the file's name. Metrics follow its
``src/compute_scores.py`` for the tasks whose scoring is self-contained; ``longbook_sum_eng`` (ROUGE-Lsum of the
``evaluate`` library), ``math_calc`` (model-specific) and ``code_run`` / ``code_debug`` (fields and files outside
the row) are refused with a message.

SCBench rows (``scbench_<task>.jsonl``) hold one ``context`` and ``multi_turns``: a list of ``{"input",
"answer", "options"?}``, asked in order over the shared context (``--mode multi-turn`` / ``multi-request``).
Metrics follow ``scbench/compute_scores.py``, which maps most tasks onto InfiniteBench's scorers with its own
variants (kv and QA by substring). ``scbench_vt`` uses RULER's ``string_match_all`` there, rounded to two
decimals per answer; kvlab keeps the unrounded share. Summary and repo-QA tasks are refused.

The prompts are kvlab's own short wording: the document is the context and the question follows it.
"""

from __future__ import annotations

from typing import Any

from kvlab.bench.data import Row
from kvlab.bench.formats import fields
from kvlab.bench.tasks.base import Sample
from kvlab.errors import DataError

# task -> (metric, max_new_tokens): budgets are the benchmarks' DATA_NAME_TO_MAX_NEW_TOKENS
INFINITEBENCH = {
    "passkey": ("first_integer", 6), "number_string": ("first_integer", 12), "kv_retrieval": ("kv_words", 50),
    "longbook_choice_eng": ("option", 40), "longbook_qa_eng": ("qa_f1", 40),
    "longbook_qa_chn": ("qa_f1_zh_chars", 40), "longdialogue_qa_eng": ("name_words", 40),
    "math_find": ("math_find", 3),
}
SCBENCH = {
    "scbench_kv": ("kv_contains", 150), "scbench_kv_hard": ("kv_contains", 150),
    "scbench_prefix_suffix": ("kv_contains", 150), "scbench_hashhop": ("kv_contains", 150),
    "scbench_passkey": ("first_integer", 15), "scbench_vt": ("contains_all", 30),
    "scbench_many_shot": ("name_contains", 10), "scbench_qa_eng": ("name_contains", 40),
    "scbench_qa_chn": ("qa_f1_zh_chars", 40), "scbench_choice_eng": ("option", 40), "scbench_mf": ("math_find", 5),
}
_CHOOSE = "Answer with the letter of the right option only."


def parse_infinitebench(row: Row) -> Sample:
    task = _task(row, INFINITEBENCH, "InfiniteBench")
    metric, max_new_tokens = INFINITEBENCH[task]
    question, answers = _turn(row, row.values, metric)
    sample_id = row.values.get("id")
    return Sample(id=f"{task}/{sample_id if isinstance(sample_id, int | str) else row.number}", task=task,
                  context=fields.text(row, "context"), questions=(question,), answers=(answers,), metric=metric,
                  length_tokens=0, max_new_tokens=max_new_tokens)


def parse_scbench(row: Row) -> Sample:
    task = _task(row, SCBENCH, "SCBench")
    metric, max_new_tokens = SCBENCH[task]
    turns = row.values.get("multi_turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, dict) for turn in turns):
        raise DataError(f"{row.where}: 'multi_turns' must be a non-empty list of objects with 'input' and 'answer'")
    asked = [_turn(row, turn, metric, f"multi_turns[{index}]") for index, turn in enumerate(turns)]
    sample_id = row.values.get("id")
    return Sample(id=f"{task}/{sample_id if isinstance(sample_id, int | str) else row.number}", task=task,
                  context=fields.text(row, "context"), questions=tuple(question for question, _ in asked),
                  answers=tuple(answers for _, answers in asked), metric=metric, length_tokens=0,
                  max_new_tokens=max_new_tokens)


def _turn(row: Row, values: dict[str, Any], metric: str, part: str = "") -> tuple[str, tuple[str, ...]]:
    """(question, answers) of one question; a multiple-choice one lists its options and is scored against
    (option text, letter), the label InfiniteBench builds from the options."""
    view = Row(values, f"{row.where}: {part}" if part else row.where, row.source, row.number, row.path)
    question = fields.text(view, "input")
    answers = fields.answers(view, "answer")
    if metric != "option":
        return question, answers
    if "options" not in values:
        raise DataError(f"{view.where}: missing 'options' (the four choices of a multiple-choice question)")
    options = fields.text_list(view, "options", 4)
    text, letter = fields.letter_and_text(view, "answer", answers[0], options)
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))
    return f"{question}\n\n{listed}\n\n{_CHOOSE}", (text, letter)


def _task(row: Row, table: dict[str, tuple[str, int]], benchmark: str) -> str:
    if row.source in table:
        return row.source
    refused = {"longbook_sum_eng", "math_calc", "code_run", "code_debug", "scbench_summary", "scbench_repoqa",
               "scbench_summary_with_needles", "scbench_repoqa_and_kv", "scbench_kv_compressible"}
    reason = "its scoring is not supported by kvlab" if row.source in refused else "the task is unknown"
    raise DataError(f"{row.where}: {benchmark} task {row.source!r}: {reason}; name the file after a supported "
                    f"task ({', '.join(table)})")
