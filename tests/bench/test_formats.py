"""Published benchmark formats: each loads from a small file written in it, is scored by its official formula,
reports a malformed row as one line naming the file, line and field, and reads a hub through `datasets`."""

from __future__ import annotations

import json
import sys
import types

import pytest

from kvlab.bench.formats import FORMATS, load_data
from kvlab.bench.scoring import score
from kvlab.bench.session import BenchRequest, run_bench
from kvlab.cli import main
from kvlab.errors import DataError


def write(path, *rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows)
                    + "\n", encoding="utf-8")
    return path


def longbench_row(dataset, answers, **extra):
    row = {"input": "Who wrote the logbook?", "context": "The keeper, Mara Voss, wrote the logbook. " * 4,
           "answers": answers, "length": 40, "dataset": dataset, "language": "en", "all_classes": None,
           "_id": f"id-{dataset}"}
    return {**row, **extra}


TREC_CLASSES = ["location", "other location", "entity", "description"]
LONGBENCH_ROWS = [
    longbench_row("hotpotqa", ["Mara Voss"]),
    longbench_row("gov_report", ["the cat was on the mat"], input=""),
    longbench_row("trec", ["other location"], input="Question: Where is it?\nType:", all_classes=TREC_CLASSES),
    longbench_row("lcc", ["x = foo(2)"], input=""),
    longbench_row("passage_retrieval_en", ["Paragraph 12"]),
    longbench_row("passage_count", ["7"]),
    longbench_row("multi_news", ["a b"], input=""),
]


# (dataset, prediction, expected) — expected values worked out by hand from LongBench's metrics.py formulas:
LONGBENCH_CASES = [
    # qa_f1: normalized words "the voss mara wrote it" -> "voss mara wrote it" (4) vs "mara voss" (2): P=1/2,
    # R=1, F1 = 2*(1/2)/(3/2) = 2/3 (word order does not matter, articles and punctuation are dropped)
    ("hotpotqa", "The Voss, Mara wrote it!", 2 / 3),
    # rouge_l: sentences "the cat sat on the mat" / "it was happy" vs "the cat was on the mat"; LCS word sets
    # {the, cat, on, mat} and {was} pool to 5 words; 5 distinct reference words, 8 distinct prediction words:
    # R=1, P=5/8, F = 2PR/(P+R+1e-8)
    ("gov_report", "the cat sat on the mat. it was happy", 2 * 0.625 / (1.625 + 1e-8)),
    # the rouge package's tie-break picks "b" for ("a b", "b a") and the second sentence adds "a": P=R=1
    ("multi_news", "b a. a", None),
    # classification on the first line only: "location" is dropped as a part of "other location" -> 1/1
    ("trec", "other location\nentity", 1.0),
    # the first line names "entity" and "location", neither the truth
    ("trec", "entity or location\nother location", 0.0),
    # code_sim: first line without ` # // is "x = foo(1)"; 9 common characters of 10 and 10: 2*9/20 = 0.90
    ("lcc", "```python\n# the next line\nx = foo(1)\n", 0.9),
    # retrieval: numbers 12 and 3, one of them the paragraph: 1/2
    ("passage_retrieval_en", "Paragraph 12, or maybe paragraph 3", 0.5),
    # count: numbers 7 and 10, one right: 1/2
    ("passage_count", "There are 7 unique paragraphs out of 10", 0.5),
]


@pytest.fixture()
def longbench_file(tmp_path):
    return write(tmp_path / "longbench.jsonl", *LONGBENCH_ROWS)


def test_longbench_rows_load_with_the_official_metric_and_budget(longbench_file):
    samples = {sample.task: sample for sample in load_data(str(longbench_file))}  # told from the fields
    assert list(samples) == [row["dataset"] for row in LONGBENCH_ROWS]
    assert samples["hotpotqa"].id == "id-hotpotqa" and samples["hotpotqa"].answers == (("Mara Voss",),)
    assert "Who wrote the logbook?" in samples["hotpotqa"].questions[0]
    assert samples["hotpotqa"].context == LONGBENCH_ROWS[0]["context"]
    assert [(samples[name].metric.split(":labels=")[0], samples[name].max_new_tokens) for name in samples] == [
        ("qa_f1", 32), ("rouge_l", 512), ("classification:first_line", 64), ("code_sim", 64), ("retrieval", 32),
        ("count", 32), ("rouge_l", 512)]


@pytest.mark.parametrize("dataset, prediction, expected", LONGBENCH_CASES,
                         ids=[f"{d}-{i}" for i, (d, _, _) in enumerate(LONGBENCH_CASES)])
