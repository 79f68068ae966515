"""Reward-model stage end to end on CPU with tiny models."""

import json
import random
from pathlib import Path

import pytest
import torch

from rlhf.config import RMConfig, RewardLossConfig, load_config
from rlhf.data.rank_dataset import collate_rank, encode_rank
from rlhf.data.records import Message, RankRecord
from rlhf.models.reward import backbone
from rlhf.training.reward import rank_loss
from stages import rm


def test_a_k4_prompt_costs_4_sequence_passes_not_12(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlhf.config_sections import ModelConfig
    from rlhf.models.reward import load_scalar_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"))
    record = RankRecord([Message("user", "List 2 cats.")], ["cat, lion", "cat", "dog, dog", "owl"], [4.0, 3.0, 2.0, 1.0])
    batch = collate_rank([encode_rank(tok, record, 64, 32)], tok.pad_token_id)
    scored_rows = []
    hook = backbone(model).register_forward_hook(lambda mod, args, kwargs, out: scored_rows.append(kwargs["input_ids"].shape[0]),
                                                 with_kwargs=True)
    loss, scores, stats = rank_loss(model, batch, RewardLossConfig())
    hook.remove()
    assert scored_rows == [4]  # one pass over the 4 answers
    assert stats["num_pairs"].item() == 6  # compared C(4,2) = 6 times
    loss.backward()
    assert model.score.weight.grad is not None


def run_rm(tmp_path: Path, sft_model: Path, train: str, *overrides: str):
    cfg = load_config(
        RMConfig,
        ["configs/rm.yaml"],
        [f"model.path={sft_model}", f"data.train.path={train}", f"output_dir={tmp_path / 'rm'}",
         "logging.progress=false", *overrides],
    )
    return rm.main(cfg)


@pytest.mark.slow
@pytest.mark.core
def test_quickstart_rm_learns_the_gold_preference(quickstart_models):
    assert quickstart_models["rm_metrics"]["eval/accuracy"] >= 0.9
    stats = json.loads((quickstart_models["rm"] / "reward_stats.json").read_text())
    assert stats["count"] > 0 and stats["std"] > 0


@pytest.mark.slow
def test_shuffled_labels_stay_near_chance(tmp_path, quickstart_data, quickstart_models):
    rows = [json.loads(line) for line in open(quickstart_data["rank"])]
    rng = random.Random(0)
    for row in rows:
        rng.shuffle(row["scores"])
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_rm(tmp_path, quickstart_models["sft"], str(shuffled), "train.max_steps=300")
    assert 0.4 <= result.metrics["eval/accuracy"] <= 0.6


@pytest.mark.slow
def test_hh_pairs_train_directly_and_get_a_score_file(tmp_path, shared_datasets, quickstart_models):
    from rlhf.cli import main as cli

    hh = shared_datasets / "hh_rlhf_harmless_pairs.jsonl"
    result = run_rm(tmp_path, quickstart_models["sft"], str(hh), "train.max_steps=10", "data.max_length=256",
                    "data.max_prompt_length=192", "data.eval_fraction=0.05")
    assert result.metrics["eval/pairs"] == 100  # 5% of 2000 rows, one pair each
    out = tmp_path / "scores.jsonl"
    assert cli(["rm", "score", "--model", str(result.model_dir), "--data", str(hh), "--out", str(out),
                "--max-length", "256", "--max-prompt-length", "192", "--batch-size", "32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2000
    assert all(len(r["scores"]) == 2 and all(isinstance(x, float) for x in r["scores"]) for r in rows)
