"""PPO with rewards from code or a service, end to end on tiny models: what a failing reward
source does to a real run (counted, skipped like a non-finite reward, a total failure stops with
one line), and which roles a critic-free or KL-free run builds (none it does not need)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config import PPOConfig, load_config
from rlhf.errors import UserError
from rlhf.logging.metrics import read_metrics
from stages import ppo

REPO = Path(__file__).resolve().parents[2]

FUNCTIONS = '''
import math, time

def length(prompt, response, **fields):
    return float(len(response))

def raises(prompt, response, **fields):
    raise ValueError("the scorer is broken")

def hangs(prompt, response, **fields):
    time.sleep(60)
    return 1.0

def nan_on_uppercase(prompt, response, **fields):
    return math.nan if "uppercase" in prompt else 1.0

def nan_always(prompt, response, **fields):
    return math.nan
'''
MODULE = "ppo_rewardfns_for_tests"


@pytest.fixture(scope="module")
def functions_dir(tmp_path_factory) -> Path:
    """A folder holding the reward functions above as a module; the pool's workers get the
    trainer's sys.path."""
    folder = tmp_path_factory.mktemp("rewardfns")
    (folder / f"{MODULE}.py").write_text(FUNCTIONS)
    return folder


@pytest.fixture
def functions(monkeypatch, functions_dir) -> str:
    monkeypatch.syspath_prepend(str(functions_dir))
    return MODULE


# 4 prompts x 2 answers (8 calls of each function per iteration), one mini-batch, 6 new tokens,
# 4 eval answers.
TINY = ("ppo.rollout_batch_size=4", "rollout.n_samples_per_prompt=2", "ppo.mini_batch_size=8",
        "ppo.micro_batch_size=8", "ppo.ppo_epochs=1", "rollout.max_new_tokens=6", "eval.max_prompts=4",
        "eval.samples_per_prompt=1", "reward.normalize=running", "ppo.eval_every=0", "logging.progress=false")


def overrides(tmp_path: Path, data: dict, model: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", 'reward_model.path=""', f"data.prompts.path={data['prompts']}",
            f"data.eval_prompts.path={data['prompts_eval']}", f"data.pretrain.path={data['pretrain']}",
            f"output_dir={tmp_path}", *TINY, *extra]


def config(tmp_path: Path, data: dict, model: Path, *extra: str) -> PPOConfig:
    return load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], overrides(tmp_path, data, model, *extra))


def grpo_with(functions: list[str], *extra: str) -> tuple[str, ...]:
    listed = ", ".join(f'"{f}"' for f in functions)
    return ("ppo.advantage=grpo", "kl.coef=0", f"reward.functions=[{listed}]", *extra)


def rows_by_step(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir)}


# -- 1. failing reward sources ------------------------------------------------------------------
#
# Documented (rlhf/roles/rewards.py, rlhf/rewards/functions.py): a call that raises, runs past
# reward.function_timeout_s or returns a non-finite number gives NaN for that sample and is counted
# (reward/function_errors, _timeouts, _nonfinite, _skipped); the mixed reward is then NaN and the
# non-finite guard skips the iteration (ppo/skipped_nonfinite), train.max_consecutive_nonfinite in a
# row stop the run with one line. A reward service that stays down after its retries stops the run
# with one line naming the URL. An evaluation's own failures are logged with it (eval/function_*),
# not in the next training step's counts.

KINDS = ("errors", "timeouts", "nonfinite", "skipped")


def failures(row: dict) -> dict[str, float]:
    return {kind: row[f"reward/function_{kind}"] for kind in KINDS}


def assert_every_iteration_skipped(rows: dict[int, dict], iterations: int) -> None:
    for step in range(1, iterations + 1):
        assert rows[step]["ppo/skipped_nonfinite"] == step
        assert "ppo/policy_loss" not in rows[step] and "ppo/reward_raw" not in rows[step]


