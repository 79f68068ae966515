import copy
import hashlib
import json
import re
from pathlib import Path

import pytest

from rlhf import lineage as lin
from rlhf.lineage import (
    LINEAGE_FILE,
    Lineage,
    artifact_complete,
    check_up_to_date,
    code_version,
    config_hash,
    data_hash,
    read_lineage,
    write_lineage,
)

CONFIG = {
    "model": {"path": "runs/q/sft/model", "lora": {"r": 0, "alpha": 16}},
    "data": {"train": {"path": "train.jsonl", "columns": {}}, "max_length": 512},
    "train": {"lr": 1e-5, "epochs": 1, "resume": "auto", "save_every": 0, "keep_last": 2},
    "logging": {"backends": ["wandb"], "project": "x"},
    "output_dir": "runs/q/rm",
    "seed": 42,
}


def leaves(tree, prefix=""):
    """Every dotted leaf key of a nested dict."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, name + ".")
        else:
            yield name


def with_leaf(tree, dotted, value):
    tree = copy.deepcopy(tree)
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    return tree


def make_lineage(**changes) -> Lineage:
    fields = dict(
        stage="rm",
        config_hash="c" * 64,
        inputs={"data.train": "d" * 64},
        parents={"sft": "p" * 64},
        code={"package": "0.1.0", "git_commit": "a" * 40, "git_dirty": False},
        metrics={"eval/accuracy": 0.75},
        created="2026-01-01T00:00:00+00:00",
    )
    fields.update(changes)
    return Lineage(**fields)


def write_model(model_dir: Path, skip: str = "") -> Path:
    """A fake HF export: empty files with the right names, minus `skip`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if name != skip:
            (model_dir / name).write_text("{}")
    return model_dir


# config_hash


def test_config_hash_ignores_key_order():
    reordered = json.loads(json.dumps(CONFIG))
    reordered = {key: reordered[key] for key in reversed(list(reordered))}
    reordered["train"] = dict(reversed(list(reordered["train"].items())))
    assert list(reordered) != list(CONFIG)
    assert config_hash(reordered) == config_hash(CONFIG)
    assert re.fullmatch(r"[0-9a-f]{64}", config_hash(CONFIG))


def test_config_hash_changes_with_every_kept_leaf():
    ignored = ("logging", "train.resume", "train.save_every", "train.keep_last", "output_dir")
    kept = [name for name in leaves(CONFIG) if not name.startswith(ignored)]
    assert "model.lora.r" in kept and "data.train.columns" in kept and "seed" in kept
    base = config_hash(CONFIG)
    for name in kept:
        assert config_hash(with_leaf(CONFIG, name, "changed")) != base, name


def test_config_hash_ignores_default_ignored_leaves():
    base = config_hash(CONFIG)
    ignored = ("logging.project", "logging.backends", "train.resume", "train.save_every", "train.keep_last")
    for name in ignored + ("output_dir",):
        assert config_hash(with_leaf(CONFIG, name, "other")) == base, name
    # Removing an ignored section entirely is the same as changing it.
    trimmed = {key: value for key, value in CONFIG.items() if key != "logging"}
    assert config_hash(trimmed) == base
    # The health alarms (PPO) only watch a run: a run from before the section existed matches.
    assert config_hash({**CONFIG, "alarms": {"window": 3, "kl_budget": 1.0}}) == base


def test_config_hash_dotted_ignore_removes_only_that_leaf_and_tolerates_missing_keys():
    ignore = ("train.lr", "no.such.key", "seed.not_a_dict")
    base = config_hash(CONFIG, ignore=ignore)
    assert config_hash(with_leaf(CONFIG, "train.lr", 3.0), ignore=ignore) == base
    assert config_hash(with_leaf(CONFIG, "train.epochs", 9), ignore=ignore) != base
    # With nothing ignored, a logging change does count.
    assert config_hash(with_leaf(CONFIG, "logging.project", "y"), ignore=()) != config_hash(CONFIG, ignore=())


def test_config_hash_does_not_mutate_input():
    snapshot = copy.deepcopy(CONFIG)
    config_hash(CONFIG)
    config_hash(CONFIG, ignore=("model.lora.r", "data"))
    assert CONFIG == snapshot


def test_config_hash_rejects_unhashable_values_instead_of_using_their_repr():
    with pytest.raises(TypeError, match="object"):
        config_hash({"x": object()})
    assert config_hash({"p": Path("a/b")}) == config_hash({"p": "a/b"})


