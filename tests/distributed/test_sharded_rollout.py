"""Both rollout engines on a model sharded over 2 ranks (ZeRO-3, FSDP2), with 3 prompts on one
rank and 1 on the other (2 batches against 1) and rows that end at different steps: the run
finishes (a rank that stops calling forward while the other gathers weights hangs both), every
tensor handed to a collective is on the strategy's device, and the samples are those of the
same model in one process.

The decode engine's samples depend on (seed, sample id) alone, so each rank's rows must equal
the rows of one unsharded run over all prompts; the HF engine's depend on the process RNG, so
each rank's must equal an unsharded run over its own prompts from the same seed (the idle
forwards that keep ranks in step draw nothing).

Both engines run with rollout.gather_weights off (every forward gathers the weights, which is
what keeps ranks in step) and on (the default: the strategy gathers each weight once for the
whole `generate` call, and ranks decode on their own): the samples are the same, and the
elements all-gathered during a rollout of T forwards are at most the model's size with it on,
at least T times the transformer blocks' size with it off. ~35 s per strategy on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config_sections import ModelConfig
from rlhf.models.loading import load_causal_lm
from rlhf.rollout.decode import DecodeEngine, SampleSeeds
from rlhf.rollout.engine import HFGenerateEngine
from rlhf.rollout.types import Rollout

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from _sharded_rollout import (ALL_ON_ZERO, BATCH_SIZE, HF_SEED, PARAMS, PROMPTS, SEED, SHARES,  # noqa: E402
                              STRATEGIES)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS"}


def rows(rollout: Rollout) -> list[tuple[list[int], list[int], list[float]]]:
    """Each row as (prompt tokens, response tokens, response log-probs), padding removed."""
    out = []
    for r in range(rollout.sequences.shape[0]):
        prompt_mask = rollout.attention_mask[r, : rollout.prompt_length].bool()
        length = int(rollout.response_mask[r].sum())
        logprobs = [] if rollout.logprobs is None else rollout.logprobs[r, :length].tolist()
        out.append((rollout.sequences[r, : rollout.prompt_length][prompt_mask].tolist(),
                    rollout.responses[r, :length].tolist(), logprobs))
    return out


def assert_same_rows(got: Rollout, want: Rollout) -> None:
    got_rows, want_rows = rows(got), rows(want)
    assert [(p, t) for p, t, _ in got_rows] == [(p, t) for p, t, _ in want_rows]
    for (_, _, a), (_, _, b) in zip(got_rows, want_rows):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """The tiny model with its EOS made likely enough that rows end at different steps (it
    almost never samples EOS: its next-token logits spread over ~0.1), saved for the workers,
    and the prompts: EOS's output row (tied to its embedding) points along the mean final
    hidden state of the prompts, scaled to a logit of about 3."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_causal_lm(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"))
    ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        hidden = torch.cat([model.model(input_ids=torch.tensor([p])).last_hidden_state[0] for p in ids]).mean(0)
        model.lm_head.weight[eos] = hidden * (3.0 / hidden.dot(hidden))
    model_dir = tmp_path_factory.mktemp("eos_likely") / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model, tokenizer, ids, eos, model_dir


