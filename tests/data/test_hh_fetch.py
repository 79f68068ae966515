"""`rlhf data fetch hh-rlhf`: HH rows split by prompt into the files the recipe's stages read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import PipelineConfig, load_config
from rlhf.config_sections import DataSourceConfig
from rlhf.data.builders import load_records
from rlhf.data.hh_rlhf import SHARES, fetch
from rlhf.errors import ConfigError

SHARED_HH = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "hh_rlhf_harmless_pairs.jsonl"
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "smollm2_hh" / "pipeline.yaml"


def dialogue(question: str, answer: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prompts_of(path: Path) -> set[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {(row.get("chosen") or row["text"]).rsplit("\n\nAssistant:", 1)[0].strip() for row in rows}


def test_every_prompt_lands_in_one_file_and_pairs_without_a_preference_are_dropped(tmp_path):
    rows = []
    for index in range(60):
        # Three answers to each question, as HH has repeated prompts.
        for answer in range(3):
            chosen = dialogue(f"question {index}?", f"good {answer}")
            rejected = chosen if index % 20 == 0 and answer == 0 else dialogue(f"question {index}?", f"bad {answer}")
            rows.append({"chosen": chosen, "rejected": rejected})
    source = write_rows(tmp_path / "hh.jsonl", rows)
    written = fetch(tmp_path / "out", source=str(source), seed=3)
    manifest = json.loads(Path(written.pop("manifest")).read_text(encoding="utf-8"))

    seen: dict[str, str] = {}
    for name, path in written.items():
        if name == "pretrain":  # the SFT dialogues again, as text for PPO-ptx
            assert prompts_of(Path(path)) == prompts_of(Path(written["sft"]))
            continue
        for prompt in prompts_of(Path(path)):
            assert prompt not in seen, f"{prompt!r} is in {seen.get(prompt)} and {name}"
            seen[prompt] = name
    assert len(seen) == 60 and all(manifest["rows"][name] > 0 for name in written)
    ties = sum(1 for row in rows if row["chosen"] == row["rejected"])
    assert manifest["dropped"]["ties"] == sum(1 for p in seen if seen[p].startswith("rank")
                                              and int(p.split()[-1][:-1]) % 20 == 0)
    assert ties == 3 and all(json.loads(line)["chosen"] != json.loads(line)["rejected"]
                             for name in ("rank", "rank_eval") for line in Path(written[name]).open())
    assert manifest["rows"]["rank"] >= manifest["rows"]["sft"] >= manifest["rows"]["prompts"]
    # The same seed gives the same files; another seed another split.
    again = fetch(tmp_path / "again", source=str(source), seed=3)
    assert all(Path(again[n]).read_bytes() == Path(written[n]).read_bytes() for n in written)
    other = fetch(tmp_path / "other", source=str(source), seed=4)
    assert Path(other["sft"]).read_bytes() != Path(written["sft"]).read_bytes()


def test_a_file_without_hh_rows_is_one_clear_error_and_nothing_is_written(tmp_path, capsys):
    source = write_rows(tmp_path / "bad.jsonl", [{"chosen": "no dialogue here", "rejected": "x"}] * 10)
    out = tmp_path / "out"
    assert main(["data", "fetch", "hh-rlhf", "--from", str(source), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert f"{source}:1: field 'chosen'" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_offline_the_hub_download_says_how_to_use_a_local_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["data", "fetch", "hh-rlhf", "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "could not download Anthropic/hh-rlhf (harmless-base, train)" in err and "--from" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not SHARED_HH.is_file(), reason=f"{SHARED_HH} is absent")
def test_the_shared_hh_pairs_feed_every_stage_of_the_recipe(tmp_path):
    written = fetch(tmp_path / "hh", source=str(SHARED_HH))
    manifest = json.loads(Path(written["manifest"]).read_text(encoding="utf-8"))
    total = manifest["rows_read"]
    assert total == 2000 and manifest["source"]["sha256"]
    # One of HH's empty preferred replies fell in the SFT share: ranked elsewhere, never imitated.
    assert manifest["rows"]["sft"] + manifest["dropped"]["empty_chosen"] == pytest.approx(SHARES["sft"] * total, abs=15)
    kinds = {"sft": "sft", "rank": "rank", "rank_eval": "rank", "prompts": "prompt", "prompts_eval": "prompt",
             "pretrain": "pretrain", "pretrain_eval": "pretrain"}
    for name, kind in kinds.items():
        records, report = load_records(kind, DataSourceConfig(path=written[name]))
        assert report.rows == len(records) == manifest["rows"][name] > 0, name
    # The recipe reads these files by these names.
    recipe = load_config(PipelineConfig, [str(RECIPE)], [
        f"sft.model.path={tmp_path}", "sft.model.gguf_file=null",
        f"sft.data.train.path={written['sft']}", f"rm.data.train.path={written['rank']}",
        f"rm.data.eval.path={written['rank_eval']}", f"ppo.data.prompts.path={written['prompts']}",
        f"ppo.data.eval_prompts.path={written['prompts_eval']}", f"ppo.data.pretrain.path={written['pretrain']}",
        f"eval.prompts.path={written['prompts_eval']}", f"eval.pretrain.path={written['pretrain_eval']}"])
    assert recipe.stages == ["sft", "rm", "ppo"] and recipe.ppo.ppo.ptx_coef > 0
    for path in (recipe.sft.data.train.path, recipe.rm.data.train.path, recipe.ppo.data.prompts.path):
        assert Path(path).name in {Path(p).name for p in written.values()}


def test_a_config_can_name_an_installed_package_as_a_model_directory(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("model: {path: '${package_dir:json}'}\ndata: {train: {path: x.jsonl}}\n", encoding="utf-8")
    from rlhf.config import SFTConfig

    cfg = load_config(SFTConfig, [str(config)])
    assert Path(cfg.model.path) == Path(json.__file__).parent
    with pytest.raises(ConfigError, match="no installed Python package 'no_such_package_here'"):
        load_config(SFTConfig, [str(config)], ["model.path=${package_dir:no_such_package_here}"])
