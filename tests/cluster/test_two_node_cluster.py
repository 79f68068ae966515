"""Issue check: a two-node Ray cluster on this machine runs a tiny SFT (ZeRO-2, one worker per
node) and a tiny PPO with its roles on different nodes, and both match the single-process
runs of the same configs within 1e-4."""

import json
import sys
from pathlib import Path

import pytest

from cluster.loopback import loopback_namespace_available, run_isolated

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time" and isinstance(v, (int, float))}
            for r in rows]


def assert_close(single: list[dict], ray: list[dict]) -> None:
    single, ray = numbers(single), numbers(ray)
    assert len(single) == len(ray) > 1
    for a, b in zip(single, ray):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), key


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not loopback_namespace_available(), reason="needs unshare -n (a loopback-only network namespace)")
def test_two_node_cluster_matches_the_single_process_runs(tmp_path, quickstart_data, quickstart_models):
    sft = [f"model.path={quickstart_models['sft']}", f"data.train.path={quickstart_data['sft']}",
           "model.tiny=null", "data.pretrain.path=''", "train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=8",
           "train.eval_every=2", "data.eval_fraction=0.02", "train.resume=never", "logging.progress=false"]
    ppo = [f"model.path={quickstart_models['sft']}", f"reward_model.path={quickstart_models['rm']}",
           f"data.prompts.path={quickstart_data['prompts']}", f"data.eval_prompts.path={quickstart_data['prompts_eval']}",
           f"data.pretrain.path={quickstart_data['pretrain']}", "ppo.iterations=3", "ppo.eval_every=3",
           "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "eval.max_prompts=8",
           "rollout.max_new_tokens=12", "train.resume=never", "logging.progress=false"]
    spec = {"root": str(tmp_path), "sft_config": str(REPO / "configs/sft.yaml"), "ppo_config": str(REPO / "configs/ppo.yaml"),
            "sft": sft, "ppo": ppo}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = run_isolated([sys.executable, str(Path(__file__).with_name("_two_node_runs.py")),
                         str(tmp_path / "spec.json"), str(tmp_path / "out.json")], timeout=1200,
                        env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())

    # Where the work ran: SFT on both nodes, PPO's two role groups on different nodes.
    assert len(set(out["sft_nodes"]["workers"])) == 2
    nodes = out["ppo_nodes"]
    assert nodes["actor"] == nodes["reference"] and nodes["critic"] == nodes["reward"]
    assert set(nodes["actor"]).isdisjoint(nodes["critic"])

    assert_close(out["sft_single"], out["sft_ray"])
    assert_close(out["ppo_single"], out["ppo_ray"])
    assert out["ppo_ray"][-1]["eval/gold_reward"] == pytest.approx(out["ppo_single"][-1]["eval/gold_reward"], abs=1e-6)
