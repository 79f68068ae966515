"""The engines' side of keeping sharded ranks in step (ZeRO-3, FSDP2), in one process: the
model looks sharded over 2 ranks, the other rank is scripted through a fake world, and every
tensor handed to a `torch.distributed` collective is checked against the world's device.

The decode engine's world declares the `meta` device: a collective that the engine ran itself
on a tensor made on the CPU (what decode.py once did; NCCL rejects it on a GPU run) is caught
on a CPU-only machine. tests/distributed/test_sharded_rollout.py runs the real thing on 2 ranks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.rollout.decode import DecodeEngine, SampleSeeds
from rlhf.rollout.engine import HFGenerateEngine, SamplingParams

PAD, VOCAB = 0, 64
PROMPTS = [[5, 9, 17, 3], [40, 41], [7, 7, 7, 7, 8], [60, 2, 33]]
PARAMS = SamplingParams(max_new_tokens=10, temperature=1.0)
SEED, EOS = 5, 47
"""Token 47 as EOS: with seed 5 the batch of prompts 3 and 1 (longest first, 2 a batch) ends
after 5 and 8 tokens, the batch of prompts 2 and 0 runs all 10 steps."""
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all",
               "all_to_all_single", "gather", "scatter")


def tiny_llama() -> LlamaForCausalLM:
    """Peaked next-token distributions (init 0.5)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                         eos_token_id=1, bos_token_id=None, initializer_range=0.5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def looking_sharded(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same model, its parameters marked as ZeRO-3 partitions (what `is_sharded` checks)."""
    next(model.parameters()).ds_id = 0
    return model


class PartnerWorld:
    """Rank 0 of 2, the other rank scripted: asked to reduce any value with "max", the other
    rank answers `partner` (0: it has no batches and nothing running; 3: it has 3 batches and
    its rows keep running). Records what it was asked."""

    def __init__(self, device: torch.device, partner: float, gathers: bool = False):
        self.device, self.partner, self.gathers = device, partner, gathers
        self.rank, self.world_size = 0, 2
        self.asked: list[tuple[dict[str, float], str]] = []
        self.gathered = 0
        """Times `gathered_for_generation` was entered."""

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        assert op == "max", op
        self.asked.append((dict(values), op))
        return {key: max(float(value), self.partner) for key, value in values.items()}

    @contextmanager
    def gathered_for_generation(self, model: torch.nn.Module) -> Iterator[bool]:
        """With `gathers`, what ZeRO-3 / FSDP2 report after gathering the weights; else what
        an engine that leaves them sharded reports, so that the ranks keep in step."""
        self.gathered += 1
        yield self.gathers


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return tensors_in(list(value.values()))
    return []


@pytest.fixture
def two_ranks(monkeypatch) -> list[tuple[str, list[torch.device]]]:
    """torch.distributed reports a 2-rank process group; each tensor collective records the
    devices of the tensors it is handed and leaves them as they are (the reduction of a rank
    whose partner contributes nothing more)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    handed: list[tuple[str, list[torch.device]]] = []

    def recording(name: str):
        def collective(*args, **kwargs):
            handed.append((name, [t.device for t in tensors_in([args, kwargs])]))

        return collective

    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, recording(name))
    return handed


def decode(model, world=None, prompts=PROMPTS, batch_size=2):
    engine = DecodeEngine(model, EOS, PAD, batch_size=batch_size, llama_step=False, world=world)
    return engine.generate(prompts, PARAMS, seeds=SampleSeeds(SEED, range(len(prompts)), len(prompts)))


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_decode_engine_keeps_in_step_through_the_world_and_hands_no_collective_a_cpu_tensor(two_ranks):
    reference = decode(tiny_llama())  # one process, nothing sharded
    assert reference.response_lengths.tolist() == [10, 8, 10, 5]  # guards the setup (see EOS)
    world = PartnerWorld(torch.device("meta"), partner=0.0)
    rollout = decode(looking_sharded(tiny_llama()), world)
    # Every collective the engine ran went through the world; any it ran itself got a tensor on
    # the world's device (the old engine all-reduced a CPU tensor here).
    wrong = [(name, devices) for name, devices in two_ranks if any(d != world.device for d in devices)]
    assert wrong == []
    assert world.asked, "the engine never asked the world: sharded ranks would not keep in step"
    assert torch.equal(rollout.sequences, reference.sequences)
    torch.testing.assert_close(rollout.logprobs, reference.logprobs, rtol=0, atol=1e-6)