def test_loaded_longbench_rows_score_as_the_official_formulas(longbench_file, dataset, prediction, expected):
    sample = next(s for s in load_data(f"longbench:{longbench_file}") if s.task == dataset)
    if expected is None:
        expected = 2 * 1.0 * 1.0 / (2.0 + 1e-8)
    assert score(prediction, sample.answers[0], sample.metric) == pytest.approx(expected, abs=1e-9)


def test_longbench_takes_the_best_answer_and_rounds_code_similarity_to_a_percent(tmp_path):
    path = write(tmp_path / "qa.jsonl", longbench_row("narrativeqa", ["a red fox", "fox"]),
                 longbench_row("repobench-p", ["abd"], input="import os\n"))
    qa, code = load_data(str(path))
    assert score("the fox", qa.answers[0], qa.metric) == 1.0  # "fox" alone matches exactly
    assert code.questions[0].startswith("import os\n")
    assert score("abc", code.answers[0], code.metric) == 0.67  # 2*2/6 = 0.6667 -> 67%


def test_longbench_chinese_metrics_need_jieba_and_use_its_words(tmp_path, monkeypatch):
    path = write(tmp_path / "zh.jsonl", longbench_row("multifieldqa_zh", ["北京"], input="首都是哪里？"))
    monkeypatch.setitem(sys.modules, "jieba", None)
    with pytest.raises(DataError, match=r"line 1: .*pip install jieba"):
        load_data(str(path))
    fake = types.ModuleType("jieba")
    fake.cut = lambda text, cut_all=False: text.split("|")  # a stand-in segmenter: words are "|"-separated
    monkeypatch.setitem(sys.modules, "jieba", fake)
    (sample,) = load_data(str(path))
    # words 北京 / 是 / 首都。 -> normalized 北京, 是, 首都 vs 北京: P=1/3, R=1, F1 = 1/2
    assert score("北京|是|首都。", sample.answers[0], sample.metric) == pytest.approx(0.5)


def test_longbench_v2_scores_the_extracted_letter(tmp_path):
    row = {"_id": "q1", "domain": "Single-Document QA", "difficulty": "easy", "length": "short",
           "question": "Which boat left first?", "choice_A": "The Heron", "choice_B": "The Gull",
           "choice_C": "The Tern", "choice_D": "The Swan", "answer": "C", "context": "Boats left in order. " * 5}
    (sample,) = load_data(str(write(tmp_path / "v2.jsonl", row)))
    assert sample.metric == "choice" and sample.answers == (("C",),)
    assert "(C) The Tern" in sample.questions[0]
    for prediction, expected in [("**The correct answer is (C)**", 1.0), ("The correct answer is C.", 1.0),
                                 ("(C) because it left first", 1.0), ("C", 1.0), ("The correct answer is (B)", 0.0),
                                 ("Certainly the Tern", 0.0)]:
        assert score(prediction, sample.answers[0], sample.metric) == expected, prediction


def test_ruler_files_take_the_task_from_their_folder(tmp_path):
    niah = {"index": 0, "input": "Some special magic numbers are hidden in the text.\nThe special magic number for "
            "oak is: 4417.\nWhat are all the special magic numbers for oak mentioned in the provided text?",
            "outputs": ["4417"], "length": 40, "length_w_model_temp": 52,
            "answer_prefix": " The special magic numbers for oak mentioned in the provided text are"}
    qa = {"index": 0, "input": "Answer the question. Document 1: Oak trees grow slowly. Question: What grows "
          "slowly?", "outputs": ["Oak trees", "oaks"], "length": 20, "answer_prefix": " Answer:"}
    (needle,) = load_data(str(write(tmp_path / "niah_single_1" / "validation.jsonl", niah)))
    (answer,) = load_data(f"ruler:{write(tmp_path / 'qa_1' / 'validation.jsonl', qa)}")
    assert (needle.task, needle.metric, needle.max_new_tokens) == ("niah_single_1", "contains_all", 128)
    assert needle.context.endswith("is: 4417.") and needle.questions[0].startswith("What are all")
    assert needle.answer_prefix == "The special magic numbers for oak mentioned in the provided text are"
    assert (answer.task, answer.metric, answer.questions) == ("qa_1", "contains_any", ("What grows slowly?",))
    assert score("oaks, clearly", answer.answers[0], answer.metric) == 1.0  # any of the answers (part)


