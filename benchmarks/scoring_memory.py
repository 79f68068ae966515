"""Peak memory of PPO's scoring phase against the rollout batch size (issue 24, item 3).

    python benchmarks/scoring_memory.py [--model tiny|smollm2] [--batches 8 32 128]
        [--micro-batch-size 8] [--group 1] [--prompt-tokens 64] [--response-tokens 48]

`LocalRoles.score` of a GAE run with every scoring forward on: the actor's old log-probs
(rollout.reuse_logprobs=false), the reference's log-probs, the critic's values and the
reward model's scores, on a synthetic rollout (random tokens; prompts of 1/2..1 and answers of
1/4..1 of their budget, the longest at full width; `--group` consecutive answers per prompt).
Each batch size is scored twice in the same process: `whole`, every role forwarding the whole
batch at once (`RoleForwards()`, what the code did before issue 24), and `pieces`, the roles
as LocalRoles builds them (pieces of ppo.micro_batch_size rows, cut between groups, trimmed).

Measured, per run:
- `peak_mib`: the most bytes held at once by tensors allocated during the scoring call, over
  what was held when it started: the running sum of the CPU allocator's allocations and frees
  as torch.profiler records them (profile_memory=True), every allocation included (the
  kernels' own scratch buffers too). The weights are held before and are not counted.
- `largest_mib`: the largest single tensor any operation outputs (a TorchDispatchMode), in
  practice one forward's float32 (rows, response, vocabulary) logits.
- `seconds`: wall time of the scoring call without the profiler (the median of `--repeats`),
  and `cpu_s` its process CPU time: with `--threads 1` the closer measure of the work done
  where other processes share the cores (wall time then swings by several times).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common

common.add_project_to_path()

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

MIB = 1 << 20


def profiled_peak(fn) -> tuple[int, float]:
    """(peak bytes held over the start, seconds) of `fn()`: the running sum of the profiler's
    allocator records, in time order; on a GPU, the CUDA allocator's own peak."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, started = torch.cuda.memory_allocated(), time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak, seconds


def synthetic_rollout(rows: int, group: int, prompt_tokens: int, response_tokens: int, vocab: int, pad: int,
                      seed: int = 0):
    """Left-padded prompts and right-padded answers of random tokens; rows `group` by `group`
    share their prompt; the first row's prompt and answer are full-length, so every batch
    has the same width."""
    from rlhf.rollout.types import Rollout

    generator = torch.Generator().manual_seed(seed)
    sequences = torch.randint(3, vocab, (rows, prompt_tokens + response_tokens), generator=generator)
    mask = torch.ones_like(sequences)
    for first in range(0, rows, group):
        prompt = prompt_tokens if first == 0 else int(torch.randint(prompt_tokens // 2, prompt_tokens + 1, (1,),
                                                                    generator=generator))
        for row in range(first, min(first + group, rows)):
            sequences[row, :prompt_tokens] = sequences[first, :prompt_tokens]
            answer = response_tokens if row == 0 else int(torch.randint(max(response_tokens // 4, 1),
                                                                        response_tokens + 1, (1,), generator=generator))
            mask[row, prompt_tokens + answer :] = 0
            mask[row, : prompt_tokens - prompt] = 0
    sequences[mask == 0] = pad
    return Rollout(sequences=sequences, attention_mask=mask, prompt_length=prompt_tokens,
                   response_mask=mask[:, prompt_tokens:].float(), eos_found=torch.ones(rows, dtype=torch.bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(common.SCALES))
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--group", type=int, default=1, help="answers per prompt (rollout.n_samples_per_prompt)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timed scoring calls (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlhf.config import PPOConfig, load_config
    from rlhf.data.prompt_dataset import PromptBatch
    from rlhf.distributed.factory import build_strategy
    from rlhf.logging.perf import LargestTensor
    from rlhf.models.loading import load_tokenizer
    from rlhf.roles.roles import RoleForwards
    from rlhf.roles.team import LocalRoles

    policy, reward = common.model_dir(args.model), common.reward_model_dir(args.model)
    largest_batch = max(args.batches)
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        prompts_file = common.write_jsonl([{"prompt": "a b c"}] * 8, Path(tmp) / "prompts.jsonl")
        cfg = load_config(PPOConfig, overrides=[
            f"model.path={policy}", f"reward_model.path={reward}", f"data.prompts.path={prompts_file}",
            f"output_dir={tmp}/run", "ppo.advantage=gae", "kl.coef=0.05", "rollout.reuse_logprobs=false",
            "reward.normalize=none", f"rollout.n_samples_per_prompt={args.group}",
            f"ppo.rollout_batch_size={largest_batch // args.group}", f"ppo.mini_batch_size={largest_batch}",
            f"ppo.micro_batch_size={args.micro_batch_size}", "logging.progress=false"])
        strategy = build_strategy(cfg.strategy)
        strategy.setup(cfg.seed)
        tokenizer = load_tokenizer(cfg.model)
        team = LocalRoles(cfg, strategy, tokenizer)
    roles = [role for role in (team.actor, team.reference, team.critic, team.reward_model) if role is not None]
    pieces = {id(role): role.forwards for role in roles}
    vocab = team.reference.model.config.vocab_size
    rows_out = []
    try:
        for rows in args.batches:
            rollout = synthetic_rollout(rows, args.group, args.prompt_tokens, args.response_tokens, vocab,
                                        tokenizer.pad_token_id)
            prompts = PromptBatch([[0]] * rows, ["p"] * rows, [{}] * rows)
            for mode in ("whole", "pieces"):
                for role in roles:
                    role.forwards = RoleForwards() if mode == "whole" else pieces[id(role)]
                team.score(rollout, prompts)  # warm-up: first-call allocations and caches
                peak, _ = profiled_peak(lambda: team.score(rollout, prompts))
                with LargestTensor() as largest:
                    team.score(rollout, prompts)
                times, cpu_times = [], []
                for _ in range(args.repeats):
                    started, cpu_started = time.perf_counter(), time.process_time()
                    team.score(rollout, prompts)
                    times.append(time.perf_counter() - started)
                    cpu_times.append(time.process_time() - cpu_started)
                seconds, cpu_seconds = common.median(times), common.median(cpu_times)
                rows_out.append({"rollout_batch": rows, "scoring": mode, "peak_mib": peak / MIB,
                                 "largest_mib": largest.bytes / MIB, "seconds": seconds, "cpu_s": cpu_seconds})
                print(rows_out[-1], flush=True)
    finally:
        team.shutdown()
    columns = ["rollout_batch", "scoring", "peak_mib", "largest_mib", "seconds", "cpu_s"]
    common.emit(f"scoring_memory_{args.model}", rows_out, columns,
                {"micro_batch_size": args.micro_batch_size, "threads": torch.get_num_threads(), "group": args.group,
                 "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens, "vocab": vocab})


if __name__ == "__main__":
    main()