def test_a_function_that_raises_gives_nan_is_counted_and_the_iteration_is_skipped(
        tmp_path, capsys, quickstart_data, tiny_model_dir, functions):
    cfg = config(tmp_path, quickstart_data, tiny_model_dir,
                 *grpo_with([f"{functions}:length", f"{functions}:raises"], "ppo.iterations=2"))
    ppo.main(cfg)  # 2 skipped iterations < train.max_consecutive_nonfinite=3: the run ends normally
    rows = rows_by_step(tmp_path)
    assert failures(rows[2]) == {"errors": 8, "timeouts": 0, "nonfinite": 0, "skipped": 0}
    assert failures(rows[1])["errors"] == 8
    # With two functions, each one's own count says which failed.
    assert rows[2][f"reward/function_errors/{functions}:raises"] == 8
    assert rows[2][f"reward/function_errors/{functions}:length"] == 0
    assert rows[0]["eval/function_errors"] == 4  # the step-0 evaluation's 4 calls
    assert rows[0][f"eval/function_errors/{functions}:raises"] == 4
    assert_every_iteration_skipped(rows, 2)
    out = capsys.readouterr().out
    assert f"[reward] {functions}:raises failed on 8 of 8 samples" in out
    assert "errors: ValueError: the scorer is broken" in out
    assert f"{functions}:length failed" not in out


def test_a_function_past_its_timeout_is_killed_counted_and_the_rest_of_its_batch_skipped(
        tmp_path, capsys, quickstart_data, tiny_model_dir, functions):
    import time

    cfg = config(tmp_path, quickstart_data, tiny_model_dir,
                 *grpo_with([f"{functions}:length", f"{functions}:hangs"], "ppo.iterations=2",
                            "reward.function_timeout_s=0.5"))
    started = time.monotonic()
    ppo.main(cfg)
    # 3 batches (eval, 2 iterations), each: max(2, workers) = 2 timeouts of 0.5 s, then the function's
    # other calls are skipped; a 60 s sleep is never waited for.
    assert time.monotonic() - started < 40
    rows = rows_by_step(tmp_path)
    assert failures(rows[2]) == {"errors": 0, "timeouts": 2, "nonfinite": 0, "skipped": 6}
    assert_every_iteration_skipped(rows, 2)
    assert "timeouts: timed out after 0.5 s" in capsys.readouterr().out


def test_nan_for_some_samples_skips_the_iteration_unless_its_weight_is_zero(
        tmp_path, capsys, quickstart_data, tiny_model_dir, functions):
    spec = f"{functions}:nan_on_uppercase"
    ppo.main(config(tmp_path / "weighted", quickstart_data, tiny_model_dir,
                    *grpo_with([f"{functions}:length", spec], "ppo.iterations=2")))
    rows = rows_by_step(tmp_path / "weighted")
    nan = failures(rows[2])["nonfinite"]
    assert 0 < nan < 8 and nan % 2 == 0, "iteration 2's prompts: some (both answers of each) ask for uppercase"
    assert failures(rows[2]) == {"errors": 0, "timeouts": 0, "nonfinite": nan, "skipped": 0}
    # Iteration 1's prompts ask for no uppercase: it trains; iteration 2 is skipped as a whole.
    assert rows[1]["ppo/skipped_nonfinite"] == 0 and "ppo/policy_loss" in rows[1]
    assert rows[2]["ppo/skipped_nonfinite"] == 1 and "ppo/policy_loss" not in rows[2]
    assert f"[reward] {spec} failed on {int(nan)} of 8 samples" in capsys.readouterr().out

    # Weight 0: left out of the sum (still counted), so the iterations train.
    ppo.main(config(tmp_path / "unweighted", quickstart_data, tiny_model_dir,
                    *grpo_with([f"{functions}:length", spec], "ppo.iterations=2", f'reward.weights={{"{spec}": 0}}')))
    rows = rows_by_step(tmp_path / "unweighted")
    assert failures(rows[2])["nonfinite"] == nan
    assert rows[2]["ppo/skipped_nonfinite"] == 0 and "ppo/policy_loss" in rows[2]


