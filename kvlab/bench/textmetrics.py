"""The official scorers of LongBench, LongBench v2, InfiniteBench and SCBench, written from their formulas.

Each function scores one prediction against one ground truth (or one label list) the way the benchmark's own
evaluation script does, so a kvlab score equals the published metric on the same prediction. None of the
libraries those scripts import is a kvlab dependency (``rouge``, ``fuzzywuzzy``, ``jieba``): the formulas are
short, so they are written here; ``jieba`` (Chinese word segmentation, which has no short formula) is imported
lazily by the two LongBench Chinese metrics that need it.

Deviations, kept small and stated where they occur: LongBench's classification removes matched class names
while iterating the same list (so it can skip one); here every class name that is a proper substring of the
ground truth is dropped. Where an official script would raise on an odd prediction (an empty string, a
malformed number), the score is 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from kvlab.errors import ParameterError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# LongBench's and InfiniteBench's Chinese punctuation set, added to ASCII punctuation for Chinese answers.
_ZH_PUNCTUATION = _PUNCTUATION | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower case, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction_tokens: Sequence[str], truth_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    same = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, truth: str) -> float:
    """LongBench / InfiniteBench ``qa_f1_score``: F1 over the words of the normalized texts."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def qa_f1_zh_chars(prediction: str, truth: str) -> float:
    """InfiniteBench / SCBench Chinese QA: F1 over the characters of the normalized texts."""
    return token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(truth)))


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise ParameterError("LongBench's Chinese metrics segment words with jieba, which is not installed; "
                             "pip install jieba") from None
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh(prediction: str, truth: str) -> float:
    """LongBench ``qa_f1_zh_score``: F1 over jieba words, each normalized, empty ones dropped."""
    def words(text: str) -> list[str]:
        return [word for word in (normalize_zh_answer(w) for w in _jieba_words(text)) if word]
    return token_f1(words(prediction), words(truth))


# ROUGE-L as LongBench computes it through the ``rouge`` package (``Rouge().get_scores(...)["rouge-l"]["f"]``):
# texts are cut into sentences at every ".", each sentence's whitespace is collapsed and its words are split on
# single spaces; the score is the package's summary-level union LCS with *sets* of words ("exclusive" mode):
# the words of every (reference sentence, prediction sentence) LCS are pooled into one set, recall and precision
# divide its size by the number of distinct reference and prediction words, and F = 2PR / (P + R + 1e-8).
# The package raises on an empty text and LongBench scores that 0.

def _sentences(text: str) -> list[list[str]]:
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _lcs_words(reference: list[str], candidate: list[str]) -> list[str]:
    """One longest common subsequence, chosen with the package's tie-break (walk back from the end; on a tie
    move along the candidate)."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words: list[str] = []
    i, j = rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, truth: str) -> float:
    """LongBench ``rouge_score``: the ``rouge`` package's ROUGE-L F (see the comment above)."""
    candidate, reference = _sentences(prediction), _sentences(truth)
    if not candidate or not reference:
        return 0.0
    pooled = {word for ref in reference for cand in candidate for word in _lcs_words(ref, cand)}
    recall = len(pooled) / len({word for sentence in reference for word in sentence})
    precision = len(pooled) / len({word for sentence in candidate for word in sentence})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_l_zh(prediction: str, truth: str) -> float:
    """LongBench ``rouge_zh_score``: ROUGE-L over jieba words joined by spaces."""
    return rouge_l(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(truth)))


def code_sim(prediction: str, truth: str) -> float:
    """LongBench ``code_sim_score``: the first prediction line without a backtick, '#' or '//' is compared with
    the truth by ``fuzzywuzzy.fuzz.ratio`` / 100. With python-Levenshtein (what fuzzywuzzy uses when present)
    the ratio is (|a| + |b| - indel distance) / (|a| + |b|) = 2 * LCS(a, b) / (|a| + |b|) over characters,
    rounded to a whole percent; equal strings score 1 and an empty side 0."""
    line = next((text for text in prediction.lstrip("\n").split("\n")
                 if "`" not in text and "#" not in text and "//" not in text), "")
    if line == truth:
        return 1.0
    if not line or not truth:
        return 0.0
    previous = [0] * (len(truth) + 1)
    for char in line:
        current = [0]
        for j, other in enumerate(truth, start=1):
            current.append(previous[j - 1] + 1 if char == other else max(previous[j], current[j - 1]))
        previous = current
    return round(100 * 2 * previous[-1] / (len(line) + len(truth))) / 100


