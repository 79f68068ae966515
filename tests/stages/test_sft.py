"""End-to-end SFT on CPU with tiny models: it learns, exports loadable weights, is seeded."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import SFTConfig, load_config
from rlhf.logging.metrics import read_metrics
from stages import sft

TINY = ["model.tiny={}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=400"]


def run_sft(tmp_path: Path, train_path: str, *overrides: str):
    cfg = load_config(
        SFTConfig,
        [],
        [f"data.train.path={train_path}", f"output_dir={tmp_path / 'run'}", "logging.progress=false",
         "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=3e-3", "train.eval_every=0",
         "data.max_length=128", "data.max_prompt_length=64", *TINY, *overrides],
    )
    return cfg, sft.main(cfg)


@pytest.mark.slow
@pytest.mark.core
def test_quickstart_sft_learns_and_exports_same_logits(tmp_path, quickstart_data):
    cfg, result = run_sft(tmp_path, quickstart_data["sft"], "train.epochs=2")
    initial, final = result.metrics["eval/initial_loss"], result.metrics["eval/loss"]
    assert final <= 0.7 * initial, f"eval loss fell only from {initial:.3f} to {final:.3f}"

    run_dir = Path(cfg.output_dir)
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0]
    assert {"sft/loss", "sft/lr", "sft/grad_norm", "perf/tokens_per_s"} <= set(rows[1])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "model" / "rlhf_config.yaml").is_file()
    assert list((run_dir / "model").glob("*.safetensors")) and not list((run_dir / "model").glob("*.bin"))

    # The export reloads with plain transformers and gives the trained model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    ids = tokenizer(["List 3 fruits in uppercase.", "Name 2 birds, in lowercase."], return_tensors="pt", padding=True)
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, result.model(**ids).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_same_seed_gives_the_same_run_and_another_seed_does_not(tmp_path, quickstart_data):
    losses = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg, _ = run_sft(tmp_path / name, quickstart_data["sft"], "train.max_steps=6", f"seed={seed}")
        losses.append([r["sft/loss"] for r in read_metrics(cfg.output_dir) if "sft/loss" in r])
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.slow
def test_length_grouped_batches_train(tmp_path, monkeypatch, quickstart_data):
    from rlhf.data import sft_dataset

    spreads = []  # longest minus shortest example of every padded micro-batch
    collate = sft_dataset.collate_padded

    def recording_collate(examples, pad_token_id):
        lengths = [len(e.input_ids) for e in examples]
        spreads.append(max(lengths) - min(lengths))
        return collate(examples, pad_token_id)

    monkeypatch.setattr(sft_dataset, "collate_padded", recording_collate)
    cfg, result = run_sft(tmp_path, quickstart_data["sft"], "train.max_steps=20", "data.group_by_length=true",
                          "data.padding_free=false")
    assert result.metrics["eval/loss"] < result.metrics["eval/initial_loss"]
    # Training micro-batches held examples of close lengths (eval batches are not grouped).
    assert spreads and sorted(spreads)[len(spreads) // 2] <= 4, spreads


@pytest.mark.slow
def test_packing_and_lora_run_and_merge_on_export(tmp_path, quickstart_data):
    cfg, result = run_sft(tmp_path, quickstart_data["sft"], "train.max_steps=30", "data.packing=true",
                          "model.lora.r=8", "model.lora.alpha=16", "train.lr=1e-2")
    assert result.metrics["eval/loss"] < result.metrics["eval/initial_loss"]
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert "peft" not in json.dumps(saved).lower()
    assert not (result.model_dir / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_self_instruct_seed_tasks_train_without_conversion(tmp_path, shared_datasets):
    _, result = run_sft(tmp_path, str(shared_datasets / "self_instruct_seed_tasks.jsonl"), "train.max_steps=30",
                        "data.max_length=256", "data.max_prompt_length=128", "data.eval_fraction=0.1")
    assert result.metrics["eval/loss"] < 0.9 * result.metrics["eval/initial_loss"]


@pytest.mark.slow
def test_hh_pairs_train_as_sft_on_chosen_without_conversion(tmp_path, shared_datasets):
    _, result = run_sft(tmp_path, str(shared_datasets / "hh_rlhf_harmless_pairs.jsonl"), "train.max_steps=30",
                        "data.max_length=256", "data.max_prompt_length=192", "data.eval_fraction=0.02",
                        "data.on_error=skip")
    assert result.metrics["eval/loss"] < 0.9 * result.metrics["eval/initial_loss"]


def _nan_loss_on(monkeypatch, calls: set[int] | None) -> None:
    """The training forward returns a NaN loss on the chosen calls (all when None)."""
    real = sft.lm_forward_nll
    seen = {"n": 0}

    def forward(model, batch):
        nll, n = real(model, batch)
        seen["n"] += 1
        return (nll * float("nan"), n) if calls is None or seen["n"] in calls else (nll, n)

    monkeypatch.setattr(sft, "lm_forward_nll", forward)


def test_a_nan_loss_skips_that_update_and_the_weights_stay_finite(tmp_path, monkeypatch, quickstart_data):
    _nan_loss_on(monkeypatch, {3})
    _, result = run_sft(tmp_path, quickstart_data["sft"], "train.max_steps=5", "train.global_batch_size=8")
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert [rows[s]["sft/skipped_nonfinite"] for s in (2, 3, 4, 5)] == [0, 1, 1, 1]
    assert str(rows[3]["sft/loss"]).lower() == "nan"  # the NaN is logged as it was
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert result.metrics["eval/loss"] == result.metrics["eval/loss"]


def test_nan_losses_in_a_row_stop_the_run_and_write_no_checkpoint_from_them(tmp_path, monkeypatch, quickstart_data):
    from rlhf.errors import UserError

    _nan_loss_on(monkeypatch, {3, 4, 5, 6})
    with pytest.raises(UserError, match=r"sft: 3 steps in a row with non-finite loss, grad_norm \(last at step 5"):
        run_sft(tmp_path, quickstart_data["sft"], "train.max_steps=8", "train.global_batch_size=8",
                "train.save_every=1")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-1", "step-2"]


def test_a_finished_run_is_not_trained_over_without_overwrite(tmp_path, quickstart_data, capsys):
    from rlhf.errors import UserError

    short = ("train.max_steps=2", "train.global_batch_size=8", "train.save_every=1")
    run_sft(tmp_path, quickstart_data["sft"], *short)
    with pytest.raises(UserError, match="holds a finished run .*pass --overwrite"):
        run_sft(tmp_path, quickstart_data["sft"], *short)
    capsys.readouterr()
    cfg, _ = run_sft(tmp_path, quickstart_data["sft"], *short, "overwrite=true")
    assert cfg.train.resume == "never" and "resumed from" not in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]