def test_nan_for_every_sample_stops_the_run_after_the_limit_with_one_line(
        tmp_path, capsys, quickstart_data, tiny_model_dir, functions):
    spec = f"{functions}:nan_always"
    cfg = config(tmp_path, quickstart_data, tiny_model_dir,
                 *grpo_with([spec], "ppo.iterations=4", "train.max_consecutive_nonfinite=2", "train.save_every=1"))
    with pytest.raises(UserError) as raised:
        ppo.main(cfg)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"ppo: 2 steps in a row with non-finite reward (from {spec}) (last at step 2, "
                              "train.max_consecutive_nonfinite=2)")
    assert "Check the reward source named" in message
    assert not list((tmp_path / "checkpoints").glob("step-*"))
    rows = rows_by_step(tmp_path)
    assert rows[1]["reward/function_nonfinite"] == 8 and rows[1]["ppo/skipped_nonfinite"] == 1
    out = capsys.readouterr().out  # and the line before it says how it failed
    assert f"[reward] {spec} failed on 8 of 8 samples, whose reward is NaN; first: nonfinite: returned nan" in out


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/score"


def test_a_reward_server_that_is_down_stops_the_run_with_one_line_naming_the_url(
        tmp_path, quickstart_data, tiny_model_dir):
    url = closed_port_url()
    cfg = config(tmp_path, quickstart_data, tiny_model_dir, "ppo.advantage=grpo", "kl.coef=0",
                 f"reward.http={url}", "reward.http_retries=1", "reward.http_timeout_s=2", "ppo.iterations=1")
    with pytest.raises(UserError) as raised:
        ppo.main(cfg)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"reward service {url}: no answer after 2 attempt(s)")
    assert "Connection refused" in message or "ConnectionRefusedError" in message
    assert not (tmp_path / "model").exists()


def test_through_the_cli_a_total_failure_exits_non_zero_with_one_line_and_no_traceback(
        tmp_path, quickstart_data, tiny_model_dir):
    url = closed_port_url()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "ppo", "--config", str(REPO / "configs" / "ppo.yaml"),
         *overrides(tmp_path, quickstart_data, tiny_model_dir, "ppo.advantage=grpo", "kl.coef=0",
                    f"reward.http={url}", "reward.http_retries=1", "reward.http_timeout_s=2", "ppo.iterations=1")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"reward service {url}: no answer after 2 attempt(s)" in last, proc.stderr[-2000:]


# -- 2. roles that the config does not need are never built ----------------------------------------
#
# A critic-free advantage (grpo, rloo, ...) builds no critic (no model loaded, no optimizer, no
# Ray group); kl.coef=0 loads no reference; rewards from code alone load no reward model.


