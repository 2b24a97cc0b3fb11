"""The benchmark's task library: RULER's 13 synthetic task families, generated offline and deterministically.

``make_samples(task, count_tokens, length_tokens, num_samples, seed)`` builds the samples of one task at one
context length, measured in the caller's model tokens. Tasks register themselves with ``@register_task`` in the
file that defines them; outside packages add more through the ``kvlab.tasks`` entry-point group.

Needle depth: tasks with ``uses_depth`` place their needle (or gold document) at ``i / (n - 1)`` for sample ``i``
of ``n``, so depths run evenly from 0 (start of the context) to 1 (its end), both ends included; one sample gets
0.5. Keys, values and filler of sample ``i`` depend on (task, seed, i) and not on the length, so a length sweep
asks the same questions over longer haystacks.
"""

from __future__ import annotations

from kvlab.bench.tasks import common_words, freq_words, niah, qa, variable_tracking  # noqa: F401  (registration)
from kvlab.bench.tasks.base import TASKS, CountTokens, Draft, Request, Sample, Task, register_task
from kvlab.bench.tasks.fillers import read_haystack_dir
from kvlab.errors import ParameterError

MIN_LENGTH_TOKENS = 64


def list_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> Task:
    return TASKS.get(name)


def task_descriptions() -> dict[str, str]:
    """Task name -> one-line description, in name order (for ``kvlab bench --list-tasks``)."""
    return {name: TASKS.get(name).description for name in TASKS.names()}


def sample_depths(num_samples: int) -> list[float]:
    """Evenly spread needle depths: 0 .. 1 inclusive for several samples, 0.5 for one."""
    if num_samples == 1:
        return [0.5]
    return [index / (num_samples - 1) for index in range(num_samples)]


def make_samples(task: str, count_tokens: CountTokens, length_tokens: int, num_samples: int, seed: int = 0,
                 haystack_dir: str | None = None) -> list[Sample]:
    """``num_samples`` samples of ``task`` whose contexts hold about ``length_tokens`` tokens each (as
    ``count_tokens`` measures; see ``fit.py`` for the tolerance). Deterministic for its arguments."""
    spec = TASKS.get(task)
    if not isinstance(length_tokens, int) or length_tokens < MIN_LENGTH_TOKENS:
        raise ParameterError(f"length must be an integer of at least {MIN_LENGTH_TOKENS} tokens (got {length_tokens})")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ParameterError(f"the number of samples must be a positive integer (got {num_samples})")
    if haystack_dir is not None:
        read_haystack_dir(haystack_dir)  # a missing or empty folder fails here, whatever the task
    depths = sample_depths(num_samples) if spec.uses_depth else [None] * num_samples
    samples = []
    for index, depth in enumerate(depths):
        request = Request(count_tokens, length_tokens, f"{task}/{seed}/{index}", depth,
                          haystack_dir if spec.uses_haystack_dir else None)
        draft = spec.generate(request)
        samples.append(Sample(
            id=f"{task}/len{length_tokens}/s{seed}/i{index}", task=task, context=draft.context,
            questions=draft.questions, answers=draft.answers, metric=spec.metric, length_tokens=length_tokens,
            depth=depth, max_new_tokens=spec.max_new_tokens, answer_prefix=draft.answer_prefix,
        ))
    return samples


__all__ = ["TASKS", "CountTokens", "Draft", "Request", "Sample", "Task", "get_task", "list_tasks", "make_samples",
           "register_task", "sample_depths", "task_descriptions"]
