"""The task library: contracts every registered task meets (parametrized over the registry), then what each task
family promises (needle placement, chains that resolve, word counts, two-hop documents), then --haystack-dir."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvlab.bench.scoring import METRICS, score
from kvlab.bench.tasks import get_task, list_tasks, make_samples, task_descriptions
from kvlab.bench.tasks.fit import MAX_OVERSHOOT, MAX_ROUNDS
from kvlab.errors import DataError, ParameterError, UnknownTaskError

RULER_TASKS = {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"}
NEEDLE = re.compile(r"One special magic (?:number|uuid) for (\S+) is (\S+)\.")
TOLERANCE = 0.03
# one filler unit is larger than 3% of these short targets: a needle line of two UUIDs is ~80 SmolLM2 tokens
COARSE_UNIT_TOKENS = {"niah_multikey_3": 90}


def count_bytes(text: str) -> int:
    """The tiny models' byte-level tokenizer: one token per UTF-8 byte."""
    return len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def count_smollm2(smollm2):
    tokenizer = smollm2.tokenizer
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def needles(context: str) -> list[tuple[str, str]]:
    return NEEDLE.findall(context)


# --- the registry ---------------------------------------------------------------------------------------------

def test_registry_holds_the_13_ruler_tasks_with_descriptions():
    assert set(list_tasks()) >= RULER_TASKS
    assert all(task_descriptions()[name] for name in RULER_TASKS)


def test_unknown_task_suggests_a_name():
    with pytest.raises(UnknownTaskError, match="Did you mean: niah_single_1"):
        make_samples("niah_single1", count_bytes, 1024, 1)


@pytest.mark.parametrize("length, samples", [(10, 1), (1024, 0)])
def test_bad_length_or_sample_count(length, samples):
    with pytest.raises(ParameterError):
        make_samples("vt", count_bytes, length, samples)


def test_too_short_for_the_required_content():
    with pytest.raises(ParameterError, match="too short for task 'niah_multiquery'"):
        make_samples("niah_multiquery", count_bytes, 100, 1)


# --- contracts over every registered task ---------------------------------------------------------------------

@pytest.mark.parametrize("task", list_tasks())
def test_samples_are_well_formed(task):
    spec = get_task(task)
    samples = make_samples(task, count_bytes, 4096, 3, seed=5)
    assert [s.id for s in samples] == [f"{task}/len4096/s5/i{i}" for i in range(3)]
    for sample in samples:
        assert sample.task == task and sample.length_tokens == 4096 and sample.metric in METRICS
        assert sample.metric == spec.metric and sample.max_new_tokens == spec.max_new_tokens > 0
        assert len(sample.questions) == len(sample.answers) >= 1
        assert all(question.strip() for question in sample.questions)
        assert all(group and all(answer.strip() for answer in group) for group in sample.answers)
    assert [s.depth for s in samples] == ([0.0, 0.5, 1.0] if spec.uses_depth else [None] * 3)


@pytest.mark.parametrize("task", list_tasks())
def test_deterministic_and_seeded(task):
    first = make_samples(task, count_bytes, 2048, 2, seed=0)
    assert make_samples(task, count_bytes, 2048, 2, seed=0) == first
    other = make_samples(task, count_bytes, 2048, 2, seed=1)
    for a, b in zip(first, other):
        assert a.context != b.context and a.answers != b.answers
    assert first[0].answers != first[1].answers  # samples within one call differ too


@pytest.mark.parametrize("task", list_tasks())
def test_answers_are_in_the_context_and_a_perfect_answer_scores_one(task):
    for sample in make_samples(task, count_bytes, 2048, 2):
        for question_answers in sample.answers:
            for answer in question_answers:
                assert answer in sample.context
            assert score(", ".join(question_answers), question_answers, sample.metric) == 1.0
            assert score("I do not know.", question_answers, sample.metric) == 0.0


@pytest.mark.parametrize("task", list_tasks())
def test_length_in_bytes(task):
    for length in (4096, 16384):
        for sample in make_samples(task, count_bytes, length, 2):
            assert length * (1 - TOLERANCE) <= count_bytes(sample.context) <= length * (1 + MAX_OVERSHOOT)