def hf_reference(model, eos: int, pad: int, prompts: list[list[int]], seed: int) -> Rollout:
    """The unsharded HF engine over `prompts` from `seed`, the process RNG left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return HFGenerateEngine(model, eos, pad, BATCH_SIZE).generate(prompts, PARAMS)


def batch_steps(rollout: Rollout) -> list[int]:
    """Decode steps each batch of BATCH_SIZE rows runs (until its longest row ends)."""
    lengths = rollout.response_mask.sum(-1).long().tolist()
    return [max(lengths[i : i + BATCH_SIZE]) for i in range(0, len(lengths), BATCH_SIZE)]


def launch(name: str, model_dir: Path, out: Path, eos: int) -> dict[int, dict]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_sharded_rollout.py"), name, str(model_dir), str(out), str(eos)]
    try:  # a hang (ranks out of step) shows as a timeout
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name}: the sharded rollout did not finish in 300 s (ranks out of step?)\n{exc.stderr}")
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.mark.parametrize("name", STRATEGIES)
def test_sharded_rollout_keeps_ranks_in_step_on_the_strategys_device(tmp_path, setup, name):
    model, tokenizer, ids, eos, model_dir = setup
    pad = tokenizer.pad_token_id
    reference = DecodeEngine(model, eos, pad, BATCH_SIZE, llama_step=False).generate(
        ids, PARAMS, seeds=SampleSeeds(SEED, range(len(ids)), len(ids)))
    hf_wanted = {rank: hf_reference(model, eos, pad, [ids[i] for i in SHARES[rank]], HF_SEED + rank)
                 for rank in SHARES}
    # Guards the setup: rows end at different steps, and with each engine one rank's rows end
    # before the other's (the rank that ends first must keep joining in). The HF engine keeps
    # the prompts' order, so its batches are consecutive rows; the decode engine sorts them.
    lengths = reference.response_mask.sum(-1).long()
    longest = [int(lengths[SHARES[rank]].max()) for rank in SHARES]
    hf_steps = [batch_steps(hf_wanted[rank]) for rank in SHARES]
    assert len(set(lengths.tolist())) > 1 and longest[0] != longest[1], lengths
    assert hf_steps[0][0] != hf_steps[1][0], hf_steps

    results = launch(name, model_dir, tmp_path, eos)

    for rank, result in results.items():
        # Every collective (the engines' flags, the engine's weight gathers) on the strategy's device.
        assert result["wrong"] == [], f"rank {rank}: collectives on another device: {result['wrong'][:5]}"
        # The recorder saw the engines' flags, and the forwards gathered weights (collective forwards).
        assert result["calls"].get("all_reduce", 0) > 0, result["calls"]
        assert sum(n for op, n in result["calls"].items() if "all_gather" in op) > 0, result["calls"]
        # The decode engine: the rows of the unsharded run over all prompts.
        assert_same_rows(result["decode"], reference.select(torch.tensor(SHARES[rank], dtype=torch.long)))
        lopsided = torch.tensor(ALL_ON_ZERO[rank], dtype=torch.long)
        if len(lopsided):
            assert_same_rows(result["decode_lopsided"], reference.select(lopsided))
        else:  # nothing of its own: it only joined rank 0's forwards
            assert result["decode_lopsided"].sequences.shape[0] == 0
        # The HF engine: the unsharded engine over this rank's prompts, same seed.
        assert_same_rows(result["hf"], hf_wanted[rank])

        # rollout.gather_weights (the default): the same samples, each weight gathered once
        # for the call (padding of the shards aside), where every forward gathered the
        # transformer blocks' weights again without it.
        assert_same_rows(result["decode_gathered"], reference.select(torch.tensor(SHARES[rank], dtype=torch.long)))
        assert_same_rows(result["hf_gathered"], hf_wanted[rank])
        weights, blocks, gathers = result["weights"], result["block_weights"], result["gathers"]
        for call in ("decode_gathered", "hf_gathered"):  # (generate's decode steps bypass the model's hooks)
            assert blocks <= gathers[call][0] <= 1.01 * weights, (call, gathers, weights)
        assert gathers["decode_gathered"][1] >= PARAMS.max_new_tokens, gathers
        elements, forwards = gathers["decode"]
        assert forwards >= PARAMS.max_new_tokens and elements >= forwards * blocks, (gathers, blocks)
    # Kept in step, both ranks run the forwards of the longer one; with whole weights each runs
    # only its own (the rows end at different steps on each rank: fewer on one of them).
    in_step, alone = ([results[rank]["gathers"][call][1] for rank in (0, 1)] for call in ("decode", "decode_gathered"))
    assert in_step[0] == in_step[1] >= max(alone) and min(alone) < in_step[0], (in_step, alone)
