"""The same PPO run with one worker and with two (torchrun): the adaptive β, the running reward
moments, the KL, the losses and the trained actor agree up to float rounding.

What this guards: each worker rolls out its share of the prompts, and the shares are joined into
the global batch before rewards (rlhf/training/ppo.py), so the KL that drives the adaptive
controller and the running moments that normalise the rewards are those of the global batch.
Before that, each worker updated β from its local KL and kept its own reward moments; on the
8-sample batches here a worker's 4-sample KL and moments differ from the global ones by ~10%,
three orders of magnitude above the tolerances below.

Which run covers which cell of {GAE PPO, GRPO} x {ZeRO-3, FSDP2} x {decode, hf engine}, each
against one worker: GAE PPO with the decode engine in test_two_workers_match_one_worker[zero3]
and [fsdp]; GRPO with the decode engine in test_critic_free_estimators_...[grpo-zero3-fsdp]
(both strategies); both advantages with the hf engine, greedy, in
test_hf_engine_with_two_sharded_workers_matches_one_worker[gae] and [grpo] (both strategies).

Setup (~40 s on 2 cores): the tiny model after 60 SFT steps (so that it emits EOS and responses
have different lengths, which makes the workers' token counts differ), as actor, reference,
reward model and critic; 4 iterations of 8 prompts, mini-batches of 4, 2 epochs, the decode
engine (each sample's randomness depends on (seed, iteration, global sample id) only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.logging.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS"}
ENGINES = {"zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"], "fsdp": ["strategy.name=fsdp"]}

# kl.horizon = 16 with 8 samples per iteration: a clipped update moves β by exactly ±10%
# (e = ±0.2 times n/h = 0.5); one in between is driven by the measured KL itself. The target
# sits near the KL of iteration 3 (~0.77) so that β_4 comes from an unclipped update.
HORIZON, BATCH = 16, 8
PPO = ["ppo.iterations=4", "ppo.eval_every=100", "ppo.sample_every=0", "train.save_every=0",
       f"ppo.rollout_batch_size={BATCH}", "ppo.mini_batch_size=4", "ppo.micro_batch_size=1", "ppo.ppo_epochs=2",
       "ppo.actor_lr=1e-2", "rollout.engine=decode", "rollout.max_new_tokens=8", "reward.normalize=running",
       "kl.adaptive=true", "kl.coef=0.2", "kl.target=0.7", f"kl.horizon={HORIZON}",
       "eval.max_prompts=2", "eval.samples_per_prompt=1", "logging.progress=false"]
# micro_batch_size=1: the logged losses and policy statistics are means of per-micro-batch means
# (rlhf/roles/roles.py, see test_logged_policy_loss_does_not_depend_on_the_worker_layout in
# tests/training/test_ppo_glue.py); with one sample per micro-batch those means do not depend on
# how samples are grouped, so they are comparable across layouts. The optimised loss is the
# same for any micro-batch size (the exported weights below check that too).

# Metrics compared at every step. Discrete ones (the sampled tokens) must be identical.
SAME = ("ppo/response_length", "ppo/eos_rate", "eval/response_length", "eval/eos_rate")
# Continuous ones within float32 rounding: the layouts sum gradients in different orders (one
# process accumulates 4 micro-batches; two workers accumulate 2 each, then all-reduce), and the
# rollout forwards see different batch shapes and padding. Measured: at most 2.5e-6 relative
# after 4 iterations (16 Adam steps per model at lr 1e-2, which amplify rounding). rel 1e-4
# leaves a 40x margin; abs 1e-6 covers values that are rounding noise themselves (ppo/kl of the
# first rollout is ~3e-7: the actor still equals the reference).
CLOSE = ("ppo/kl_coef", "ppo/reward_raw", "ppo/reward_normalized", "ppo/kl", "ppo/policy_loss", "ppo/value_loss",
         "ppo/actor_grad_norm", "ppo/critic_grad_norm", "eval/kl", "eval/reward")
REL, ABS = 1e-4, 1e-6
# The batch mean of the normalised reward is 0 up to rounding, which normalising divides by the
# scores' small std: under ZeRO-3 the reference and reward model are sharded too, and their
# linears take F.linear where the whole models of one process take the few-rows kernel
# (rlhf/kernels/cpu_linear.py), so that noise reached 2.8e-6 (against 4e-7) on the greedy runs below.
SHARDED_NOISE_ABS = {"ppo/reward_normalized": 1e-5}


def _run(args: list[str], what: str, threads_one: bool = True) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads_one:  # torchrun sets it per worker itself
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, quickstart_data, tiny_model_dir) -> Path:
    """The tiny model after 60 SFT steps (~10 s): it has learnt to end answers with EOS."""
    out = tmp_path_factory.mktemp("ppo_workers_sft")
    _run(["-m", "rlhf", "sft", "--config", str(REPO / "configs" / "sft.yaml"), f"output_dir={out}",
          f"model.path={tiny_model_dir}", "model.tiny=null", f"data.train.path={quickstart_data['sft']}",
          "data.pretrain.path=''", "train.max_steps=60", "train.micro_batch_size=16", "train.global_batch_size=16",
          "train.eval_every=0", "logging.progress=false"], "sft")
    return out / "model"


def ppo_args(model: Path, data: dict, out: Path) -> list[str]:
    return ["-m", "rlhf", "ppo", "--config", str(REPO / "configs" / "ppo.yaml"), f"output_dir={out}",
            f"model.path={model}", f"reward_model.path={model}", f"data.prompts.path={data['prompts']}",
            f"data.eval_prompts.path={data['prompts_eval']}", f"data.pretrain.path={data['pretrain']}", *PPO]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, sft_model, quickstart_data) -> Path:
    out = tmp_path_factory.mktemp("ppo_one_worker")
    _run([*ppo_args(sft_model, quickstart_data, out), "strategy.name=single"], "ppo with one worker")
    return out


def by_step(run_dir: Path) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    for row in read_metrics(run_dir):
        steps.setdefault(row["step"], {}).update(row)
    return steps


def final_kl_coef(run_dir: Path) -> float:
    return json.loads((run_dir / "model" / "rlhf_summary.json").read_text())["kl_coef"]


def test_the_one_worker_run_exercises_what_the_comparison_needs(one_worker):
    """Guards the setup: an unclipped β update, responses of different lengths, a moving KL."""
    steps = by_step(one_worker)
    assert sorted(steps) == [0, 1, 2, 3, 4]
    betas = [steps[s]["ppo/kl_coef"] for s in (1, 2, 3, 4)] + [final_kl_coef(one_worker)]
    moves = [b / a - 1 for a, b in zip(betas, betas[1:])]
    clipped = 0.2 * BATCH / HORIZON
    assert all(abs(m) <= clipped + 1e-9 for m in moves), moves
    assert any(abs(m) < clipped - 1e-3 for m in moves), (
        f"every β update was clipped ({moves}): the trajectory no longer depends on the KL's value; retune kl.target")
    assert any(0 < steps[s]["ppo/eos_rate"] < 1 for s in (1, 2, 3, 4)), "all responses have the same length"
    assert max(steps[s]["ppo/kl"] for s in (2, 3, 4)) > 0.1


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_two_workers_match_one_worker(tmp_path, one_worker, sft_model, quickstart_data, engine):
    """GAE PPO (actor and critic trained) with the decode engine. zero3 and fsdp shard both
    models: the rollout gathers the actor's weights once (rollout.gather_weights), and the
    critic's value forwards and updates accumulate 2 micro-batches per step on each worker."""
    two = tmp_path / engine
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          *ppo_args(sft_model, quickstart_data, two), *strategy_args(engine, tmp_path)],
         f"ppo with two workers ({engine})", threads_one=False)
    single, double = by_step(one_worker), by_step(two)
    assert sorted(double) == sorted(single)

    # In training order, so that the first divergence is the first message.
    diverged = []
    for step in sorted(single):
        for key in SAME + CLOSE:
            if key not in single[step]:
                continue
            a, b = single[step][key], double[step].get(key)
            ok = a == b if key in SAME else b is not None and b == pytest.approx(a, rel=REL, abs=ABS)
            if not ok:
                diverged.append(f"step {step} {key}: one worker {a!r}, two workers {b!r}")
    assert not diverged, "two workers diverge from one:\n" + "\n".join(diverged)

    # The β trajectory, including the update after the last iteration (β moves by 0.5·Δe·β per
    # unit of KL/target, so a 1e-6 KL difference is ~1e-7 of β).
    assert final_kl_coef(two) == pytest.approx(final_kl_coef(one_worker), rel=1e-5)
    # The trained actors: the same weights up to rounding (they moved by ~0.1 from the SFT model).
    a, b = load_file(one_worker / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    start = load_file(sft_model / "model.safetensors")
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert worst < 1e-4 < 1e-2 < moved, f"max weight difference {worst:.2e} (moved {moved:.2e})"


@pytest.mark.parametrize(("advantage", "engines"), [("grpo", ("zero3", "fsdp")), ("reinforce_pp", ("zero2",))],
                         ids=["grpo-zero3-fsdp", "reinforce_pp-zero2"])
def test_critic_free_estimators_with_two_workers_match_one_worker(tmp_path, sft_model, quickstart_data, advantage,
                                                                  engines):
    """Groups of 2 answers per prompt, split over workers by prompt: the group statistics
    (grpo) and REINFORCE++'s whitening over the global batch see every worker's samples. GRPO
    runs on 2 workers under ZeRO-3 and under FSDP2 (the actor sharded, its rollout gathered
    once), REINFORCE++ under ZeRO-2; each against one worker, with the decode engine."""
    groups = [f"ppo.advantage={advantage}", "rollout.n_samples_per_prompt=2", f"ppo.rollout_batch_size={BATCH // 2}",
              "ppo.actor_lr=2e-3"]  # lower than PPO's: whitening over 8 samples amplifies rounding at 1e-2
    runs = {}
    for name, launch, engine in (("one", [], ["strategy.name=single"]),
                                 *((name, TORCHRUN, strategy_args(name, tmp_path)) for name in engines)):
        runs[name] = tmp_path / name
        args = [*launch, *ppo_args(sft_model, quickstart_data, runs[name]), *groups, *engine]
        _run(args, f"{advantage} with {name} worker(s)", threads_one=not launch)
    single = by_step(runs["one"])
    assert sorted(single) == [0, 1, 2, 3, 4]
    assert "ppo/value_loss" not in single[4] and "ppo/advantage_std" in single[4]
    for name in engines:
        double = by_step(runs[name])
        assert sorted(double) == sorted(single)
        for step in sorted(single):
            for key in SAME + CLOSE + ("ppo/advantage_std", "ppo/group_reward_std_mean"):
                if key in single[step]:
                    a, b = single[step][key], double[step].get(key)
                    assert (a == b) if key in SAME else (b is not None and b == pytest.approx(a, rel=REL, abs=ABS)), \
                        f"{name}, step {step} {key}: one worker {a!r}, two workers {b!r}"


def _compare(single: dict[int, dict], double: dict[int, dict], what: str) -> None:
    """Every SAME metric equal and every CLOSE one within REL/ABS, at every step."""
    assert sorted(double) == sorted(single)
    diverged = []
    for step in sorted(single):
        for key in SAME + CLOSE:
            if key in single[step]:
                a, b = single[step][key], double[step].get(key)
                tolerance = SHARDED_NOISE_ABS.get(key, ABS)
                ok = a == b if key in SAME else b is not None and b == pytest.approx(a, rel=REL, abs=tolerance)
                if not ok:
                    diverged.append(f"step {step} {key}: {a!r} against {b!r}")
    assert not diverged, f"{what} diverge:\n" + "\n".join(diverged)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def zero3(directory: Path) -> list[str]:
    """ZeRO-3 that partitions every weight: by default parameters under 100k elements (all of
    the tiny model's) stay whole on every rank, and the forwards would gather nothing."""
    raw = directory / "zero3.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return ["strategy.name=deepspeed", "strategy.zero_stage=3", f"strategy.deepspeed_config={raw}"]


def strategy_args(name: str, directory: Path) -> list[str]:
    """The overrides of a 2-worker strategy: zero2, zero3 (every weight partitioned) or fsdp."""
    return zero3(directory) if name == "zero3" else ENGINES[name]


HF = ["rollout.engine=hf", "rollout.batch_size=3", "rollout.max_new_tokens=16", "ppo.iterations=2",
      "ppo.actor_lr=2e-3"]
"""The HF engine on the actor, in batches of 3 prompts: each worker runs a full and a partial one."""


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_hf_engine_with_two_sharded_workers_matches_one_worker(tmp_path, sft_model, quickstart_data, advantage):
    """rollout.engine=hf on 2 workers under ZeRO-3 and under FSDP2, each against one process:
    GAE PPO (actor and critic sharded and trained) and GRPO. The HF engine samples from the
    process RNG, whose stream depends on the layout, so sampling is greedy here
    (rollout.top_k=1; PPO still scores the unfiltered distribution): the same answers on any
    layout, and the metrics must agree as above. Under grpo the two answers of a group are then
    equal (zero advantages): that case checks the sharded sampling of groups, the rewards and
    the KL; gae also the updates of both models. (Greedy answers of this model all run to the
    limit; answers that end at different steps on each worker are the next test's.)"""
    hf = [*HF, "rollout.top_k=1", f"ppo.advantage={advantage}"]
    if advantage == "grpo":
        hf += ["rollout.n_samples_per_prompt=2", f"ppo.rollout_batch_size={BATCH // 2}"]
    runs = {}
    for name, launch, engine in (("one", [], ["strategy.name=single"]),
                                 ("zero3", TORCHRUN, zero3(tmp_path)), ("fsdp", TORCHRUN, ENGINES["fsdp"])):
        runs[name] = tmp_path / name
        _run([*launch, *ppo_args(sft_model, quickstart_data, runs[name]), *hf, *engine],
             f"{advantage} with the hf engine on {name}", threads_one=not launch)
    single = by_step(runs["one"])
    assert sorted(single) == [0, 1, 2]
    assert ("ppo/value_loss" in single[2]) == (advantage == "gae")
    for name in ("zero3", "fsdp"):
        _compare(single, by_step(runs[name]), f"one worker and two {name} workers (hf engine, greedy)")


def test_hf_engine_sampling_under_zero3_matches_zero2(tmp_path, sft_model, quickstart_data):
    """GRPO sampling with the HF engine (temperature 1) on 2 workers, ZeRO-3 against ZeRO-2:
    the same layout, so each worker draws the same random stream for the same prompts, and
    only ZeRO-3 shards the weights. Its answers end at different steps on each worker, so under
    ZeRO-3 with rollout.gather_weights=false the worker that ends first must keep joining the
    other's forwards (synced_gpus); with the default the weights are gathered once per rollout
    and each worker generates on its own. Either way the runs sample the same answers and agree
    on every metric."""
    groups = [*HF, "ppo.advantage=grpo", "rollout.n_samples_per_prompt=2", f"ppo.rollout_batch_size={BATCH // 2}"]
    runs = {}
    for name, engine in (("zero2", ["strategy.name=deepspeed", "strategy.zero_stage=2"]),
                         ("zero3_in_step", [*zero3(tmp_path), "rollout.gather_weights=false"]),
                         ("zero3_gathered", zero3(tmp_path))):
        runs[name] = tmp_path / name
        _run([*TORCHRUN, *ppo_args(sft_model, quickstart_data, runs[name]), *groups, *engine],
             f"grpo with the hf engine under {name}", threads_one=False)
    whole = by_step(runs["zero2"])
    rates = [whole[s]["ppo/eos_rate"] for s in (1, 2)]
    assert any(0 < rate < 1 for rate in rates), f"all answers end alike (EOS rates {rates}): nothing to keep in step"
    for name in ("zero3_in_step", "zero3_gathered"):
        _compare(whole, by_step(runs[name]), f"ZeRO-2 and {name} (hf engine, sampled)")