@pytest.mark.real
@pytest.mark.parametrize("task", list_tasks())
def test_length_in_smollm2_tokens(task, count_smollm2):
    for length in (512, 1024, 2048):
        slack = max(TOLERANCE * length, COARSE_UNIT_TOKENS.get(task, 0))
        for sample in make_samples(task, count_smollm2, length, 2):
            assert length - slack <= count_smollm2(sample.context) <= length * (1 + MAX_OVERSHOOT)


@pytest.mark.parametrize("task", list_tasks())
def test_whole_context_is_tokenized_a_bounded_number_of_times(task):
    """Pieces are counted once and summed; whole candidates are tokenized only to correct the estimate."""
    length = 16384
    long_calls = []

    def counting(text: str) -> int:
        if len(text) > length / 4:
            long_calls.append(len(text))
        return count_bytes(text)

    make_samples(task, counting, length, 1)
    assert len(long_calls) <= MAX_ROUNDS + 2


def test_same_sample_index_asks_the_same_question_at_every_length():
    short, long = (make_samples("niah_multikey_1", count_bytes, length, 2)[1] for length in (2048, 8192))
    assert short.questions == long.questions and short.answers == long.answers


# --- needle tasks ---------------------------------------------------------------------------------------------

NEEDLE_DEPTH_TASKS = [t for t in list_tasks() if t.startswith("niah") and get_task(t).uses_depth]


@pytest.mark.parametrize("task", NEEDLE_DEPTH_TASKS)
def test_needle_sits_at_the_requested_depth(task):
    for sample in make_samples(task, count_bytes, 8192, 5):
        position = sample.context.index(sample.answers[0][0]) / len(sample.context)
        assert position == pytest.approx(sample.depth, abs=0.05)


def test_noise_haystack_holds_only_the_needle():
    for sample in make_samples("niah_single_1", count_bytes, 2048, 3):
        (key, value), = needles(sample.context)
        rest = NEEDLE.sub("", sample.context)
        assert set(re.split(r"(?<=\.)\s+", rest.strip())) <= {"The grass is green.", "The sky is blue.",
                                                              "The sun is yellow.", "The river flows on.",
                                                              "Here we go again."}
        assert key in sample.questions[0] and sample.answers == ((value,),)


def test_multikey_1_hides_the_asked_needle_among_three_distractors():
    for sample in make_samples("niah_multikey_1", count_bytes, 4096, 3):
        found = dict(needles(sample.context))
        asked = [key for key in found if key in sample.questions[0]]
        assert len(found) == 4 and len(asked) == 1
        assert sample.answers == ((found[asked[0]],),)


