"""`rlhf export`: a finished pipeline's last stage copied byte for byte with a model card that
holds the chain to the base model, the lineage's data hashes, the config without secrets and the
eval table; the card's snippet loads and generates; a push offline fails in one line and keeps
the export; DIR is replaced whole or not at all; bad input is one line. A stage run started
directly (no lineage.json) is exported too, its data hashed at export and the card saying so.

The run directories are made by the project's own writers (export_pretrained, save_config,
write_lineage, write_report) on a tiny model, as `rlhf pipeline` lays them out, so the test
trains nothing."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.sharing.export import export_run

REPO = Path(__file__).resolve().parents[1]
BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SECRETS = {"wandb_api_key": "wandb-secret-7f3a9c2d", "hub_token": "hf_secret_b81d2e44",
           "password": "hunter2-secret-91"}
CREDENTIAL_URL = "https://user:pw-secret-5c1@rewards.example/score"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_model_dir, quickstart_data) -> Path:
    """runs/<name>/{pipeline.yaml, sft/, ppo/, eval/}: SFT from a hub id, PPO from the SFT
    export, an eval report of the PPO export; PPO's config.yaml carries secrets."""
    from transformers import AutoModelForCausalLM

    from rlhf.config import PPOConfig, SFTConfig, config_to_dict, load_config
    from rlhf.config_sections import ModelConfig
    from rlhf.evaluation.report import write_report
    from rlhf.lineage import Lineage, data_hash, write_lineage
    from rlhf.models.export import export_pretrained
    from rlhf.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("export") / "runs"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    for stage in ("sft", "ppo"):
        export_pretrained(model, tokenizer, root / stage / "model", extra_files={"rlhf_summary.json": {}})
    sft_cfg = load_config(SFTConfig, [], [f"model.path={BASE_HUB_ID}", f"data.train.path={quickstart_data['sft']}",
                                          f"output_dir={root / 'sft'}"])
    ppo_cfg = load_config(PPOConfig, [], [f"model.path={root / 'sft' / 'model'}",
                                          f"reward_model.path={root / 'sft' / 'model'}",
                                          f"data.prompts.path={quickstart_data['prompts']}",
                                          f"data.pretrain.path={quickstart_data['pretrain']}",
                                          "ppo.iterations=7", "kl.coef=0.123", f"output_dir={root / 'ppo'}"])
    sft = Lineage("sft", "c" * 64, {"data.train": data_hash(quickstart_data["sft"]),
                                     "model.path": data_hash(BASE_HUB_ID)}, {}, metrics={"eval/loss": 1.5})
    ppo = Lineage("ppo", "d" * 64, {"data.prompts": data_hash(quickstart_data["prompts"]),
                                     "data.pretrain": data_hash(quickstart_data["pretrain"])},
                  {"sft": sft.lineage_id}, metrics={"eval/gold_reward": 0.25})
    for stage, cfg, lineage in (("sft", sft_cfg, sft), ("ppo", ppo_cfg, ppo)):
        config = config_to_dict(cfg)
        if stage == "ppo":  # a hand-edited config: secret keys and a URL with credentials
            config["logging"].update(SECRETS)
            config["reward"]["http"] = CREDENTIAL_URL
        for path in (root / stage / "config.yaml", root / stage / "model" / "rlhf_config.yaml"):
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        write_lineage(root / stage, lineage)  # last, as the pipeline does
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"output_dir": str(root), "stages": ["sft", "ppo"]}))
    write_report(root / "eval", {
        "policy": str(root / "ppo" / "model"), "baseline": str(root / "sft" / "model"), "prompts": "p.jsonl",
        "answers": 16, "judges": ["gold"], "models": {"policy": {"reward/gold": 0.625, "kl": 0.5},
                                                      "baseline": {"reward/gold": 0.375}},
        "win_rate": {"gold": {"rate": 0.8125, "low": 0.57, "high": 0.93, "wins": 12, "ties": 2, "losses": 2}},
        "win_rate_interval": "Wilson score interval, 95%"})
    return root


def export(*args: str) -> int:
    """The command itself (each call builds the whole CLI parser, ~2 s: most tests call export_run)."""
    return main(["export", *map(str, args)])


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---", 2)[1])


