"""DPO end to end on CPU with tiny models: answer log-probs (both layouts) and the step's loss
and gradients against a hand-assembled reference, the pairs of K-ranked rows, the precomputed
reference, resume, and the learning check on the quickstart task."""

import json
import shutil
import time
from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf.config import DPOConfig, DPOLossConfig, load_config
from rlhf.config_sections import ModelConfig
from rlhf.data.rank_dataset import encode_rank
from rlhf.data.records import Message, RankRecord
from rlhf.lineage import artifact_complete
from rlhf.logging.metrics import read_metrics
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.training.dpo import PreferenceBatches, ReferenceLogps, SampledGold, answer_logps, preference_loss
from rlhf.training.output import FINISHED_MARKER
from stages import dpo

REPO = Path(__file__).resolve().parents[2]

RECORDS = [
    RankRecord([Message("user", "List 2 cats and say why.")], ["cat, lion", "cat", "dog, dog, and a much longer tail"],
               [3.0, 2.0, 1.0]),
    RankRecord([Message("user", "Owls?")], ["owl", "two owls and an eagle"], [1.0, 3.0]),
    RankRecord([Message("user", "Name 4 metals in uppercase.")], ["IRON, GOLD, TIN, LEAD", "IRON", "gold, gold", "TIN, ZINC"],
               [1.0, 0.25, 0.0, 0.5]),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model (its weights nudged so that the policy differs from the reference) and
    its tokenizer, with the RECORDS encoded."""
    cfg = ModelConfig(path=str(tiny_model_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, torch.device("cpu"))
    reference = load_causal_lm(cfg, torch.device("cpu")).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    examples = [encode_rank(tokenizer, r, 64, 32) for r in RECORDS]
    return model, reference, tokenizer, examples


def batches_of(examples, tokenizer, micro=3, share_prompt=True):
    return PreferenceBatches(examples, micro, tokenizer.pad_token_id, seed=0, shuffle=False, share_prompt=share_prompt)


def by_hand_logps(model, examples) -> torch.Tensor:
    """Each answer in a row of its own [prompt, answer], full logits, summed log-softmax of the
    answer tokens only."""
    out = []
    for example in examples:
        for sequence in example.sequences:
            ids = torch.tensor([sequence])
            logprobs = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
            answer = range(example.prompt_length, len(sequence))
            out.append(sum(logprobs[t - 1, sequence[t]] for t in answer))
    return torch.stack(out)


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared_prompt_row", "row_per_answer"])
def test_answer_logprobs_equal_one_row_per_answer_by_hand(tiny, share_prompt):
    model, _, tokenizer, examples = tiny
    batch = batches_of(examples, tokenizer, share_prompt=share_prompt).batch(0, 0)
    assert batch.rank.shares_prompts == share_prompt
    assert batch.rank.input_ids.shape[0] == (3 if share_prompt else 9)  # 3 prompts, 3 + 2 + 4 answers
    # No prompt token is ever a target: the targets are exactly the answers' tokens.
    assert batch.answer_tokens.tolist() == [len(s) - e.prompt_length for e in examples for s in e.sequences]
    got = answer_logps(model, batch)
    expected = by_hand_logps(model, examples)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

    model.zero_grad()
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    by_hand_logps(model, examples).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad()


def test_k_ranked_rows_give_their_untied_pairs_from_one_pass(tiny):
    model, _, tokenizer, examples = tiny
    batch = batches_of(examples, tokenizer).batch(0, 0)
    # C(3,2) = 3, C(2,2) = 1, C(4,2) = 6 untied pairs; (better, worse), numbered over the batch's 9 answers.
    assert batch.rank.pair_index.tolist() == [[0, 1], [0, 2], [1, 2], [4, 3], [5, 6], [5, 7], [5, 8], [6, 7], [8, 6],
                                              [8, 7]]
    assert batch.rank.pair_group.tolist() == [0] * 3 + [1] + [2] * 6
    assert batch.prompts_with_pairs == 3 and batch.num_pairs == 10
    calls = []
    hook = model.model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    preference_loss(model, batch, torch.zeros(9), DPOLossConfig())
    hook.remove()
    assert calls == [batch.rank.input_ids.shape]  # one forward for the 9 answers of 10 pairs
    tied = RankRecord([Message("user", "Owls?")], ["owl", "owls", "an owl", "eagle"], [1.0, 1.0, 0.5, 0.0])
    assert len(tied.pairs()) == 5  # C(4,2) - the one tie


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_loss_and_gradients_equal_the_hand_assembled_dpo_loss(tiny, loss_type):
    model, reference, tokenizer, examples = tiny
    cfg = DPOLossConfig(beta=0.5, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, loss_type=loss_type)
    whole = batches_of(examples, tokenizer, micro=3).batch(0, 0)
    with torch.no_grad():
        ref = answer_logps(reference, whole)

    # By hand: every answer alone, every pair of every prompt, the mean over a prompt's pairs,
    # then over prompts.
    model.zero_grad()
    policy_all = by_hand_logps(model, examples)
    with torch.no_grad():
        ref_all = by_hand_logps(reference, examples)
    torch.testing.assert_close(ref, ref_all, rtol=1e-5, atol=1e-4)
    prompt_losses, start = [], 0
    for example, record in zip(examples, RECORDS):
        k = len(example.sequences)
        lengths = torch.tensor([len(s) - example.prompt_length for s in example.sequences], dtype=torch.float32)
        pol, rf = policy_all[start:start + k], ref_all[start:start + k]
        if loss_type == "ipo":
            pol, rf = pol / lengths, rf / lengths
        pair_losses = []
        for i, j in combinations(range(k), 2):
            if record.scores[i] == record.scores[j]:
                continue
            w, l = (i, j) if record.scores[i] > record.scores[j] else (j, i)
            h = (pol[w] - rf[w]) - (pol[l] - rf[l])
            if loss_type == "sigmoid":
                pair_losses.append(-0.9 * F.logsigmoid(0.5 * h) - 0.1 * F.logsigmoid(-0.5 * h))
            else:
                pair_losses.append((h - 1 / (2 * 0.5)) ** 2)
        prompt_losses.append(torch.stack(pair_losses).mean())
        start += k
    expected = torch.stack(prompt_losses).mean()
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # As a step computes it, in one micro-batch and in two (gradient accumulation over prompts).
    for micro in (3, 2):
        model.zero_grad()
        total = 0.0
        parts = batches_of(examples, tokenizer, micro=micro)
        for index in range(len(parts)):
            batch = parts.batch(0, index)
            loss, _ = preference_loss(model, batch, ref[batch.answer_ids], cfg)
            (loss / 3).backward()
            total += float(loss.detach()) / 3
        assert total == pytest.approx(float(expected), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=f"{micro}: {name}")
    model.zero_grad()


def test_precomputed_reference_equals_the_live_reference(tiny):
    _, reference, tokenizer, examples = tiny
    splits = {"train": PreferenceBatches(examples, 2, tokenizer.pad_token_id, seed=3, shuffle=True, share_prompt=True),
              "eval": batches_of(examples[:1], tokenizer)}
    world = type("World", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()
    live = ReferenceLogps(lambda: reference, False, splits, world)
    loads = []
    pre = ReferenceLogps(lambda: loads.append(1) or reference, True, splits, world)
    for split, batches in splits.items():
        for epoch in (0, 1):  # shuffled micro-batches find their answers in the table
            for batch in batches.epoch(epoch):
                torch.testing.assert_close(pre(split, batch), live(split, batch), rtol=0, atol=1e-6)
    assert loads == [1] and pre.model is None  # loaded once, for the tables, then dropped
    assert pre.tables["train"].shape == (9,) and pre.tables["eval"].shape == (3,)
    # Restored from a checkpoint's state, the tables need no reference model at all.
    restored = ReferenceLogps(lambda: pytest.fail("the reference was loaded on resume"), True, splits, world)
    restored.load_state_dict(pre.state_dict())
    batch = splits["train"].batch(1, 0)
    assert torch.equal(restored("train", batch), pre("train", batch))


def test_sampled_gold_reads_the_held_out_prompts_and_repeats_each_with_its_own_stream(tiny):
    from rlhf.training.dpo import sampled_gold

    model, _, tokenizer, _ = tiny
    cfg = load_config(DPOConfig, [], ["model.path=m", "data.train.path=x.jsonl", "eval.gold_reward=x:y",
                                      "eval.max_prompts=2", "eval.samples_per_prompt=3", "eval.max_new_tokens=5"])
    calls = []

    def gold(prompt, response):
        calls.append((prompt, response))
        return float(len(prompt))

    assert sampled_gold(cfg, None, tokenizer, RECORDS) is None  # no rule: nothing is sampled
    sampler = sampled_gold(cfg, gold, tokenizer, RECORDS)  # no eval.prompts: the held-out ranked prompts
    assert sampler.prompts.texts == ["List 2 cats and say why."] * 3 + ["Owls?"] * 3
    metrics = sampler(model)
    assert [p for p, _ in calls] == sampler.prompts.texts
    assert metrics["eval/gold_reward"] == pytest.approx((24 * 3 + 5 * 3) / 6)
    assert 0 < metrics["eval/response_length"] <= 5
    # The three answers to a prompt come from three streams; the same seed gives the same answers.
    answers = [r for _, r in calls]
    assert len(set(answers[:3])) > 1
    calls.clear()
    assert sampler(model) == metrics and [r for _, r in calls] == answers


def small_rank_file(tmp_path: Path, quickstart_data: dict, rows: int) -> str:
    lines = Path(quickstart_data["rank"]).read_text().splitlines()[:rows]
    path = tmp_path / "rank_small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def dpo_config(out: Path, model: Path, train: str, prompts: str, *overrides: str) -> DPOConfig:
    return load_config(DPOConfig, [str(REPO / "configs" / "dpo.yaml")],
                       [f"model.path={model}", f"data.train.path={train}", f"eval.prompts.path={prompts}",
                        f"output_dir={out}", "logging.progress=false", *overrides])


SHORT_GOLD = ("eval.max_prompts=4", "eval.samples_per_prompt=2", "eval.max_new_tokens=8")


METRICS = ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_logps", "dpo/rejected_logps", "dpo/reward_chosen",
           "dpo/reward_rejected", "dpo/lr", "dpo/grad_norm")


def test_dpo_stage_smoke_logs_every_metric_and_exports_the_policy(tmp_path, quickstart_data, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    train = small_rank_file(tmp_path, quickstart_data, 120)
    result = dpo.main(dpo_config(tmp_path / "run", tiny_model_dir, train, quickstart_data["prompts_eval"],
                                 "train.max_steps=3", "train.eval_every=2", "train.micro_batch_size=4",
                                 "train.global_batch_size=8", "train.lr=1e-3", *SHORT_GOLD))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in METRICS:
        assert key in rows[1], key
    for key in METRICS[:7]:
        assert key.replace("dpo/", "eval/") in rows[2], key
    for key in ("eval/gold_reward", "eval/response_length", "eval/eos_rate"):  # 4 held-out prompts, 2 answers each
        assert key in rows[0] and key in rows[2], key
    assert 0 < rows[0]["eval/response_length"] <= 8
    assert rows[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-5)  # the policy starts as its reference
    assert rows[3]["eval/reward_chosen"] != 0.0  # the policy moved away from its reference
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert sum(p.numel() for p in model.parameters()) > 0
    summary = json.loads((result.model_dir / "rlhf_summary.json").read_text())
    assert summary["eval/loss"] == rows[3]["eval/loss"] and "initial_eval/loss" in summary
    # What the pipeline needs to record the stage's lineage and skip it when up to date: a
    # complete export with the finished-run marker, and a summary of numbers.
    assert artifact_complete(result.model_dir) == (True, "complete")
    assert (tmp_path / "run" / FINISHED_MARKER).is_file()
    assert {k: float(v) for k, v in result.metrics.items()} == summary


def test_resume_with_precomputed_reference_equals_the_straight_run(tmp_path, quickstart_data, tiny_model_dir,
                                                                   monkeypatch):
    train = small_rank_file(tmp_path, quickstart_data, 120)
    short = ("train.max_steps=4", "train.save_every=2", "train.eval_every=2", "train.micro_batch_size=4",
             "train.global_batch_size=8", "train.lr=1e-3", "reference.precompute=true", *SHORT_GOLD)
    prompts = quickstart_data["prompts_eval"]
    dpo.main(dpo_config(tmp_path / "straight", tiny_model_dir, train, prompts, *short))
    # A run stopped after step 2: its directory holds the checkpoint of step 2 (with the tables).
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    (resumed_dir / "checkpoints" / "latest").write_text("step-2")
    kept = [r for r in read_metrics(tmp_path / "straight") if r["step"] <= 2]
    (resumed_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    import rlhf.training.dpo as training_dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("a resumed run with precomputed reference numbers loaded the reference")

    monkeypatch.setattr(training_dpo, "load_causal_lm", no_reference)
    dpo.main(dpo_config(resumed_dir, tiny_model_dir, train, prompts, *short))

    def numbers(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
                for r in read_metrics(run_dir) if r["step"] > 2]

    assert numbers(resumed_dir) == numbers(tmp_path / "straight")
    assert len(numbers(resumed_dir)) == 2 and "eval/gold_reward" in numbers(resumed_dir)[-1]


def test_config_refusals():
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="label_smoothing applies to loss.loss_type=sigmoid"):
        load_config(DPOConfig, [], ["model.path=gpt2", "data.train.path=x.jsonl", "loss.loss_type=ipo",
                                    "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="model.path"):
        load_config(DPOConfig, [], ["model.tiny.hidden_size=32", "data.train.path=x.jsonl"])
    with pytest.raises(ConfigError, match="eval.temperature must be > 0"):
        load_config(DPOConfig, [], ["model.path=gpt2", "data.train.path=x.jsonl", "eval.temperature=0"])
    cfg = load_config(DPOConfig, [str(REPO / "configs" / "dpo.yaml")], [])
    assert cfg.loss.beta == 0.1 and cfg.model.path == "runs/quickstart/sft/model"
    assert cfg.eval.gold_reward == "rlhf.data.quickstart:gold_reward"



def sampled_gold_reward(model_dir: Path, cfg: DPOConfig, seed: int) -> float:
    """Mean gold reward of answers sampled from an exported model to the held-out prompts, as
    the stage's evaluation samples them (`cfg.eval`), with the per-sample random streams of
    `seed`: two models given one seed draw with the same uniform numbers."""
    from rlhf.data.builders import load_records
    from rlhf.data.prompt_dataset import prompt_batch
    from rlhf.data.quickstart import gold_reward
    from rlhf.rollout.engine import SamplingParams

    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)))
    model = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    records, _ = load_records("prompt", cfg.eval.prompts)
    prompts = prompt_batch(tokenizer, records[: cfg.eval.max_prompts], cfg.data.max_prompt_length)
    sampler = SampledGold(prompts.repeated(cfg.eval.samples_per_prompt),
                          SamplingParams(cfg.eval.max_new_tokens, cfg.eval.temperature), gold_reward, tokenizer, seed)
    return sampler(model)["eval/gold_reward"]


GOLD_GAIN = 0.08
"""Least rise of the mean gold reward over the SFT model's (~0.40), pooled over three sampling
streams of 4 answers to each of the 43 held-out prompts. Measured with DPO seeds 42, 1 and 2:
+0.14 (+0.13, +0.13, +0.16 per stream), +0.15 (+0.17, +0.10, +0.17), +0.14 (+0.13, +0.09, +0.18)."""


@pytest.mark.slow
@pytest.mark.core
def test_quickstart_dpo_raises_the_gold_reward_of_sampled_answers_over_sft(tmp_path, quickstart_data,
                                                                            quickstart_models):
    started = time.time()
    cfg = dpo_config(tmp_path, quickstart_models["sft"], quickstart_data["rank"], quickstart_data["prompts_eval"])
    result = dpo.main(cfg)  # the shipped config: 100 steps of 16 prompts, 4 ranked answers each
    seconds = time.time() - started
    # The stage's own evaluation: step 0 samples from the SFT model, the last one from the DPO
    # policy, with the same random numbers; then the two exported models, with two other seeds.
    pairs = [(result.metrics["initial_eval/gold_reward"], result.metrics["eval/gold_reward"])]
    pairs += [(sampled_gold_reward(quickstart_models["sft"], cfg, seed), sampled_gold_reward(result.model_dir, cfg, seed))
              for seed in (1, 2)]
    shown = ", ".join(f"{before:.3f} -> {after:.3f}" for before, after in pairs) + f" (DPO ran {seconds:.0f} s)"
    assert all(after > before for before, after in pairs), shown
    assert sum(after - before for before, after in pairs) / len(pairs) >= GOLD_GAIN, shown
    # The preference itself is learnt: held-out implicit-reward accuracy and margin.
    assert result.metrics["eval/accuracy"] >= 0.7 and result.metrics["eval/margin"] > 0
    assert result.metrics["initial_eval/accuracy"] == 0.0  # the policy started as its reference: no margin yet