# data_hash


def test_data_hash_of_file_is_sha256_of_bytes_and_follows_content(tmp_path):
    file = tmp_path / "train.jsonl"
    payload = b'{"prompt": "hi", "response": "yo"}\n' * 1000
    file.write_bytes(payload)
    first = data_hash(str(file))
    assert first == hashlib.sha256(payload).hexdigest()
    file.write_bytes(payload + b"\n")
    assert data_hash(str(file)) != first


def test_data_hash_streams_files_larger_than_one_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(lin, "_CHUNK", 7)  # force several reads on a small file
    file = tmp_path / "big.bin"
    payload = bytes(range(256)) * 3
    file.write_bytes(payload)
    assert data_hash(str(file)) == hashlib.sha256(payload).hexdigest()


def test_data_hash_of_directory_follows_nested_content_and_names(tmp_path):
    root = tmp_path / "saved"
    (root / "train").mkdir(parents=True)
    (root / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (root / "train" / "data-00000.arrow").write_bytes(b"\x00\x01rows")
    first = data_hash(str(root))
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert data_hash(str(root)) == first

    (root / "train" / "data-00000.arrow").write_bytes(b"\x00\x02rows")
    changed = data_hash(str(root))
    assert changed != first

    (root / "train" / "data-00000.arrow").rename(root / "train" / "data-00001.arrow")
    assert data_hash(str(root)) not in (first, changed)


def test_data_hash_of_directory_does_not_depend_on_its_location(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "x.arrow").write_bytes(b"same")
    assert data_hash(str(tmp_path / "a")) == data_hash(str(tmp_path / "b"))


def test_data_hash_of_hub_id_is_deterministic_and_differs_from_files(tmp_path):
    hub = data_hash("Anthropic/hh-rlhf")
    assert hub == data_hash("Anthropic/hh-rlhf")
    assert hub == hashlib.sha256(b"hub:Anthropic/hh-rlhf").hexdigest()
    assert hub != data_hash("Anthropic/other")
    file = tmp_path / "hh-rlhf"
    file.write_text("Anthropic/hh-rlhf")
    assert data_hash(str(file)) != hub
    assert data_hash("") == ""


# Lineage


def test_lineage_id_ignores_code_metrics_and_created():
    base = make_lineage()
    other = make_lineage(code={"package": "9", "git_commit": None, "git_dirty": None}, metrics={}, created="2030-01-01")
    assert base.lineage_id == other.lineage_id
    assert re.fullmatch(r"[0-9a-f]{64}", base.lineage_id)


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "ppo"},
        {"config_hash": "e" * 64},
        {"inputs": {"data.train": "f" * 64}},
        {"inputs": {"data.train": "d" * 64, "data.eval": "f" * 64}},
        {"parents": {"sft": "q" * 64}},
        {"parents": {}},
    ],
)
def test_lineage_id_changes_with_identity_fields(change):
    assert make_lineage(**change).lineage_id != make_lineage().lineage_id


def test_lineage_id_ignores_dict_order():
    a = make_lineage(inputs={"data.train": "1", "data.eval": "2"})
    b = make_lineage(inputs={"data.eval": "2", "data.train": "1"})
    assert a.lineage_id == b.lineage_id


def test_lineage_defaults_created_to_utc_now():
    fresh = Lineage(stage="sft", config_hash="c", inputs={}, parents={})
    assert fresh.created.endswith("+00:00") and fresh.code == {} and fresh.metrics == {}


def test_to_dict_from_dict_round_trip_ignores_id_and_unknown_keys():
    original = make_lineage()
    data = original.to_dict()
    assert data["lineage_id"] == original.lineage_id
    data["lineage_id"] = "stale"
    data["future_field"] = 1
    assert Lineage.from_dict(data) == original


@pytest.mark.parametrize("missing", ["stage", "config_hash", "inputs", "parents"])
def test_from_dict_raises_on_missing_required_key(missing):
    data = make_lineage().to_dict()
    del data[missing]
    with pytest.raises(ValueError, match=missing):
        Lineage.from_dict(data)


def test_from_dict_raises_on_wrong_types():
    for bad in ({"inputs": None}, {"parents": {"sft": 3}}, {"stage": 1}, {"metrics": []}):
        with pytest.raises(ValueError):
            Lineage.from_dict({**make_lineage().to_dict(), **bad})
    with pytest.raises(ValueError):
        Lineage.from_dict([1, 2])