def test_export_copies_the_weights_and_writes_the_card(pipeline_dir, tmp_path, capsys, quickstart_data):
    out = tmp_path / "share"
    assert export(pipeline_dir, "--to", out) == 0
    assert f"picked ppo, the last stage of the pipeline in {pipeline_dir}" in capsys.readouterr().out

    model = pipeline_dir / "ppo" / "model"
    shared = sorted(p.name for p in model.iterdir() if p.name != "rlhf_config.yaml")
    assert sorted(p.name for p in out.iterdir()) == sorted(shared + ["README.md"])
    for name in shared:
        assert (out / name).read_bytes() == (model / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    card = (out / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "transformers" and front["base_model"] == BASE_HUB_ID
    assert set(front["tags"]) >= {"rlhf", "ppo"} and "license" not in front
    assert "PPO <- SFT <- base" in card and "| `ppo.iterations` | 7 |" in card and "| `kl.coef` | 0.123 |" in card

    # Every data file of the chain, with the lineage's hash and its row count.
    lineages = {s: json.loads((pipeline_dir / s / "lineage.json").read_text()) for s in ("sft", "ppo")}
    for stage, key, name in (("ppo", "data.prompts", "prompts"), ("ppo", "data.pretrain", "pretrain"),
                             ("sft", "data.train", "sft")):
        rows = sum(1 for line in Path(quickstart_data[name]).read_text().splitlines() if line.strip())
        assert (f"| {stage} | `{key}` | `{quickstart_data[name]}` | `{lineages[stage]['inputs'][key]}` | {rows} |"
                in card)

    # The config without any secret: not in the card, nor in any file of the export.
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card, re.S).group(1))
    assert not set(SECRETS) & set(config["logging"]) and "http" not in config["reward"]
    assert config["ppo"]["iterations"] == 7 and config["rollout"]["max_new_tokens"] == 64  # not a "token" key
    for path in out.iterdir():
        for secret in [*SECRETS.values(), "pw-secret-5c1"]:
            assert secret.encode() not in path.read_bytes(), (path.name, secret)

    # The eval table of the report that judged this export.
    assert "| gold | 0.812 | [0.570, 0.930] | 12 / 2 / 2 |" in card and "| reward (gold) | 0.625 | 0.375 |" in card


