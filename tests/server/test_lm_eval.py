"""lm-evaluation-harness scores a small loglikelihood task through the server (``local-completions``, which asks
``/v1/completions`` for ``echo`` + ``logprobs``), and its numbers equal the tiny model's own log-softmax.

Runs only where ``lm_eval`` is importable (it is not a kvlab dependency); for example in a separate venv:
``python -m venv --system-site-packages /tmp/lmeval && /tmp/lmeval/bin/pip install 'lm-eval[api]'``, then
``/tmp/lmeval/bin/python -m pytest tests/server/test_lm_eval.py``. The task is a YAML over a JSONL file written
here: no dataset hub is needed.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval, best in a "
                                      "separate venv); this test drives it against the server")
pytest.importorskip("tenacity", reason="lm-eval's API models need its api extra: pip install 'lm-eval[api]'")

MODEL = "tiny-llama"
TASK = "kvlab_tiny_choice"
DOCS = [
    {"question": "The colour of the sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four"], "answer": 1},
    {"question": "Cats like to chase", "choices": ["mice", "algebra", "clouds", "taxes"], "answer": 0},
]
TASK_YAML = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def reference_loglikelihood(loaded, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of the continuation tokens' log-probabilities and whether each was the argmax, from transformers."""
    tokenizer = loaded.tokenizer
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([whole])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    rows = log_probs[context_tokens - 1:len(whole) - 1]
    targets = torch.tensor(whole[context_tokens:])
    chosen = rows.gather(1, targets[:, None])[:, 0]
    return float(chosen.sum()), bool((rows.argmax(dim=-1) == targets).all())


def test_lm_eval_loglikelihood_task_through_the_server(start, tiny_llama, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_llama.tokenizer.save_pretrained(tokenizer_dir)

    with start() as server:
        model_args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={tokenizer_dir},"
                      f"tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=512")
        results = simple_evaluate(model="local-completions", model_args=model_args, tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                  apply_chat_template=False)
        requests_served = server.state.metrics.value("kvlab_requests_total", route="/v1/completions", status="200")

    samples = results["samples"][TASK]
    assert len(samples) == len(DOCS)
    assert requests_served == sum(len(doc["choices"]) for doc in DOCS)  # one request per choice
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        scores = [response[0] for response in sample["resps"]]
        for (score, is_greedy), choice in zip(scores, doc["choices"], strict=True):
            expected, expected_greedy = reference_loglikelihood(tiny_llama, doc["question"], f" {choice}")
            assert score == pytest.approx(expected, abs=1e-3)
            assert is_greedy == expected_greedy
        correct += int(max(range(len(scores)), key=lambda index: scores[index][0]) == doc["answer"])
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / len(DOCS))
