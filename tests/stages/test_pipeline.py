"""`rlhf pipeline`: SFT -> RM -> PPO wired by lineage. A second run trains nothing, a PPO
change re-runs only PPO, an SFT change re-runs all three, `--from` forces a restart point
and an interrupted stage resumes from its checkpoint."""

import json
import time
from pathlib import Path

import pytest
import yaml

from rlhf.config import PipelineConfig, load_config
from rlhf.lineage import read_lineage
from rlhf.logging.metrics import read_metrics
from rlhf.summary import summary_rows
from stages import pipeline

REPO = Path(__file__).resolve().parents[2]


def tiny_pipeline(root: Path, data: dict, *overrides: str, shipped_eval: bool = False) -> PipelineConfig:
    """The shipped pipeline on tiny sizes; without its eval section (lineage decides nothing
    there) unless `shipped_eval` or an `eval.*` override brings one back."""
    return load_config(PipelineConfig, [str(REPO / "configs" / "pipeline.yaml")], [
        f"output_dir={root}", "ray.enabled=false", *([] if shipped_eval else ["eval=null"]),
        f"sft.data.train.path={data['sft']}", f"sft.data.pretrain.path={data['pretrain']}",
        "sft.model.tiny.hidden_size=32", "sft.model.tiny.intermediate_size=64", "sft.train.max_steps=3",
        f"rm.data.train.path={data['rank']}", "rm.train.max_steps=2", "rm.data.eval_fraction=0.02",
        f"ppo.data.prompts.path={data['prompts']}", f"ppo.data.eval_prompts.path={data['prompts_eval']}",
        f"ppo.data.pretrain.path={data['pretrain']}", "ppo.ppo.iterations=2", "ppo.ppo.rollout_batch_size=8",
        "ppo.ppo.mini_batch_size=8", "ppo.ppo.micro_batch_size=8", "ppo.rollout.max_new_tokens=6",
        "ppo.eval.max_prompts=4", "ppo.ppo.eval_every=2",
        *[f"{stage}.logging.progress=false" for stage in ("sft", "rm", "ppo")], *overrides])


SECRETS = {"WANDB_API_KEY": "wandb-secret-7f3a9c", "HF_TOKEN": "hf_secret_b81d2e"}


def assert_no_secret_in(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in data, (path, value)


@pytest.mark.slow
@pytest.mark.claim
def test_lineage_decides_what_reruns(tmp_path, quickstart_data, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "run"
    assert pipeline.main(tiny_pipeline(root, quickstart_data)) == {"sft": "ran", "rm": "ran", "ppo": "ran"}
    lineage = {stage: read_lineage(root / stage) for stage in ("sft", "rm", "ppo")}
    assert lineage["rm"].parents == {"sft": lineage["sft"].lineage_id}
    assert lineage["ppo"].parents == {"sft": lineage["sft"].lineage_id, "rm": lineage["rm"].lineage_id}
    assert "eval/loss" in lineage["sft"].metrics and "eval/accuracy" in lineage["rm"].metrics
    assert set(lineage["sft"].inputs) == {"data.train", "data.pretrain"}

    started = time.time()
    assert pipeline.main(tiny_pipeline(root, quickstart_data)) == {"sft": "skipped", "rm": "skipped", "ppo": "skipped"}
    assert time.time() - started < 15

    ppo_change = tiny_pipeline(root, quickstart_data, "ppo.kl.coef=0.5")
    assert pipeline.main(ppo_change) == {"sft": "skipped", "rm": "skipped", "ppo": "ran"}
    assert read_lineage(root / "ppo").lineage_id != lineage["ppo"].lineage_id

    sft_change = tiny_pipeline(root, quickstart_data, "ppo.kl.coef=0.5", "sft.train.lr=1e-3")
    assert pipeline.main(sft_change) == {"sft": "ran", "rm": "ran", "ppo": "ran"}
    assert read_lineage(root / "rm").parents["sft"] != lineage["sft"].lineage_id

    assert pipeline.main(sft_change, start_from="rm") == {"sft": "skipped", "rm": "ran", "ppo": "ran"}
    assert_no_secret_in(root)


@pytest.mark.slow
def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path, quickstart_data, capsys):
    root = tmp_path / "run"
    cfg = tiny_pipeline(root, quickstart_data, "ppo.train.save_every=1")
    pipeline.main(cfg)
    straight = read_metrics(root / "ppo")
    # As if PPO had died after its iteration-1 checkpoint: no lineage yet, the pending one left.
    (root / "ppo" / "lineage.json").rename(root / "ppo" / "lineage.pending.json")
    (root / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in straight if r["step"] <= 1))
    capsys.readouterr()
    assert pipeline.main(cfg) == {"sft": "skipped", "rm": "skipped", "ppo": "ran"}
    out = capsys.readouterr().out
    assert "ppo: no lineage.json; resuming" in out and "resumed from" in out
    resumed = read_metrics(root / "ppo")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert resumed[-1]["eval/reward"] == pytest.approx(straight[-1]["eval/reward"], abs=1e-6)
    assert read_lineage(root / "ppo") is not None and not (root / "ppo" / "lineage.pending.json").exists()