def test_infinitebench_tasks_and_metrics(tmp_path):
    choice = {"id": 3, "context": "A long book. " * 5, "input": "Who sailed?", "answer": ["Bob"],
              "options": ["Al", "Bob", "Cy", "Di"]}
    (book,) = load_data(str(write(tmp_path / "longbook_choice_eng.jsonl", choice)))
    assert (book.id, book.metric, book.answers) == ("longbook_choice_eng/3", "option", (("Bob", "B"),))
    assert "B. Bob" in book.questions[0]
    for prediction, expected in [("B. Bob", 1.0), ("I think the answer is B", 1.0), ("The answer is: C", 0.0),
                                 ("Bob", 1.0), ("", 0.0)]:
        assert score(prediction, book.answers[0], book.metric) == expected, prediction
    kv = {"id": 0, "context": '{"k1": "v-123"}', "input": "Key k1?", "answer": "v-123", "options": []}
    (sample,) = load_data(f"infinitebench:{write(tmp_path / 'kv_retrieval.jsonl', kv)}")
    assert score('The value is "v-123".', sample.answers[0], sample.metric) == 1.0
    assert score("v-1234", sample.answers[0], sample.metric) == 0.0  # a whole word, not a substring
    passkey = {"id": 0, "context": "grass " * 20, "input": "What is the pass key?", "answer": ["71432"]}
    (key,) = load_data(str(write(tmp_path / "passkey.jsonl", passkey)))
    assert score("The pass key is 71432.", key.answers[0], key.metric) == 1.0
    assert score("7143 2", key.answers[0], key.metric) == 0.0  # only the first digit run counts
    find = {"id": 0, "context": "1, 42, 7", "input": "The largest number is", "answer": 42}
    (largest,) = load_data(str(write(tmp_path / "math_find.jsonl", find)))
    assert score("42.0 I think", largest.answers[0], largest.metric) == 1.0


def test_scbench_sessions_are_multi_turn_samples(tmp_path):
    session = {"id": 9, "context": '{"a": "alpha-1", "b": "beta-2"}',
               "multi_turns": [{"input": "Value of a?", "answer": "alpha-1"},
                               {"input": "Value of b?", "answer": "beta-2"}]}
    (sample,) = load_data(str(write(tmp_path / "scbench_kv.jsonl", session)))
    assert (sample.id, sample.questions, sample.answers) == ("scbench_kv/9", ("Value of a?", "Value of b?"),
                                                             (("alpha-1",), ("beta-2",)))
    assert score("it is xalpha-1x", sample.answers[0], sample.metric) == 1.0  # SCBench's kv scorer: substring
    chinese = {"id": 1, "context": "书的内容。", "multi_turns": [{"input": "首都？", "answer": "北京市"}]}
    (zh,) = load_data(str(write(tmp_path / "scbench_qa_chn.jsonl", chinese)))
    # characters 北 京 vs 北 京 市: P=1, R=2/3, F1 = 0.8
    assert score("北京。", zh.answers[0], zh.metric) == pytest.approx(0.8)
    choice = {"id": 2, "context": "A book.", "multi_turns": [
        {"input": "Who?", "answer": "B", "options": ["Al", "Bob", "Cy", "Di"]}]}
    (mc,) = load_data(str(write(tmp_path / "scbench_choice_eng.jsonl", choice)))
    assert mc.answers == (("Bob", "B"),)


BAD = [
    ("longbench.jsonl", {**LONGBENCH_ROWS[0], "answers": []}, "'answers'"),
    ("longbench.jsonl", {**LONGBENCH_ROWS[0], "dataset": "hotpot"}, "'dataset' must be a LongBench dataset"),
    ("longbench.jsonl", {**LONGBENCH_ROWS[2], "all_classes": None}, "'all_classes'"),
    ("longbench.jsonl", {**LONGBENCH_ROWS[0], "context": 5}, "'context'"),
    ("v2.jsonl", {"question": "q", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d",
                  "answer": "E", "context": "x"}, "'answer' must be one of the letters"),
    ("v2.jsonl", {"question": "q", "choice_A": "a", "choice_B": "b", "choice_C": "c", "answer": "A",
                  "context": "x"}, "missing 'choice_D'"),
    ("vt/validation.jsonl", {"input": "no question here", "outputs": ["X"]}, "'input' must end with the question"),
    ("mystery/validation.jsonl", {"input": "ctx\nQ?", "outputs": ["X"]}, "cannot tell the RULER task"),
    ("longbook_sum_eng.jsonl", {"context": "c", "input": "Summarize.", "answer": "s"}, "not supported"),
    ("longbook_choice_eng.jsonl", {"context": "c", "input": "q", "answer": "Zed", "options": ["a", "b", "c", "d"]},
     "'answer' must be one of the options"),
    ("scbench_kv.jsonl", {"context": "c", "multi_turns": "q"}, "'multi_turns' must be a non-empty list"),
    ("scbench_kv.jsonl", {"context": "c", "multi_turns": [{"input": "q", "answer": "a"}, {"input": "q2"}]},
     "multi_turns[1]: missing 'answer'"),
    ("cases.jsonl", {"context": "x", "answers": ["a"]}, "missing 'question'"),  # kvlab's own format
    ("cases.jsonl", {"text": "x", "label": "y"}, "cannot tell the format from the fields label, text"),
]


