"""``kvlab bench --ray`` on a local Ray cluster (2 CPUs, tiny model): the same rows as a serial run, a killed worker
changes nothing but the timings, a failing sample is recorded and the run goes on, and the CLI's errors are one line."""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray  # the test extra installs it: these tests never skip

from kvlab.bench.distributed import RayOptions
from kvlab.bench.session import BenchRequest, run_bench
from kvlab.errors import KvlabError, ParameterError

TIMINGS = {"prefill_s", "compress_s", "decode_s", "question_s", "load_s", "peak_rss_mib"}



@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (about 7 s to start on 2 cores); the KVLAB_* environment reaches the
    workers as it would in ``kvlab bench --ray``."""
    env = {key: value for key, value in os.environ.items() if key.startswith("KVLAB_")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    yield
    ray.shutdown()


def request(out_dir, **changes) -> BenchRequest:
    settings = dict(model="tiny-llama", tasks=("niah_single_1", "vt"), lengths=(256,), samples=2,
                    policies=("full", "snapkv", "streaming_llm"), ratios=(0.5,), out_dir=str(out_dir),
                    chunk_tokens=128)
    settings.update(changes)
    return BenchRequest(**settings)


def rows_by_key(folder) -> dict:
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    keyed = {(row["sample_id"], row["question_index"], row["policy"], row["ratio"]): row for row in rows}
    assert len(keyed) == len(rows), "a row was written twice"
    return keyed


def same_measurement(row: dict, reference: dict) -> bool:
    """Equal but for timings and RSS; KL to float rounding (a worker runs 1 torch thread where the serial run
    runs 2, and reductions split differently). Predictions, scores and greedy agreement must be exact."""
    strip = lambda values: {key: value for key, value in values.items() if key not in TIMINGS | {"kl_vs_full"}}
    return strip(row) == strip(reference) and row["kl_vs_full"] == pytest.approx(reference["kl_vs_full"],
                                                                              rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def serial(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("serial")
    run_bench(request(folder), progress=False, loaded=tiny_llama)
    return rows_by_key(folder)


def test_ray_rows_equal_a_serial_runs(cluster, serial, tmp_path):
    outcome = run_bench(request(tmp_path), progress=False, ray=RayOptions(workers=2))
    assert outcome.rows_written == len(serial) == 4 * 3 and not outcome.failures
    distributed = rows_by_key(tmp_path)
    assert distributed.keys() == serial.keys()
    for key, row in distributed.items():
        assert same_measurement(row, serial[key]), key
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["machine"].startswith("Ray: 2 workers x 1 CPU") and run["failed_samples"] == []
    assert (tmp_path / "report.html").is_file()
    again = run_bench(request(tmp_path), progress=False, ray=RayOptions(workers=2))  # resumes: nothing left
    assert again.rows_written == 0 and len(rows_by_key(tmp_path)) == len(serial)


def test_killed_workers_are_restarted_and_every_answer_appears_once(cluster, serial, tmp_path):
    killed = []

    def kill_every_worker_once(pool, outcome):
        if not killed:  # after the first sample: the other worker is mid-sample, so its job must be retried
            for pid in pool.pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pool.pids)

    outcome = run_bench(request(tmp_path), progress=False, ray=RayOptions(workers=2),
                        on_sample=kill_every_worker_once)
    assert killed and outcome.worker_restarts >= 1 and not outcome.failures
    assert "were restarted" in outcome.status_line
    distributed = rows_by_key(tmp_path)
    assert distributed.keys() == serial.keys()
    assert all(same_measurement(row, serial[key]) for key, row in distributed.items())


def test_a_failing_sample_is_recorded_and_the_run_goes_on(cluster, tmp_path):
    """A sample longer than the model's window fails on its worker (without --force); kvlab's own errors are not
    retried, since they would fail the same way. The other samples finish; run.json names the failed one."""
    cases = [{"id": "ok/0", "context": "The code is 4242. " * 8, "question": "What is the code?",
              "answers": ["4242"], "max_new_tokens": 4},
             {"id": "long/0", "context": "word " * 5000, "question": "What is the code?", "answers": ["1"],
              "max_new_tokens": 4}]
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(case) + "\n" for case in cases))
    outcome = run_bench(request(tmp_path / "out", data_file=str(data), policies=("full",)), progress=False,
                        ray=RayOptions(workers=2, retries=2))
    assert [failure["sample_id"] for failure in outcome.failures] == ["long/0"]
    assert outcome.failures[0]["attempts"] == 1 and "window" in outcome.failures[0]["error"]
    assert "1 samples failed after retries" in outcome.status_line
    assert list(rows_by_key(tmp_path / "out")) == [("ok/0", 0, "full", 0.0)]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["failed_samples"] == outcome.failures


def test_ray_flags_without_ray_are_refused_in_one_line(tmp_path, capsys):
    from kvlab.cli import main

    assert main(["bench", "--model", "tiny-llama", "--ray-workers", "2", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "add --ray" in error


def test_ray_missing_is_one_line(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(KvlabError, match=r"pip install 'kvlab\[ray\]'"):
        run_bench(request(tmp_path), progress=False, ray=RayOptions())


def test_ray_options_are_checked():
    for bad in ({"workers": 0}, {"cpus_per_worker": 0}, {"gpus_per_worker": -1}, {"retries": -1}):
        with pytest.raises(ParameterError):
            RayOptions(**bad)
