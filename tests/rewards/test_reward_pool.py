"""RewardFunctionPool: rewards, fields, failures (raise, timeout, crash, non-numbers) counted as
NaN while the batch goes on, stuck workers killed and replaced without leaking processes, and
the spec errors that stop a run before it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from rlhf.errors import UserError
from rlhf.rewards.functions import FAILURE_KINDS, RewardFunctionPool, load_function

pytestmark = pytest.mark.timeout(60)  # a pool that failed to kill a stuck call would hang here

M = "rewardfns_for_tests"
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the workers get the parent's sys.path


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_good_function_scores_every_sample_and_the_pool_is_reused():
    before = children()
    with RewardFunctionPool([f"{M}:length", f"{M}:constant"], workers=2, timeout_s=5) as pool:
        assert len(set(pool.pids)) == 2 and set(pool.pids) <= children()
        pids = pool.pids
        for _ in range(2):  # the same workers serve every batch
            result = pool(["p"] * 5, ["", "a", "bb", "ccc", "dddd"], [{}] * 5)
            assert result.rewards[f"{M}:length"].dtype == torch.float32
            assert result.rewards[f"{M}:length"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
            assert result.rewards[f"{M}:constant"].tolist() == [1.0] * 5
            assert result.components == {}
            assert all(result.failures[k] == 0 for k in FAILURE_KINDS) and result.messages == {}
        assert pool.pids == pids
        assert pool([], [], []).rewards[f"{M}:length"].shape == (0,)
    assert children() == before  # closed: nothing left


def test_the_row_fields_reach_the_function():
    with RewardFunctionPool([f"{M}:with_fields"], workers=1, timeout_s=5) as pool:
        result = pool(["p", "p", "p"], ["42", "41", "x"],
                      [{"answer": "42"}, {"answer": "42", "bonus": 3}, {"answer": "x", "bonus": 1, "other": 0, "more": 1}])
    # 10 * (response == answer) + bonus + number of other fields
    assert result.rewards[f"{M}:with_fields"].tolist() == [10.0, 3.0, 13.0]


def test_a_field_named_like_an_argument_is_refused_with_the_column_named():
    with RewardFunctionPool([f"{M}:constant"], workers=1, timeout_s=5) as pool:
        with pytest.raises(UserError, match="'response'"):
            pool(["p"], ["r"], [{"response": "a reference"}])


def test_a_raising_call_gives_nan_counts_an_error_and_the_batch_goes_on():
    with RewardFunctionPool([f"{M}:raises_on_bad", f"{M}:length"], workers=2, timeout_s=5) as pool:
        result = pool(["p"] * 4, ["ok", "bad", "fine", "bad"], [{}] * 4)
        values = result.rewards[f"{M}:raises_on_bad"]
        assert values[0] == 1.0 and values[2] == 1.0 and values[1].isnan() and values[3].isnan()
        assert result.rewards[f"{M}:length"].tolist() == [2.0, 3.0, 4.0, 3.0]  # the other function is unaffected
        assert result.failures["errors"] == 2 and result.failures[f"{M}:raises_on_bad/errors"] == 2
        assert result.failures[f"{M}:length/errors"] == 0 and result.failures["timeouts"] == 0
        assert "ZeroDivisionError" in result.messages[f"{M}:raises_on_bad"]
        assert pool(["p"], ["ok"], [{}]).rewards[f"{M}:raises_on_bad"].tolist() == [1.0]


def test_a_call_past_the_timeout_gives_nan_and_its_worker_is_replaced_without_a_leak():
    before = children()
    with RewardFunctionPool([f"{M}:hangs_on_hang"], workers=2, timeout_s=0.5) as pool:
        old = set(pool.pids)
        started = time.monotonic()
        result = pool(["p"] * 6, ["a", "b", "hang", "c", "d", "e"], [{}] * 6)
        elapsed = time.monotonic() - started
        assert elapsed < 5, elapsed  # the call sleeps 120 s
        values = result.rewards[f"{M}:hangs_on_hang"]
        assert values[2].isnan() and [v for i, v in enumerate(values.tolist()) if i != 2] == [2.0] * 5
        assert result.failures["timeouts"] == 1 and result.failures[f"{M}:hangs_on_hang/timeouts"] == 1
        assert result.failures["errors"] == 0 and "timed out" in result.messages[f"{M}:hangs_on_hang"]
        stuck = old - set(pool.pids)
        assert len(stuck) == 1 and not alive(stuck.pop())  # killed and reaped
        assert children() - before == set(pool.pids)  # exactly the 2 live workers
        assert pool(["p"] * 3, ["x", "y", "z"], [{}] * 3).rewards[f"{M}:hangs_on_hang"].tolist() == [2.0] * 3
    assert children() == before


def test_a_stuck_worker_is_killed_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    with RewardFunctionPool([f"{M}:hangs_with_a_child"], workers=1, timeout_s=1.0) as pool:
        result = pool(["p"], ["r"], [{"pid_file": str(pid_file)}])
        assert result.failures["timeouts"] == 1
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)


def test_a_function_that_always_hangs_costs_about_one_timeout_per_batch():
    with RewardFunctionPool([f"{M}:always_hangs", f"{M}:constant"], workers=2, timeout_s=0.3, max_kills=2) as pool:
        started = time.monotonic()
        result = pool(["p"] * 20, ["r"] * 20, [{}] * 20)
        assert time.monotonic() - started < 5
    assert result.failures["timeouts"] == 2 and result.failures["skipped"] == 18
    assert result.rewards[f"{M}:always_hangs"].isnan().all()
    assert result.rewards[f"{M}:constant"].tolist() == [1.0] * 20  # the other function still ran everywhere


def test_a_crashing_call_counts_as_an_error_and_the_pool_goes_on():
    with RewardFunctionPool([f"{M}:crashes_on_die"], workers=1, timeout_s=5) as pool:
        old = pool.pids
        result = pool(["p"] * 4, ["a", "die", "b", "c"], [{}] * 4)
        assert result.rewards[f"{M}:crashes_on_die"][1].isnan()
        assert result.rewards[f"{M}:crashes_on_die"][[0, 2, 3]].tolist() == [1.0] * 3
        assert result.failures["errors"] == 1 and "exit code 7" in result.messages[f"{M}:crashes_on_die"]
        assert pool.pids != old and not alive(old[0])


@pytest.mark.parametrize("response, counted", [
    ("nan", True), ("inf", True), ("str", True), ("none", True), ("list", True), ("bad_dict", True),
    ("empty_dict", True), ("huge", True),  # 1e300 is finite, but not in float32
    ("int", False), ("bool", False)])
def test_what_is_not_a_finite_number_gives_nan_and_is_counted(pool_odd, response, counted):
    result = pool_odd(["p"], [response], [{}])
    value = result.rewards[f"{M}:odd_values"]
    assert bool(value.isnan().all()) is counted
    assert result.failures["nonfinite"] == int(counted) and result.failures["errors"] == 0
    if not counted:
        assert value.tolist() == [{"int": 3.0, "bool": 1.0}[response]]


@pytest.fixture(scope="module")
def pool_odd():
    sys.path.insert(0, str(HERE))
    try:
        with RewardFunctionPool([f"{M}:odd_values"], workers=1, timeout_s=5) as pool:
            yield pool
    finally:
        sys.path.remove(str(HERE))


def test_a_dict_gives_named_components_summed_into_the_reward():
    spec = f"{M}:components"
    with RewardFunctionPool([spec], workers=2, timeout_s=5) as pool:
        result = pool(["p"] * 3, ["good", "short", "bad"], [{}] * 3)
    assert result.rewards[spec][:2].tolist() == [1.5, 0.5] and result.rewards[spec][2].isnan()
    assert set(result.components) == {f"{spec}/correct", f"{spec}/format"}
    correct, fmt = result.components[f"{spec}/correct"], result.components[f"{spec}/format"]
    # a successful call without the component gives 0; a failed call NaN
    assert correct[:2].tolist() == [1.0, 0.0] and correct[2].isnan()
    assert fmt[:2].tolist() == [0.5, 0.5] and fmt[2].isnan()
    assert result.failures["errors"] == 1
    metrics = result.metrics()  # means over the finite samples, and the counts
    assert metrics[f"reward/{spec}"] == 1.0 and metrics[f"reward/{spec}/correct"] == 0.5
    assert metrics["reward/function_errors"] == 1.0 and metrics["reward/function_timeouts"] == 0.0
    assert metrics[f"reward/{spec}/errors"] == 1.0


def test_the_workers_do_not_import_torch():
    with RewardFunctionPool([f"{M}:torch_loaded"], workers=1, timeout_s=5) as pool:
        assert pool(["p"], ["r"], [{}]).rewards[f"{M}:torch_loaded"].tolist() == [0.0]


def test_thousands_of_trivial_calls_cost_well_under_a_second():
    with RewardFunctionPool([f"{M}:constant", f"{M}:length"], workers=2, timeout_s=5) as pool:
        n = 10_000
        started = time.monotonic()
        result = pool(["a prompt"] * n, ["a response"] * n, [{"answer": "42"}] * n)
        seconds = time.monotonic() - started
    assert result.rewards[f"{M}:constant"].sum() == n
    print(f"{2 * n / seconds:,.0f} calls/s, pool start-up {pool.startup_s:.3f} s")
    assert seconds < 2.0, seconds  # measured ~0.1-0.2 s on 2 cores (~150k calls/s)


@pytest.mark.parametrize("spec, message", [
    (f"{M}_missing:length", f"reward function '{M}_missing:length': no module named '{M}_missing'"),
    (f"{M}:missing", f"reward function '{M}:missing': module '{M}' has no attribute 'missing'"),
    (f"{M}:not_callable", f"reward function '{M}:not_callable': 'not_callable' is a int, not callable"),
    ("no_colon", "reward function 'no_colon': expected 'module:function'"),
])
def test_a_bad_spec_is_a_user_error_naming_it(spec, message):
    with pytest.raises(UserError) as caught:
        load_function(spec)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    before = children()
    with pytest.raises(UserError) as caught:  # the pool reports it from its workers, and cleans up
        RewardFunctionPool([f"{M}:length", spec], workers=2, timeout_s=5)
    assert str(caught.value).startswith(message)
    assert children() == before


def test_a_module_whose_import_fails_is_named_with_the_cause(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_module.py").write_text("import not_a_real_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="importing module 'broken_reward_module' failed: ModuleNotFoundError"):
        load_function("broken_reward_module:f")


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from rlhf.rewards.functions import RewardFunctionPool
        pool = RewardFunctionPool(["{M}:hangs_on_hang"], workers=2, timeout_s=60)
        print(" ".join(map(str, pool.pids)), flush=True)
        pool(["p"], ["hang"], [{{}}])  # one worker hangs in the function, the other waits
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.3)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