def classification(prediction: str, truth: str, classes: Sequence[str]) -> float:
    """LongBench ``classification_score``: the class names found in the prediction, less those that are a proper
    part of the truth; 1/len(found) if the truth is among them, else 0."""
    found = [name for name in classes if name in prediction]
    found = [name for name in found if not (name in truth and name != truth)]
    return 1.0 / len(found) if truth in found else 0.0


def _share_of_numbers(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(number == wanted for number in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, truth: str, *, marker: str = "Paragraph ") -> float:
    """LongBench ``retrieval_score`` (marker "Paragraph ") and ``retrieval_zh_score`` (marker "段落"): the share
    of the numbers in the prediction that equal the paragraph number of the truth."""
    match = re.search(re.escape(marker) + r"(\d+)", truth)
    if match is None:
        raise ParameterError(f"a passage-retrieval answer must name its paragraph as '{marker}N' (got {truth!r})")
    return _share_of_numbers(prediction, match.group(1))


def count(prediction: str, truth: str) -> float:
    """LongBench ``count_score``: the share of the numbers in the prediction that equal the truth."""
    return _share_of_numbers(prediction, str(truth))


def choice_letter(prediction: str) -> str | None:
    """LongBench v2's answer extraction: "The correct answer is (X)" or "... is X" after removing '*'. kvlab adds
    one fallback the official script lacks: a prediction that starts with the letter itself ("B", "(B) ...",
    "B. ...") gives that letter, which is how a model answers after an answer prefix."""
    text = prediction.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(r"The correct answer is ([A-D])", text)
    if match:
        return match.group(1)
    leading = re.match(r"\s*\(?([A-D])(?![A-Za-z])", text)
    return leading.group(1) if leading else None


# InfiniteBench (src/compute_scores.py) and SCBench (scbench/compute_scores.py) per-task scorers.

def first_integer(prediction: str) -> str:
    """The first run of digits in the prediction ("" if none)."""
    return next((item for item in re.split("[^0-9]", prediction) if item), "")


def _words_without(prediction: str, characters: str) -> list[str]:
    for char in characters:
        prediction = prediction.replace(char, " ")
    return prediction.split()


def kv_words(prediction: str, label: str) -> bool:
    """InfiniteBench kv_retrieval: the label is one of the words once newlines and ``:"'.,?!{}`` are spaces."""
    return label in _words_without(prediction, "\n:\"'.,?!{}")


def dialogue_words(prediction: str, label: str) -> bool:
    """InfiniteBench longdialogue_qa_eng: the label is one of the upper-cased words (separators as kv_words)."""
    return label in [word.upper() for word in _words_without(prediction, "\n:\"'.,?!{}")]


def option(prediction: str, labels: Sequence[str]) -> bool:
    """InfiniteBench / SCBench longbook_choice_eng; ``labels`` holds the right option's text and its letter."""
    prediction = prediction.strip()
    if not prediction:
        return False
    if prediction[0] in "ABCD":
        return prediction[0] in labels
    if prediction in labels:
        return True
    for char in "\n\"'.,?!{}":
        prediction = prediction.replace(char, " ")
    while "  " in prediction:
        prediction = prediction.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        index = prediction.find(prefix)
        if index == -1:
            continue
        after = prediction[index + len(prefix) + 1:]
        return len(prediction) >= index + len(prefix) + 1 and any(after.startswith(label) for label in labels)
    return next((word in labels for word in prediction.split() if word in "ABCD"), False)


def math_find(prediction: str, label: str) -> bool:
    """SCBench / InfiniteBench math_find: the first number in the prediction equals the label (compared as an
    integer when the label is one, as a float otherwise)."""
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return False
    if re.fullmatch(r"-?\d+", label):
        return int(float(match.group(0))) == int(label)
    return float(match.group(0)) == float(label)