@pytest.mark.parametrize("task, key_pattern", [("niah_multikey_2", r"[a-z]+-[a-z]+"),
                                               ("niah_multikey_3", r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")])
def test_all_needle_haystack(task, key_pattern):
    for sample in make_samples(task, count_bytes, 4096, 2):
        lines = sample.context.splitlines()
        found = needles(sample.context)
        assert len(found) == len(lines) > 10  # nothing but needles, one per line
        keys = [key for key, _ in found]
        assert len(set(keys)) == len(keys) and all(re.fullmatch(key_pattern, key) for key in keys)
        asked = [key for key in keys if key in sample.questions[0]]
        assert len(asked) == 1 and sample.answers == ((dict(found)[asked[0]],),)


def test_multivalue_needs_all_four_values_of_one_key():
    for sample in make_samples("niah_multivalue", count_bytes, 4096, 3):
        found = needles(sample.context)
        assert len(found) == 4 and len({key for key, _ in found}) == 1
        assert found[0][0] in sample.questions[0]
        assert sorted(sample.answers[0]) == sorted(value for _, value in found)
        assert score(sample.answers[0][0], sample.answers[0], "contains_all") == 0.25


def test_multiquery_asks_four_keys_at_once():
    for sample in make_samples("niah_multiquery", count_bytes, 4096, 3):
        found = dict(needles(sample.context))
        assert len(found) == 4 and all(key in sample.questions[0] for key in found)
        assert sorted(sample.answers[0]) == sorted(found.values())


# --- variable tracking, aggregation ---------------------------------------------------------------------------

def test_vt_chain_resolves_to_the_answer():
    for sample in make_samples("vt", count_bytes, 4096, 3):
        values: dict[str, str] = {}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.context):
            values[name] = values[source[4:]] if source.startswith("VAR ") else source  # KeyError: out of order
        number = re.search(r"assigned the value (\d+)", sample.questions[0]).group(1)
        assert sorted(name for name, value in values.items() if value == number) == sorted(sample.answers[0])
        assert len(sample.answers[0]) == 5


@pytest.mark.parametrize("length", [512, 4096, 20000])
def test_cwe_answers_are_the_most_common_words(length):
    for sample in make_samples("cwe", count_bytes, length, 2):
        counts = Counter(re.findall(r"^\d+\. (\S+)$", sample.context, flags=re.M))
        assert sum(counts.values()) == len(sample.context.splitlines())
        common = set(sample.answers[0])
        assert len(common) == 10
        assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


@pytest.mark.parametrize("length", [512, 4096])
def test_fwe_answers_are_the_three_most_frequent_coded_words(length):
    for sample in make_samples("fwe", count_bytes, length, 2):
        counts = Counter(word for word in sample.context.split() if word != "...")
        ranked = [word for word, _ in counts.most_common()]
        assert set(ranked[:3]) == set(sample.answers[0])
        assert counts[ranked[2]] > counts[ranked[3]]
        assert "..." in sample.context.split()


# --- QA -------------------------------------------------------------------------------------------------------

def documents(context: str) -> list[str]:
    parts = re.split(r"(?m)^Document (\d+): ", context)
    assert parts[0] == "" and [int(n) for n in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


def subject(sample) -> str:
    return re.search(r"(?:was|does|that) ([A-Z][a-z]+ [A-Z][a-z]+) ", sample.questions[0]).group(1)


def test_qa_1_answer_is_in_the_subjects_only_document_at_the_requested_depth():
    for sample in make_samples("qa_1", count_bytes, 8192, 5):
        docs = documents(sample.context)
        about = [i for i, doc in enumerate(docs) if subject(sample) in doc]
        assert len(about) == 1 and sample.answers[0][0] in docs[about[0]]
        assert about[0] / (len(docs) - 1) == pytest.approx(sample.depth, abs=0.05)


def test_qa_2_needs_both_documents():
    for sample in make_samples("qa_2", count_bytes, 8192, 5):
        docs = documents(sample.context)
        town, person = sample.answers[0][0], subject(sample)
        (person_doc,) = [doc for doc in docs if person in doc]
        company = re.search(r"has worked for (.+?) since", person_doc).group(1)
        (company_doc,) = [doc for doc in docs if doc.startswith(company + "\n")]
        assert town not in person_doc and person not in company_doc
        assert f"headquarters are in {town}," in company_doc
        assert docs.index(person_doc) / (len(docs) - 1) == pytest.approx(sample.depth, abs=0.05)


# --- --haystack-dir -------------------------------------------------------------------------------------------

def test_haystack_dir_replaces_generated_prose(tmp_path):
    (tmp_path / "b.txt").write_text("Zebras graze at dusk. They move in herds!\n\nLions wait nearby.", "utf-8")
    (tmp_path / "a.txt").write_text("Alpha text comes first?  Yes,\nit does.", "utf-8")
    (tmp_path / "notes.md").write_text("Never used.", "utf-8")
    sample, = make_samples("niah_single_2", count_bytes, 2048, 1, haystack_dir=str(tmp_path))
    assert sample.context.startswith("Alpha text comes first? Yes, it does.")
    assert "Zebras graze at dusk." in sample.context and "Never used" not in sample.context
    assert sample.answers[0][0] in sample.context
    assert 2048 * (1 - TOLERANCE) <= count_bytes(sample.context) <= 2048 * (1 + MAX_OVERSHOOT)  # text repeats
    generated, = make_samples("niah_single_2", count_bytes, 2048, 1)
    assert "Zebras" not in generated.context


@pytest.mark.parametrize("make_dir, message", [
    (lambda path: path / "absent", "does not exist"),
    (lambda path: path, "no text in \\*.txt files"),
])
def test_haystack_dir_must_hold_text(tmp_path, make_dir, message):
    (tmp_path / "blank.txt").write_text("  \n\n ", "utf-8")
    with pytest.raises(DataError, match=message):
        make_samples("cwe", count_bytes, 1024, 1, haystack_dir=str(make_dir(tmp_path)))