def test_a_rank_with_fewer_batches_and_earlier_ends_runs_as_many_forwards_as_the_other(two_ranks):
    """The other rank has 3 batches whose rows run all 10 steps: this rank, with 2 batches (one
    of whose rows all end early), runs 3 x 10 forwards (a prompt pass and 9 steps per batch)."""
    model = looking_sharded(tiny_llama())
    forwards = count_forwards(model)
    rollout = decode(model, PartnerWorld(torch.device("cpu"), partner=3.0))
    assert forwards[0] == 3 * PARAMS.max_new_tokens
    assert torch.equal(rollout.sequences, decode(tiny_llama()).sequences)  # idle forwards change no sample


def test_a_rank_without_prompts_joins_the_others_forwards_and_returns_no_rows(two_ranks):
    model = looking_sharded(tiny_llama())
    forwards = count_forwards(model)
    rollout = decode(model, PartnerWorld(torch.device("cpu"), partner=3.0), prompts=[])
    assert forwards[0] == 3 * PARAMS.max_new_tokens
    assert rollout.sequences.shape[0] == 0 and rollout.logprobs.shape[0] == 0


def test_a_sharded_model_without_a_world_is_refused_instead_of_hanging(two_ranks):
    for engine in (DecodeEngine(looking_sharded(tiny_llama()), EOS, PAD),
                   HFGenerateEngine(looking_sharded(tiny_llama()), EOS, PAD)):
        with pytest.raises(RuntimeError, match="world"):
            engine.generate(PROMPTS, PARAMS)


def test_the_hf_engine_generates_with_synced_gpus_and_joins_the_other_ranks_batches(two_ranks):
    """One batch of its own, three on the other rank: three `generate` calls, each with
    synced_gpus=True (transformers then reduces its flag on the inputs' device, the model's)."""
    model = looking_sharded(tiny_llama())
    calls: list[dict] = []
    generate = model.generate

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    model.generate = recorded
    world = PartnerWorld(torch.device("cpu"), partner=3.0)
    torch.manual_seed(11)
    rollout = HFGenerateEngine(model, EOS, PAD, batch_size=len(PROMPTS), world=world).generate(PROMPTS, PARAMS)
    assert [c.get("synced_gpus") for c in calls] == [True, True, True]
    flags = [devices for name, devices in two_ranks if name == "all_reduce"]
    assert flags and all(d == world.device for devices in flags for d in devices)
    torch.manual_seed(11)
    alone = HFGenerateEngine(tiny_llama(), EOS, PAD, batch_size=len(PROMPTS)).generate(PROMPTS, PARAMS)
    assert torch.equal(rollout.sequences, alone.sequences)  # the throw-away batches came after its own


def test_an_unsharded_model_generates_without_synced_gpus_or_collectives(two_ranks):
    """ZeRO-1/2 and the single process: every rank generates on its own."""
    model = tiny_llama()
    calls: list[dict] = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(kwargs) or generate(*args, **kwargs)
    world = PartnerWorld(torch.device("cpu"), partner=3.0)
    HFGenerateEngine(model, EOS, PAD, batch_size=2, world=world).generate(PROMPTS, PARAMS)
    decode(tiny_llama(), world)
    assert [c.get("synced_gpus") for c in calls] == [False, False]
    assert world.asked == [] and two_ranks == []


def test_with_weights_gathered_for_the_call_a_rank_generates_on_its_own(two_ranks):
    """rollout.gather_weights: the world gathers once per generate call; the forwards are then
    local, so the engines ask no flags, run only their own forwards (no idle batches for the
    other rank's 3), and the HF engine needs no synced_gpus; the samples stay the same."""
    world = PartnerWorld(torch.device("cpu"), partner=3.0, gathers=True)
    model = looking_sharded(tiny_llama())
    forwards = count_forwards(model)
    rollout = decode(model, world)
    assert torch.equal(rollout.sequences, decode(tiny_llama()).sequences)
    assert forwards[0] == 10 + 8  # batch (2, 0) runs all 10 steps, batch (3, 1) ends after 8
    calls: list[dict] = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(kwargs) or generate(*args, **kwargs)
    HFGenerateEngine(model, EOS, PAD, batch_size=2, world=world).generate(PROMPTS, PARAMS)
    assert [c.get("synced_gpus") for c in calls] == [False, False]
    assert world.gathered == 2 and world.asked == [] and two_ranks == []
