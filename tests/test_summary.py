"""The pipeline's closing table, from the exports' rlhf_summary.json."""

import json

from rlhf.summary import summary_rows


def _write(root, stage, summary):
    (root / stage / "model").mkdir(parents=True)
    (root / stage / "model" / "rlhf_summary.json").write_text(json.dumps(summary))


def test_sft_then_dpo_rows(tmp_path):
    _write(tmp_path, "sft", {"eval/initial_loss": 6.0, "eval/loss": 1.0})
    _write(tmp_path, "dpo", {"eval/accuracy": 0.8, "eval/gold_reward": 0.54, "initial_eval/gold_reward": 0.4})
    assert summary_rows(tmp_path) == [("SFT eval loss", "6.000 -> 1.000"),
                                      ("DPO held-out preference accuracy", "0.800"),
                                      ("DPO gold reward (held-out)", "0.400 -> 0.540 (+35%)")]


def test_grpo_rows_without_a_reward_model(tmp_path):
    _write(tmp_path, "ppo", {"eval/gold_reward": 0.6, "initial_eval/gold_reward": 0.3, "eval/reward": 0.6,
                             "initial_eval/reward": 0.3, "eval/kl": 0.0})
    assert summary_rows(tmp_path) == [("PPO gold reward (held-out)", "0.300 -> 0.600 (+100%)"),
                                      ("PPO reward (held-out)", "0.300 -> 0.600"),
                                      ("PPO KL to reference (nats/answer)", "0.000")]