@pytest.mark.parametrize("name, row, fragment", BAD, ids=[f"{i}-{name}" for i, (name, _, _) in enumerate(BAD)])
def test_a_malformed_row_is_one_line_naming_file_line_and_field(tmp_path, name, row, fragment):
    good = {"longbench.jsonl": LONGBENCH_ROWS[0]}.get(name)
    path = write(tmp_path / name, *([good, ""] if good else ["", ""]), row)  # the bad row is on line 3
    with pytest.raises(DataError) as error:
        load_data(str(path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path} line 3: ")
    assert fragment in message


def test_invalid_json_and_duplicate_ids_name_their_lines(tmp_path):
    path = write(tmp_path / "longbench.jsonl", LONGBENCH_ROWS[0], '{"input": ')
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        load_data(f"longbench:{path}")
    path = write(tmp_path / "twice.jsonl", LONGBENCH_ROWS[0], LONGBENCH_ROWS[0])
    with pytest.raises(DataError, match=r"line 2: duplicate id 'id-hotpotqa' \(first used on line 1\)"):
        load_data(str(path))


@pytest.fixture()
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [longbench_row("qasper", ["yes"], _id="h1"), longbench_row("qasper", ["no"], _id="h2")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_sources_go_through_datasets_load_dataset(fake_hub):
    samples = load_data("longbench:hub:THUDM/LongBench/qasper")
    assert fake_hub == [("THUDM/LongBench", "qasper", "test")]
    assert [(s.id, s.task, s.metric, s.answers) for s in samples] == [
        ("h1", "qasper", "qa_f1", (("yes",),)), ("h2", "qasper", "qa_f1", (("no",),))]
    load_data("longbench:hub:THUDM/LongBench/qasper@validation")
    assert fake_hub[-1] == ("THUDM/LongBench", "qasper", "validation")


@pytest.mark.parametrize("spec, fragment", [
    ("hub:THUDM/LongBench/qasper", "name the format of a hub dataset"),
    ("ruler:hub:NVIDIA/RULER", "generated locally"),
    ("longbench:hub:LongBench", "hub:OWNER/NAME[/CONFIG][@SPLIT]"),
])
def test_hub_mistakes(fake_hub, spec, fragment):
    with pytest.raises(DataError, match=fragment.replace("[", r"\[")):
        load_data(spec)


def test_hub_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_data("longbench:hub:THUDM/LongBench/qasper")


def test_list_formats_documents_every_format(capsys):
    assert main(["bench", "--list-formats"]) == 0
    printed = capsys.readouterr().out
    for name in FORMATS:
        assert f"{name}: " in printed
    assert "all_classes" in printed and "multi_turns" in printed and "code_sim" in printed


def bench(tiny_llama, tmp_path, spec, **settings):
    request = BenchRequest(model="tiny-llama", tasks=(), lengths=(1024,), samples=1, policies=("snapkv",),
                           ratios=(0.5,), out_dir=str(tmp_path / "run"), data_file=spec, **settings)
    outcome = run_bench(request, progress=False, loaded=tiny_llama)
    return outcome, [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]


def test_bench_runs_a_longbench_file_end_to_end(tiny_llama, tmp_path):
    context = "The lighthouse keeper, Mara Voss, wrote the logbook every night. " * 6
    path = write(tmp_path / "hotpotqa.jsonl", longbench_row("hotpotqa", ["Mara Voss"], context=context, _id="r1"),
                 longbench_row("passage_count", ["1"], context=context, _id="r2"))
    outcome, rows = bench(tiny_llama, tmp_path, f"longbench:{path}")
    assert (outcome.prefills, outcome.rows_written) == (2, 2)
    assert {(row["task"], row["metric"]) for row in rows} == {("hotpotqa", "qa_f1"), ("passage_count", "count")}
    for row in rows:
        assert row["score"] == score(row["prediction"], row["answers"], row["metric"])


def test_bench_runs_an_scbench_session_turn_by_turn(tiny_llama, tmp_path):
    session = {"id": 1, "context": "The grass is green. The pass key is 71432. Remember it. " * 6,
               "multi_turns": [{"input": "What is the pass key?", "answer": "71432"},
                               {"input": "Say the pass key again.", "answer": "71432"}]}
    path = write(tmp_path / "scbench_passkey.jsonl", session)
    outcome, rows = bench(tiny_llama, tmp_path, str(path), mode="multi-turn")
    assert outcome.prefills == 1
    assert sorted(row["question_index"] for row in rows) == [0, 1]
    assert "turn 2" in (tmp_path / "run" / "report.md").read_text()