# write / read


def test_write_read_round_trip_creates_dir_and_leaves_no_temp_files(tmp_path):
    run_dir = tmp_path / "runs" / "q" / "rm"
    original = make_lineage()
    path = write_lineage(run_dir, original)
    assert path == run_dir / LINEAGE_FILE
    assert sorted(p.name for p in run_dir.iterdir()) == [LINEAGE_FILE]
    stored = json.loads(path.read_text())
    assert stored["lineage_id"] == original.lineage_id
    assert path.read_text().startswith('{\n  "')  # indent=2, readable by people
    assert read_lineage(run_dir) == original

    write_lineage(run_dir, make_lineage(metrics={"eval/accuracy": 0.9}))  # overwrite in place
    assert read_lineage(run_dir).metrics == {"eval/accuracy": 0.9}
    assert sorted(p.name for p in run_dir.iterdir()) == [LINEAGE_FILE]


def test_write_and_read_under_another_name(tmp_path):
    path = write_lineage(tmp_path, make_lineage(), "lineage.pending.json")
    assert path == tmp_path / "lineage.pending.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lineage.pending.json"]
    assert read_lineage(tmp_path, "lineage.pending.json") == make_lineage()
    assert read_lineage(tmp_path) is None  # the finished-stage marker is untouched


def test_write_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    write_lineage(tmp_path, make_lineage())

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(lin.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_lineage(tmp_path, make_lineage(metrics={"eval/accuracy": 0.1}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LINEAGE_FILE]
    assert read_lineage(tmp_path) == make_lineage()


def test_lineage_file_holds_no_config_values(tmp_path):
    secret = {"logging": {"wandb_api_key": "sk-SECRET"}, "model": {"path": "private/model"}}
    write_lineage(tmp_path, make_lineage(config_hash=config_hash(secret)))
    text = (tmp_path / LINEAGE_FILE).read_text()
    assert "SECRET" not in text and "private/model" not in text


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b'{"stage": "sft"}', b"\xff\xfe\x00"],
)
def test_read_lineage_returns_none_for_bad_files(tmp_path, content):
    (tmp_path / LINEAGE_FILE).write_bytes(content)
    assert read_lineage(tmp_path) is None


def test_read_lineage_missing_is_none(tmp_path):
    assert read_lineage(tmp_path) is None
    assert read_lineage(tmp_path / "does-not-exist") is None


# artifact_complete


def test_artifact_complete_for_full_export(tmp_path):
    assert artifact_complete(write_model(tmp_path / "model")) == (True, "complete")


def test_artifact_complete_accepts_either_tokenizer_file(tmp_path):
    model = write_model(tmp_path / "model", skip="tokenizer.json")
    assert artifact_complete(model)[0]
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer.json").write_text("{}")
    assert artifact_complete(model)[0]


@pytest.mark.parametrize(
    "skip, reason",
    [
        ("config.json", "no config.json in "),
        ("model.safetensors", "no *.safetensors in "),
    ],
)
def test_artifact_complete_names_missing_piece(tmp_path, skip, reason):
    model = write_model(tmp_path / "model", skip=skip)
    ok, why = artifact_complete(model)
    assert not ok
    assert why == reason + str(model)


def test_artifact_complete_needs_a_tokenizer(tmp_path):
    model = write_model(tmp_path / "model", skip="tokenizer.json")
    (model / "tokenizer_config.json").unlink()
    ok, why = artifact_complete(model)
    assert not ok and why.startswith("no tokenizer file") and str(model) in why


def test_artifact_complete_missing_dir(tmp_path):
    ok, why = artifact_complete(tmp_path / "model")
    assert not ok and why == f"no model directory {tmp_path / 'model'}"


@pytest.mark.parametrize("name", [".model.safetensors.tmp", "weights.tmp123", ".model.tmp-ab12"])
def test_artifact_complete_rejects_leftover_temp_entries(tmp_path, name):
    model = write_model(tmp_path / "model")
    (model / name).mkdir() if name.endswith("ab12") else (model / name).write_text("")
    ok, why = artifact_complete(model)
    assert not ok and why == f"leftover temp file {name} in {model}"


