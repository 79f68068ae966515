"""Run inside a loopback-only network namespace (test_vllm_actors.py): GRPO on the arithmetic
prompts from a tiny Llama built from scratch (head size 32, which the CPU engine accepts), on
a private local Ray, with the actor a Ray role group of two FSDP2 workers (gloo) and one vLLM
engine actor of its own (rollout.vllm.placement=actors): rank 0 broadcasts what both ranks
gather, rank 1 samples its share of the prompts from the same engine. The reward is the
answer's share of digits, which differs between the answers of a group from the first
iteration on, so every iteration moves the policy. Writes the run's metrics, and how far the
policy moved, to argv[2] as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def digit_share(prompt: str, response: str, **_) -> float:
    """The share of the response's characters that are digits."""
    return sum(char.isdigit() for char in response) / max(len(response), 1)


def main(root: str, out_path: str) -> None:
    from rlhf.config import PPOConfig, load_config
    from rlhf.config_sections import TinyModelConfig
    from rlhf.data.arithmetic import synthesize
    from rlhf.models.tiny import create_tiny_checkpoint
    from rlhf.logging.metrics import read_metrics
    from rlhf.ray.launch import run_stage_on_ray
    from stages import STAGES

    root_dir = Path(root)
    data = synthesize(root_dir / "data", seed=0)
    texts = [json.loads(line)["prompt"] for line in open(data["prompts"])] + ["Answer: 0123456789"]
    model_dir = create_tiny_checkpoint(TinyModelConfig(hidden_size=64, num_heads=2, intermediate_size=128,
                                                       vocab_size=256), texts, root_dir / "model", seed=0)
    cfg = load_config(PPOConfig, [str(REPO / "configs/arithmetic/grpo.yaml")], [
        f"model.path={model_dir}", f"data.prompts.path={data['prompts']}",
        f"data.eval_prompts.path={data['prompts_eval']}", f"output_dir={root_dir / 'grpo'}", "logging.progress=false",
        "reward.functions=[_vllm_actors_grpo:digit_share]", "ppo.iterations=4", "ppo.eval_every=2",
        "ppo.rollout_batch_size=8", "ppo.mini_batch_size=64", "ppo.micro_batch_size=32", "ppo.actor_lr=3.0e-3",
        "strategy.name=fsdp", "resources.workers_per_node=2", "eval.max_prompts=8", "eval.samples_per_prompt=2",
        "rollout.drop_uniform_groups=false", "rollout.engine=vllm", "rollout.vllm.placement=actors",
        "rollout.vllm.engines=1", "rollout.vllm.kv_cache_gib=0.25", "rollout.vllm.cpus_per_engine=1",
        "ray.enabled=true", "ray.num_cpus=3", "resources.cpus_per_worker=1",
        "ppo.colocate=[[actor,reference],[critic,reward]]"])
    run_stage_on_ray(STAGES["ppo"], cfg)
    rows = read_metrics(root_dir / "grpo")
    with open(out_path, "w") as handle:
        json.dump({"rows": rows, "policy_moved": policy_change(model_dir, root_dir / "grpo" / "model")}, handle)


def policy_change(before: Path, after: Path) -> float:
    """Mean |log-prob change| of a fixed token sequence from the initial to the trained policy:
    how far the updates moved it (each rollout's engine had to follow)."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40).unsqueeze(0)
    logprobs = []
    for directory in (before, after):
        model = AutoModelForCausalLM.from_pretrained(directory).float().eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        logprobs.append(logits.gather(-1, ids[0, 1:, None]).squeeze(-1))
    return float((logprobs[0] - logprobs[1]).abs().mean())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
