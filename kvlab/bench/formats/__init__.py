"""Benchmark data in published formats: ``kvlab bench --data [FORMAT:]SOURCE``.

SOURCE is a JSONL file, or ``hub:OWNER/NAME[/CONFIG][@SPLIT]`` for a dataset on a hub, read through the optional
``datasets`` package (imported only then). Without FORMAT the format is told from the first row's fields. Every
format turns its rows into the same ``Sample``s the generated tasks give, so modes, grids and reports are shared;
each module's docstring says which official script its metrics follow and where its prompts differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvlab.bench import data
from kvlab.bench.data import Row
from kvlab.bench.formats import infinitebench, longbench, ruler
from kvlab.bench.scoring import METRIC_HELP, parse_metric
from kvlab.bench.tasks.base import Sample
from kvlab.errors import DataError, KvlabError


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    fields: str                  # the fields it reads
    metrics: str                 # how its samples are scored
    parse: Callable[[Row], Sample]
    detect: Callable[[dict], bool]
    hub_split: str | None        # the split read when a hub source names none; None: no hub source


FORMATS = {f.name: f for f in (
    Format("kvlab", "kvlab's own cases (see kvlab.bench.data)",
           "context, question | questions, answers; optional id, metric, max_new_tokens, answer_prefix",
           "the row's 'metric' (default contains_any); any kvlab metric",
           data.parse_row, lambda row: bool({"question", "questions"} & set(row))
           or ({"context", "answers"} <= set(row) and "input" not in row), "train"),
    Format("longbench", "LongBench v1 / LongBench-E, 21 datasets (THUDM/LongBench)",
           "input, context, answers, all_classes, dataset (or the file name), _id",
           "per dataset as LongBench's eval.py: qa_f1, qa_f1_zh, rouge_l, rouge_l_zh, classification, "
           "retrieval, retrieval_zh, count, code_sim (first line only for trec, triviaqa, samsum, lsht)",
           longbench.parse_v1, lambda row: "all_classes" in row or {"dataset", "answers", "input"} <= set(row),
           "test"),
    Format("longbench2", "LongBench v2 multiple choice (THUDM/LongBench-v2)",
           "question, choice_A, choice_B, choice_C, choice_D, answer (a letter), context, _id",
           "choice: the letter extracted as LongBench v2 does ('The correct answer is (X)'), or a leading letter",
           longbench.parse_v2, lambda row: "choice_A" in row, "train"),
    Format("ruler", "RULER's generated task files (NVIDIA/RULER, scripts/data/prepare.py)",
           "input, outputs, answer_prefix; the task from the folder name (niah_*, vt, cwe, fwe, qa_*)",
           "RULER's string_match_all (contains_all), string_match_part (contains_any) for qa",
           ruler.parse, lambda row: "outputs" in row and "input" in row, None),
    Format("infinitebench", "InfiniteBench tasks (OpenBMB/InfiniteBench); the task from the file name",
           "context, input, answer, options (choice tasks), id",
           "per task as its compute_scores.py: " + ", ".join(
               f"{task}={metric}" for task, (metric, _) in infinitebench.INFINITEBENCH.items()),
           infinitebench.parse_infinitebench, lambda row: {"context", "input", "answer"} <= set(row), "test"),
    Format("scbench", "SCBench multi-turn sessions (microsoft/SCBench); the task from the file name",
           "context, multi_turns[].input, multi_turns[].answer, multi_turns[].options, id",
           "per task as its compute_scores.py: " + ", ".join(
               f"{task}={metric}" for task, (metric, _) in infinitebench.SCBENCH.items()),
           infinitebench.parse_scbench, lambda row: "multi_turns" in row, "test"),
)}
# detection order: the most specific fields first
_DETECT_ORDER = ("scbench", "longbench2", "longbench", "ruler", "kvlab", "infinitebench")


def load_data(spec: str) -> list[Sample]:
    """Samples of ``[FORMAT:]SOURCE`` (see the module docstring); every problem is one DataError line."""
    name, _, rest = spec.partition(":")
    fmt = FORMATS.get(name) if rest else None
    source = rest if fmt else spec
    rows = _hub_rows(source, fmt) if source.startswith("hub:") else data.read_jsonl_rows(source)
    fmt = fmt or detect(rows[0])
    samples = [fmt.parse(row) for row in rows]
    data.check_unique_ids(samples, rows)
    checked: set[str] = set()
    for sample, row in zip(samples, rows):  # a metric that cannot run (jieba missing) stops before the model loads
        if sample.metric not in checked:
            try:
                parse_metric(sample.metric)
            except KvlabError as error:
                raise DataError(f"{row.where}: {error}") from None
            checked.add(sample.metric)
    return samples


def detect(row: Row) -> Format:
    for name in _DETECT_ORDER:
        if FORMATS[name].detect(row.values):
            return FORMATS[name]
    raise DataError(f"{row.where}: cannot tell the format from the fields {', '.join(sorted(row.values)) or 'none'}; "
                    f"name it, e.g. --data longbench:FILE (formats: {', '.join(FORMATS)}; see --list-formats)")


def _hub_rows(source: str, fmt: Format | None) -> list[Row]:
    """Rows of ``hub:OWNER/NAME[/CONFIG][@SPLIT]`` through ``datasets.load_dataset``; the CONFIG (else the
    SPLIT) names the task, as a file's name does."""
    if fmt is None:
        raise DataError(f"--data {source}: name the format of a hub dataset, e.g. --data longbench:{source} "
                        f"(formats: {', '.join(FORMATS)})")
    if fmt.hub_split is None:
        raise DataError(f"--data {fmt.name}:{source}: {fmt.name} data is generated locally, not read from a hub; "
                        f"pass the generated JSONL file")
    name, _, split = source[len("hub:"):].partition("@")
    parts = name.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"--data {fmt.name}:{source}: write hub:OWNER/NAME[/CONFIG][@SPLIT], "
                        f"e.g. hub:THUDM/LongBench/qasper")
    try:
        import datasets
    except ImportError:
        raise DataError("reading a dataset from a hub needs the datasets package: pip install datasets") from None
    config = parts[2] if len(parts) == 3 else None
    split = split or fmt.hub_split
    try:
        table = datasets.load_dataset("/".join(parts[:2]), config, split=split)
    except Exception as error:  # the library's own errors vary by version; the message is what matters
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"--data {fmt.name}:{source}: could not load it ({first_line})") from None
    task = config or split
    rows = [Row(dict(values), f"{source} row {index}", task, index) for index, values in enumerate(table, start=1)]
    if not rows:
        raise DataError(f"--data {fmt.name}:{source}: the dataset has no rows")
    return rows


def list_formats_text() -> str:
    blocks = []
    for fmt in FORMATS.values():
        hub = f"hub: --data {fmt.name}:hub:OWNER/NAME[/CONFIG][@SPLIT] (split {fmt.hub_split})" \
            if fmt.hub_split else "hub: no (local files only)"
        blocks.append(f"{fmt.name}: {fmt.description}\n  fields:  {fmt.fields}\n  metrics: {fmt.metrics}\n  {hub}")
    width = max(len(name) for name in METRIC_HELP)
    metrics = "\n".join(f"  {name:<{width}}  {text}" for name, text in METRIC_HELP.items())
    return "\n".join(blocks) + ("\n\n--data FILE tells the format from the first row's fields; "
                                f"--data FORMAT:FILE names it.\n\nmetrics:\n{metrics}")