def test_artifact_complete_checks_shards_listed_in_index(tmp_path):
    model = write_model(tmp_path / "model", skip="model.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model-00001-of-00002.safetensors").write_text("")
    ok, why = artifact_complete(model)
    assert not ok and why == f"missing shard model-00002-of-00002.safetensors in {model}"
    (model / "model-00002-of-00002.safetensors").write_text("")
    assert artifact_complete(model) == (True, "complete")


# check_up_to_date


def test_check_up_to_date_reports_each_reason_in_order(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    stored = make_lineage()
    expected = make_lineage(
        config_hash="e" * 64, inputs={"data.train": "f" * 64}, parents={"sft": "q" * 64}, created="later"
    )
    write_model(run_dir / "model", skip="model.safetensors")

    assert check_up_to_date(run_dir, expected) == (False, "no lineage.json")
    write_lineage(run_dir, stored)
    assert check_up_to_date(run_dir, expected) == (False, "config changed")
    expected.config_hash = stored.config_hash
    assert check_up_to_date(run_dir, expected) == (False, "input data.train changed")
    expected.inputs = dict(stored.inputs)
    assert check_up_to_date(run_dir, expected) == (False, "parent sft changed")
    expected.parents = dict(stored.parents)
    assert check_up_to_date(run_dir, expected) == (
        False,
        f"artifact incomplete: no *.safetensors in {run_dir / 'model'}",
    )
    (run_dir / "model" / "model.safetensors").write_text("")
    assert check_up_to_date(run_dir, expected) == (True, "up to date")


def test_check_up_to_date_added_and_removed_inputs_and_parents(tmp_path):
    write_model(tmp_path / "model")
    write_lineage(tmp_path, make_lineage())
    added = make_lineage(inputs={"data.train": "d" * 64, "data.pretrain": "x"})
    assert check_up_to_date(tmp_path, added) == (False, "input data.pretrain added")
    assert check_up_to_date(tmp_path, make_lineage(parents={})) == (False, "parent sft removed")


def test_check_up_to_date_stage_mismatch_and_unreadable_file(tmp_path):
    write_model(tmp_path / "model")
    write_lineage(tmp_path, make_lineage())
    ok, why = check_up_to_date(tmp_path, make_lineage(stage="ppo"))
    assert not ok and why.startswith("stage changed")
    (tmp_path / LINEAGE_FILE).write_text("{broken")
    assert check_up_to_date(tmp_path, make_lineage()) == (False, "unreadable lineage.json")


def test_check_up_to_date_custom_model_subdir(tmp_path):
    write_model(tmp_path / "export")
    write_lineage(tmp_path, make_lineage())
    assert check_up_to_date(tmp_path, make_lineage(), model_subdir="export") == (True, "up to date")
    assert not check_up_to_date(tmp_path, make_lineage())[0]


def test_check_up_to_date_code_change_alone_is_still_up_to_date(tmp_path):
    write_model(tmp_path / "model")
    write_lineage(tmp_path, make_lineage())
    newer = make_lineage(code={"package": "0.1.0", "git_commit": "b" * 40, "git_dirty": True})
    assert check_up_to_date(tmp_path, newer) == (
        True,
        f"up to date (written by code {'a' * 12}, now {'b' * 12}+dirty)",
    )
    # No git on either side: the package versions are what differ.
    write_lineage(tmp_path, make_lineage(code={"package": "0.1.0", "git_commit": None, "git_dirty": None}))
    later = make_lineage(code={"package": "0.2.0", "git_commit": None, "git_dirty": None})
    assert check_up_to_date(tmp_path, later) == (True, "up to date (written by code 0.1.0, now 0.2.0)")


# code_version


def test_code_version_in_checkout_reports_commit():
    version = code_version()
    assert set(version) == {"package", "git_commit", "git_dirty"}
    assert isinstance(version["package"], str) and version["package"]
    assert re.fullmatch(r"[0-9a-f]{40}", version["git_commit"])
    assert isinstance(version["git_dirty"], bool)


def test_code_version_never_raises_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(lin.subprocess, "run", no_git)
    version = code_version()
    assert version["git_commit"] is None and version["git_dirty"] is None
    assert version["package"]


def test_code_version_survives_git_timeout(monkeypatch):
    def slow_git(cmd, **kwargs):
        assert kwargs["timeout"] == 5
        raise lin.subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(lin.subprocess, "run", slow_git)
    assert code_version()["git_commit"] is None