def test_a_stage_without_its_parent_export_is_refused(tmp_path, quickstart_data):
    from rlhf.errors import UserError

    cfg = tiny_pipeline(tmp_path / "run", quickstart_data, "stages=[rm,ppo]")
    with pytest.raises(UserError, match="no lineage.json: run the pipeline with sft"):
        pipeline.main(cfg)


@pytest.mark.slow
def test_sft_then_dpo_reads_the_sft_export(tmp_path, quickstart_data):
    root = tmp_path / "run"
    cfg = tiny_pipeline(root, quickstart_data, "stages=[sft,dpo]", f"dpo.data.train.path={quickstart_data['rank']}",
                        "dpo.train.max_steps=2", "dpo.data.eval_fraction=0.02", "dpo.logging.progress=false")
    assert pipeline.main(cfg) == {"sft": "ran", "dpo": "ran"}
    lineage = {stage: read_lineage(root / stage) for stage in ("sft", "dpo")}
    assert lineage["dpo"].parents == {"sft": lineage["sft"].lineage_id}
    assert (root / "dpo" / "model" / "config.json").is_file() and not (root / "rm").exists()
    assert pipeline.main(cfg) == {"sft": "skipped", "dpo": "skipped"}


@pytest.mark.slow
def test_sft_then_grpo_needs_no_reward_model(tmp_path, quickstart_data):
    root = tmp_path / "run"
    cfg = tiny_pipeline(root, quickstart_data, "stages=[sft,ppo]", "ppo.ppo.advantage=grpo",
                        "ppo.reward.functions=[rlhf.data.quickstart:gold_reward]", "ppo.reward.normalize=none",
                        "ppo.rollout.n_samples_per_prompt=2", "ppo.ppo.rollout_batch_size=4", "ppo.kl.coef=0",
                        "ppo.eval.gold_reward=rlhf.data.quickstart:gold_reward", "eval.max_prompts=4",
                        "eval.max_new_tokens=6", "eval.pretrain_max_rows=4")
    assert pipeline.main(cfg) == {"sft": "ran", "ppo": "ran", "eval": "ran"}
    # The eval section: the GRPO export judged by the gold rule against the SFT export, in the table.
    result = json.loads((root / "eval" / "eval.json").read_text())
    assert (result["policy"], result["baseline"]) == (str(root / "ppo" / "model"), str(root / "sft" / "model"))
    assert result["judges"] == ["gold_reward"] and result["answers"] == 4 and "perplexity" in result["models"]["policy"]
    assert "Eval win rate vs baseline (gold_reward)" in dict(summary_rows(root))
    lineage = {stage: read_lineage(root / stage) for stage in ("sft", "ppo")}
    assert lineage["ppo"].parents == {"sft": lineage["sft"].lineage_id}
    assert "reward_model.path" not in lineage["ppo"].inputs and not (root / "rm").exists()
    rows = read_metrics(root / "ppo")
    assert any("reward/rlhf.data.quickstart:gold_reward" in row for row in rows)


def test_dpo_is_the_alternative_to_rm_and_ppo(tmp_path, quickstart_data):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="DPO is the alternative to rm \\+ ppo"):
        tiny_pipeline(tmp_path / "run", quickstart_data, "stages=[sft,rm,dpo]").validate()
    with pytest.raises(ConfigError, match="stages run in the order sft, rm, dpo, ppo"):
        tiny_pipeline(tmp_path / "run", quickstart_data, "stages=[dpo,sft]").validate()
    # Without rewards from code, a PPO stage after [sft] alone reads the RM export of an earlier run.
    assert tiny_pipeline(tmp_path / "run", quickstart_data, "stages=[sft,ppo]").parents("ppo") == ["sft", "rm"]


def test_the_eval_section_is_wired_to_the_last_export_sft_and_the_judges(tmp_path, quickstart_data):
    root = tmp_path / "run"
    cfg = tiny_pipeline(root, quickstart_data, "eval.samples_per_prompt=2")
    wired = cfg.wired_eval()
    assert (wired.policy.path, wired.baseline.path) == (str(root / "ppo" / "model"), str(root / "sft" / "model"))
    assert wired.judges == ["rlhf.data.quickstart:gold_reward", str(root / "rm" / "model")]
    assert wired.prompts.path == quickstart_data["prompts_eval"] and wired.pretrain.path == quickstart_data["pretrain"]
    assert wired.output_dir == str(root / "eval") and wired.samples_per_prompt == 2
    assert tiny_pipeline(root, quickstart_data).eval is None  # no section: no eval
    # The quickstart's own section: configs/eval.yaml's settings, wired the same way.
    shipped = tiny_pipeline(root, quickstart_data, shipped_eval=True).wired_eval()
    assert shipped.judges == wired.judges and (shipped.policy.path, shipped.baseline.path) == (
        wired.policy.path, wired.baseline.path)
    alone = yaml.safe_load((REPO / "configs" / "eval.yaml").read_text())  # its paths need the exports
    for key in ("samples_per_prompt", "max_new_tokens", "max_prompt_length"):
        assert getattr(shipped, key) == alone[key], key
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="eval section: judges\\[0\\]='no/such/dir'"):
        tiny_pipeline(root, quickstart_data, "eval.judges=[no/such/dir]")