def test_the_cards_snippet_loads_the_export_and_generates(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "share"
    export_run(pipeline_dir / "ppo", out)
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f"from_pretrained({str(out)!r})" in snippet
    scope: dict = {}
    exec(snippet.replace("max_new_tokens=64", "max_new_tokens=4, do_sample=False"), scope)
    assert scope["output"].shape[1] > scope["inputs"]["input_ids"].shape[1]  # it generated


def test_without_a_report_of_this_export_the_card_says_not_evaluated(pipeline_dir, tmp_path):
    export_run(pipeline_dir / "sft", tmp_path / "sft")  # the pipeline's report judged the PPO export
    card = (tmp_path / "sft" / "README.md").read_text()
    assert "Not evaluated" in card and "SFT <- base" in card and front_matter(card)["tags"][:2] == ["rlhf", "sft"]

    report, lineage = pipeline_dir / "eval" / "eval.json", pipeline_dir / "ppo" / "lineage.json"
    kept = report.stat().st_mtime
    os.utime(report, (kept, lineage.stat().st_mtime - 60))  # a report of an earlier export of ppo/
    try:
        export_run(pipeline_dir / "ppo", tmp_path / "ppo")
    finally:
        os.utime(report, (kept, kept))
    assert "Not evaluated" in (tmp_path / "ppo" / "README.md").read_text()


def test_a_push_offline_fails_in_one_line_and_keeps_the_export(pipeline_dir, tmp_path):
    out = tmp_path / "share"
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
               "HF_TOKEN": "hf_secret_token_0123456789"}
    done = subprocess.run([sys.executable, "-m", "rlhf", "export", str(pipeline_dir), "--to", str(out),
                           "--push-to-hub", "someone/tiny-ppo", "--private"], capture_output=True, text=True,
                          env=environ, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: could not reach the Hugging Face hub to push someone/tiny-ppo (offline mode")
    assert (f"the export in {out} is complete, push it later with: hf upload someone/tiny-ppo {out} --private"
            in done.stderr)
    assert "hf_secret_token" not in done.stdout + done.stderr
    assert (out / "model.safetensors").is_file() and "someone/tiny-ppo" in (out / "README.md").read_text()


def test_an_unreachable_hub_names_the_cause_and_not_the_token(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rlhf.sharing.hub import PushError, push_to_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_0123456789")
    with pytest.raises(PushError) as failed:
        push_to_hub(tmp_path, "someone/tiny-ppo")
    line = str(failed.value)
    assert line.startswith("could not reach the Hugging Face hub to push someone/tiny-ppo (") and "\n" not in line
    assert "refused" in line.lower() and "hf_secret_token" not in line


def test_force_replaces_the_directory_whole_or_not_at_all(pipeline_dir, tmp_path, monkeypatch):
    out = tmp_path / "share"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not empty; pass --force"):
        export_run(pipeline_dir / "ppo", out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    import shutil

    real_copytree = shutil.copytree

    def copy_then_fill_the_disk(src, dst, **kwargs):
        real_copytree(src, dst, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", copy_then_fill_the_disk)
    with pytest.raises(UserError, match="No space left on device.*previous contents are kept"):
        export_run(pipeline_dir / "ppo", out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    monkeypatch.undo()

    export_run(pipeline_dir / "ppo", out, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["share"]  # no temp or old directory left


def test_bad_input_is_one_line(pipeline_dir, tmp_path, capsys):
    assert export(tmp_path / "nope", "--to", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: no such run directory\n"

    unfinished = tmp_path / "unfinished"
    (unfinished / "model").mkdir(parents=True)
    with pytest.raises(UserError, match="no lineage.json, so no finished export"):
        export_run(unfinished, tmp_path / "a")
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "pipeline.yaml").write_text("stages: [sft, ppo]\n")
    os.symlink(pipeline_dir / "sft", pipeline / "sft")
    with pytest.raises(UserError, match="last stage ppo has no finished export .*; finished stages: sft"):
        export_run(pipeline, tmp_path / "a")
    for inside in (pipeline_dir, pipeline_dir / "ppo" / "model"):
        with pytest.raises(UserError, match="would replace the run itself"):
            export_run(pipeline_dir / "ppo", inside, force=True)
    assert not (tmp_path / "a").exists()


def test_a_run_started_directly_is_exported_with_its_data_hashed_at_export(pipeline_dir, tmp_path, capsys):
    """The PPO run as `rlhf ppo --config ...` leaves it: no lineage.json; its model.path is the
    pipeline's SFT export, so the chain goes on through SFT's lineage to the hub base model."""
    import shutil

    from rlhf.lineage import data_hash
    from stages import STAGES

    run = tmp_path / "my_ppo"
    shutil.copytree(pipeline_dir / "ppo", run)
    (run / "lineage.json").unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {"step": 5, "eval/gold_reward": 0.125, "ppo/kl": 0.2}, {"step": 10, "ppo/kl": 0.3},
        {"step": 10, "eval/gold_reward": 0.375})))
    out = tmp_path / "share"
    assert export(run, "--to", out) == 0
    assert f"exported ppo ({run})" in capsys.readouterr().out
    shared = [p.name for p in (run / "model").iterdir() if p.name != "rlhf_config.yaml"]
    assert sorted(p.name for p in out.iterdir()) == sorted(shared + ["README.md"])
    for name in shared:
        assert (out / name).read_bytes() == (run / "model" / name).read_bytes(), name

    card = (out / "README.md").read_text()
    assert front_matter(card)["base_model"] == BASE_HUB_ID and "PPO <- SFT <- base" in card
    assert "| `ppo.iterations` | 7 |" in card and "lineage id" not in card.split("## Base model")[0]
    assert "the ppo run was started directly (not by `rlhf pipeline`)" in card
    assert "hashed at export time, not at training: a file changed since training would not be noticed" in card
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("prompts", "pretrain"):
        path = config["data"][key]["path"]
        assert f"| ppo | `data.{key}` | `{path}` | `{data_hash(path)}` (at export, not at training) |" in card
    sft_hash = json.loads((pipeline_dir / "sft" / "lineage.json").read_text())["inputs"]["data.train"]
    assert f"| `{sft_hash}` | " in card  # the SFT run's hash is still the one its lineage recorded
    assert "| eval/gold_reward | 0.375 |" in card and "ppo/kl" not in card.split("## Evaluation")[1]
    assert "(the last of each in its metrics.jsonl)" in card
    assert all(secret not in card for secret in SECRETS.values())
    # The stage's summary saved with the export wins (a reward model's is its exported best step's).
    (run / "model" / "rlhf_summary.json").write_text(json.dumps({"eval/gold_reward": 0.5, "best_step": 5}))
    card = (export_run(run, out, force=True, stages=STAGES).directory / "README.md").read_text()
    assert "| eval/gold_reward | 0.5 |" in card and "(model/rlhf_summary.json, saved with the export)" in card

    # Unfinished (no finished config) or a lineage.json that cannot be read: refused, nothing written.
    (run / "lineage.json").write_text("{")
    with pytest.raises(UserError, match="unreadable lineage.json"):
        export_run(run, tmp_path / "a", stages=STAGES)
    (run / "lineage.json").unlink()
    (run / "model" / "rlhf_config.yaml").unlink()
    with pytest.raises(UserError, match="no lineage.json, so no finished export .*still going or was stopped"):
        export_run(run, tmp_path / "a", stages=STAGES)
    assert not (tmp_path / "a").exists()


def test_the_stage_of_a_direct_run_is_told_by_its_saved_config():
    from rlhf.config import config_to_dict
    from rlhf.sharing.unrecorded import stage_of
    from stages import STAGES

    for name in ("sft", "rm", "dpo", "ppo"):
        config = config_to_dict(STAGES[name].config())
        assert stage_of(config, STAGES) == name
        del config["kernels"]  # saved before a section existed
        assert stage_of(config, STAGES) == name
    assert stage_of({"model": {}, "unknown_section": {}}, STAGES) is None
