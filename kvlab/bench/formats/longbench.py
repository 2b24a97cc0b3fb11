"""LongBench (v1 and LongBench-E) and LongBench v2 rows as kvlab Samples.

v1 rows hold ``input``, ``context``, ``answers``, ``all_classes``, ``dataset`` (and ``_id``, ``length``, ...).
Each dataset is scored with the metric LongBench's ``eval.py`` assigns it (``dataset2metric``), on the first
line of the prediction for trec, triviaqa, samsum and lsht as its ``scorer`` does, with the generation budgets of
its ``dataset2maxlen.json``. LongBench's prompts (``dataset2prompt.json``) wrap the context in instructions
before and after it; kvlab splits a prompt into the document (compressed) and the question (asked after), so the
instructions here are kvlab's own shorter wording around the same ``context`` and ``input``, not the official
text, and scores are comparable with each other, not with LongBench's leaderboard.

v2 rows hold ``question``, ``choice_A``..``choice_D``, ``answer`` (a letter) and ``context``; the question lists
the choices and asks for the letter (again kvlab's wording), and ``choice`` scores the extracted letter.
"""

from __future__ import annotations

from kvlab.bench.data import Row
from kvlab.bench.formats import fields
from kvlab.bench.scoring import register_labels
from kvlab.bench.tasks.base import Sample
from kvlab.errors import DataError

_QA = "Answer the question about the text above as briefly as you can, with a phrase if possible.\n\nQuestion: {input}"
_QASPER = (_QA + '\n\nIf the text does not answer it, write "unanswerable"; answer a yes/no question with "yes", '
           '"no" or "unanswerable".')
_QA_ZH = "请根据上面的文字简短回答问题，只给出答案。\n\n问题：{input}"
_SUMMARY = "Write a one-page summary of the text above."
_FEW_SHOT = "{input}"  # the context holds the worked examples; the input is the next case in their format
_RETRIEVAL = 'Which paragraph above is this abstract from?\n\n{input}\n\nAnswer with "Paragraph N".'
_RETRIEVAL_ZH = "下面这段摘要出自上面哪一段？\n\n{input}\n\n请用“段落N”的格式回答。"
_COUNT = "How many different paragraphs are there above once duplicates are removed? Answer with a number only."
_CODE = "{input}Write the next line of code."

# dataset -> (metric, max_new_tokens, question template); metric and budget as LongBench sets them.
DATASETS: dict[str, tuple[str, int, str]] = {
    "narrativeqa": ("qa_f1", 128, _QA), "qasper": ("qa_f1", 128, _QASPER),
    "multifieldqa_en": ("qa_f1", 64, _QA), "multifieldqa_zh": ("qa_f1_zh", 64, _QA_ZH),
    "hotpotqa": ("qa_f1", 32, _QA), "2wikimqa": ("qa_f1", 32, _QA), "musique": ("qa_f1", 32, _QA),
    "dureader": ("rouge_l_zh", 128, _QA_ZH), "gov_report": ("rouge_l", 512, _SUMMARY),
    "qmsum": ("rouge_l", 512, "Answer this query about the transcript above in one or more sentences.\n\n"
                              "Query: {input}"),
    "multi_news": ("rouge_l", 512, _SUMMARY), "vcsum": ("rouge_l_zh", 512, "请写一段总结，概括上面会议记录的内容。"),
    "trec": ("classification:first_line", 64, _FEW_SHOT), "triviaqa": ("qa_f1:first_line", 32, _FEW_SHOT),
    "samsum": ("rouge_l:first_line", 128, _FEW_SHOT), "lsht": ("classification:first_line", 64, _FEW_SHOT),
    "passage_count": ("count", 32, _COUNT), "passage_retrieval_en": ("retrieval", 32, _RETRIEVAL),
    "passage_retrieval_zh": ("retrieval_zh", 32, _RETRIEVAL_ZH),
    "lcc": ("code_sim", 64, _CODE), "repobench-p": ("code_sim", 64, _CODE),
}


def parse_v1(row: Row) -> Sample:
    dataset = _dataset(row)
    metric, max_new_tokens, template = DATASETS[dataset]
    question_input = fields.text(row, "input", empty_ok=True)
    if "{input}" in template and template != _CODE and not question_input.strip():
        raise DataError(f"{row.where}: 'input' must be a non-empty string for {dataset}")
    if metric.startswith("classification"):
        classes = fields.text_list(row, "all_classes")
        metric += f":labels={register_labels(dataset, classes)}"
    code_input = question_input + "\n" if question_input and not question_input.endswith("\n") else question_input
    question = template.format(input=code_input if template == _CODE else question_input)
    return Sample(id=_id(row), task=dataset, context=fields.text(row, "context"), questions=(question,),
                  answers=(fields.answers(row, "answers"),), metric=metric, length_tokens=0,
                  max_new_tokens=max_new_tokens)


def parse_v2(row: Row) -> Sample:
    choices = [fields.text(row, f"choice_{letter}") for letter in "ABCD"]
    answer = fields.text(row, "answer").strip()
    if answer not in ("A", "B", "C", "D"):
        raise DataError(f"{row.where}: 'answer' must be one of the letters A, B, C, D (got {answer!r})")
    listed = "\n".join(f"({letter}) {choice}" for letter, choice in zip("ABCD", choices))
    question = (f"{fields.text(row, 'question')}\n\nChoices:\n{listed}\n\n"
                f'Answer with "The correct answer is (X)", where X is the letter of the right choice.')
    return Sample(id=_id(row), task="longbench_v2", context=fields.text(row, "context"), questions=(question,),
                  answers=((answer,),), metric="choice", length_tokens=0, max_new_tokens=32)


def _dataset(row: Row) -> str:
    dataset = row.values.get("dataset")
    if dataset is None:  # LongBench files are named after their dataset ("qasper.jsonl", "qasper_e.jsonl")
        dataset = row.source[:-2] if row.source.endswith("_e") else row.source
    if dataset not in DATASETS:
        raise DataError(f"{row.where}: 'dataset' must be a LongBench dataset ({', '.join(DATASETS)}); "
                        f"got {dataset!r}")
    return dataset


def _id(row: Row) -> str:
    value = row.values.get("_id")
    return value if isinstance(value, str) and value.strip() else f"{row.source}/{row.number}"