@pytest.fixture
def built(monkeypatch):
    """Counts of the role builders' calls, of the models loaded and of the models wrapped for
    training (each with its optimizer), and the roles object the stage built."""
    import rlhf.roles.build as build
    import rlhf.roles.team as team
    from rlhf.distributed.single import SingleStrategy

    counts = {"critic": 0, "reference": 0, "reward": 0, "causal_lm": 0, "scalar_model": 0, "wrapped": 0}
    seen: dict = {}

    def counting(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module in (team, build):  # team calls the builders by the names it imported
        counting(module, "build_critic", "critic")
        counting(module, "build_reference", "reference")
        counting(module, "build_reward_model", "reward")
    counting(build, "load_causal_lm", "causal_lm")
    counting(build, "load_scalar_model", "scalar_model")
    counting(SingleStrategy, "wrap", "wrapped")
    real_roles = ppo.build_ppo_roles

    def build_roles(*args, **kwargs):
        seen["roles"] = real_roles(*args, **kwargs)
        return seen["roles"]

    monkeypatch.setattr(ppo, "build_ppo_roles", build_roles)
    return counts, seen


ROLE_CASES = {
    # advantage, extra overrides, builder calls, (causal LMs, scalar models, trained models) loaded
    "grpo-kl0-functions": ("grpo", ("kl.coef=0",), {"critic": 0, "reference": 0, "reward": 0}, (1, 0, 1)),
    "rloo-kl-functions": ("rloo", ("kl.coef=0.05",), {"critic": 0, "reference": 1, "reward": 0}, (2, 0, 1)),
    "gae-kl-reward_model": ("gae", ("kl.coef=0.05", "reward.functions=[]"),
                            {"critic": 1, "reference": 1, "reward": 1}, (2, 2, 2)),
}


@pytest.mark.parametrize("case", list(ROLE_CASES))
def test_only_the_roles_the_config_needs_are_built(case, tmp_path, built, quickstart_data, tiny_model_dir, functions):
    advantage, extra, builders, (causal, scalar, wrapped) = ROLE_CASES[case]
    counts, seen = built
    reward_model = (f"reward_model.path={tiny_model_dir}",) if advantage == "gae" else ()
    cfg = config(tmp_path, quickstart_data, tiny_model_dir, f"ppo.advantage={advantage}", "ppo.iterations=1",
                 f'reward.functions=["{functions}:length"]', *reward_model, *extra)
    ppo.main(cfg)
    assert {k: counts[k] for k in builders} == builders
    assert (counts["causal_lm"], counts["scalar_model"], counts["wrapped"]) == (causal, scalar, wrapped)
    roles = seen["roles"]
    assert (roles.critic is not None, roles.reference is not None, roles.reward_model is not None) == (
        builders["critic"] == 1, builders["reference"] == 1, builders["reward"] == 1)
    assert sorted(roles.trained()) == (["actor", "critic"] if builders["critic"] else ["actor"])
    row = rows_by_step(tmp_path)[1]
    assert ("ppo/value_loss" in row) == (advantage == "gae") and "ppo/policy_loss" in row


@pytest.mark.parametrize("advantage, kl, reward_model, groups", [
    ("grpo", 0.0, False, {"ppo-actor"}),
    ("rloo", 0.05, True, {"ppo-actor", "ppo-reference", "ppo-reward"}),
    ("gae", 0.05, True, {"ppo-actor", "ppo-reference", "ppo-critic", "ppo-reward"}),
])
def test_ray_role_groups_start_no_worker_for_a_role_not_needed(advantage, kl, reward_model, groups, tmp_path,
                                                               monkeypatch, quickstart_data, tiny_model_dir, functions):
    """RayRoles with Ray's placement and actors replaced by records: the plan of groups only."""
    import rlhf.ray.ppo_roles as ppo_roles
    from rlhf.models.loading import load_tokenizer

    placed, started = [], {}

    class FakePlacement:
        @classmethod
        def reserve(cls, resources, name, groups_per_node=1, **_):
            placed.append((name, groups_per_node))
            return cls()

        def release(self):
            pass

    class FakeWorker:
        class rendezvous:
            @staticmethod
            def remote():
                return ("127.0.0.1", 0)

    class FakeGroup:
        def __init__(self, cls, placement, make_args, name, share=1.0):
            self.name, self.workers = name, [FakeWorker()]
            started[name] = (make_args(0, 0)[0], share)

        def __len__(self):
            return 1

        def call_async(self, method, *args, **kwargs):
            return []

        def call(self, method, *args, **kwargs):
            return ["node-0"]

        def kill(self):
            self.workers = []

    monkeypatch.setattr(ppo_roles, "Placement", FakePlacement)
    monkeypatch.setattr(ppo_roles, "WorkerGroup", FakeGroup)
    monkeypatch.setattr(ppo_roles, "gather", lambda refs, name, **_: list(refs))
    rm = f"reward_model.path={tiny_model_dir}" if reward_model else 'reward_model.path=""'
    cfg = config(tmp_path, quickstart_data, tiny_model_dir, f"ppo.advantage={advantage}", f"kl.coef={kl}",
                 f'reward.functions=["{functions}:length"]', rm, "ray.enabled=true",
                 'ppo.colocate=[["actor", "reference"], ["critic", "reward"]]')
    assert ppo_roles.uses_role_groups(cfg)
    roles = ppo_roles.build_ppo_roles(cfg, None, load_tokenizer(cfg.model))
    try:
        assert set(started) == groups
        assert all(role == name.removeprefix("ppo-") for name, (role, _) in started.items())
        assert (roles.critic is None) == ("ppo-critic" not in groups)
        assert (roles.reference is None) == ("ppo-reference" not in groups)
        assert sorted(roles.trained()) == (["actor", "critic"] if advantage == "gae" else ["actor"])
        # A colocation group left empty reserves no placement; a role alone in its group has it whole.
        assert len(placed) == len({frozenset(g) & {n.removeprefix("ppo-") for n in groups}
                                   for g in ({"actor", "reference"}, {"critic", "reward"})} - {frozenset()})
        if advantage == "grpo":
            assert started["ppo-actor"][1] == 1.0
    finally:
        roles.shutdown()
