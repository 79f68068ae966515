"""Issue check: SIGKILL one Ray worker mid-run (a 2-worker ZeRO-2 SFT, and the critic of a
PPO with role groups); the run restarts from its newest checkpoint, finishes the configured
steps, and its metrics equal the uninterrupted run's within 1e-6."""

import json
import sys
from pathlib import Path

import pytest

from cluster.loopback import loopback_namespace_available, run_isolated
from rlhf.errors import UserError
from rlhf.ray import launch
from rlhf.ray.group import WorkerDied
from stages import STAGES

REPO = Path(__file__).resolve().parents[2]


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time" and isinstance(v, (int, float))}
            for r in rows]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not loopback_namespace_available(), reason="needs unshare -n (a loopback-only network namespace)")
def test_a_killed_worker_is_restarted_from_the_checkpoint_and_the_run_ends_the_same(tmp_path, quickstart_data,
                                                                                      quickstart_models):
    sft = [f"model.path={quickstart_models['sft']}", "model.tiny=null", f"data.train.path={quickstart_data['sft']}",
           "data.pretrain.path=''", "data.eval_fraction=0.02", "train.max_steps=8", "train.micro_batch_size=4",
           "train.global_batch_size=8", "train.save_every=2", "train.eval_every=4", "train.resume=auto",
           "ray.enabled=true", "resources.workers_per_node=2", "strategy.name=deepspeed", "strategy.zero_stage=2",
           "logging.progress=false"]
    ppo = [f"model.path={quickstart_models['sft']}", f"reward_model.path={quickstart_models['rm']}",
           f"data.prompts.path={quickstart_data['prompts']}", f"data.eval_prompts.path={quickstart_data['prompts_eval']}",
           "ppo.iterations=4", "ppo.eval_every=2", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8",
           "ppo.micro_batch_size=8", "eval.max_prompts=8", "rollout.max_new_tokens=12", "train.save_every=1",
           "train.resume=auto", "kl.adaptive=true", "reward.normalize=running", "ray.enabled=true",
           "ppo.colocate=[[actor,reference],[critic,reward]]", "logging.progress=false"]
    spec = {"root": str(tmp_path), "sft_config": str(REPO / "configs/sft.yaml"), "ppo_config": str(REPO / "configs/ppo.yaml"),
            "sft": sft, "ppo": ppo, "kill_after": {"sft": 3, "ppo": 2}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = run_isolated([sys.executable, str(Path(__file__).with_name("_fault_runs.py")), str(tmp_path / "spec.json"),
                         str(tmp_path / "out.json")], timeout=1200, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert [k["actor"] for k in out["kills"]] == ["sft-worker-1", "ppo-critic-0"]
    assert "died" in done.stdout and "restart 1/3 from the newest checkpoint" in done.stdout
    for stage, last in (("sft", 8), ("ppo", 4)):
        straight, killed = numbers(out[f"{stage}_straight"]), numbers(out[f"{stage}_killed"])
        assert [r["step"] for r in killed] == [r["step"] for r in straight] and straight[-1]["step"] == last
        for a, b in zip(straight, killed):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (stage, a["step"], key)


def test_the_restart_budget_ends_the_run_naming_the_role_and_cause(monkeypatch, capsys):
    from rlhf.config import SFTConfig

    calls = []

    def dies(stage, cfg):
        calls.append(cfg.train.resume)
        raise WorkerDied("sft-worker", "The actor died unexpectedly: SIGKILL")

    monkeypatch.setattr(launch, "_run_once", dies)
    monkeypatch.setattr(launch, "ray_session", lambda *args: __import__("contextlib").nullcontext())
    cfg = SFTConfig()
    cfg.train.max_restarts, cfg.train.resume = 2, "never"
    with pytest.raises(UserError, match="a sft-worker worker died: The actor died unexpectedly: SIGKILL; "
                                        r"stopped after 2 restart\(s\)"):
        launch.run_stage_on_ray(STAGES["sft"], cfg)
    assert calls == ["never", "auto", "auto"]
    assert capsys.readouterr().out.count("from the newest checkpoint") == 2
