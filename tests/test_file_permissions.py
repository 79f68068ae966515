"""What a run writes is readable as a plain open() or mkdir() would leave it under the user's
umask: exports, configs and lineage went through tempfile, whose files and directories are
private (0600/0700), so a model trained on a shared cluster filesystem was unreadable to the rest
of the team."""

import os
import stat
from pathlib import Path

import pytest

from rlhf.config import SFTConfig, save_config
from rlhf.files import default_mode, make_shareable, write_text_atomic
from rlhf.lineage import Lineage, read_lineage, write_lineage


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_configs_lineage_and_atomic_writes_follow_the_umask(tmp_path, umask_027):
    assert default_mode() == 0o640 and default_mode(directory=True) == 0o750
    save_config(SFTConfig(), tmp_path / "run" / "config.yaml")
    lineage = Lineage(stage="sft", config_hash="abc", inputs={}, parents={})
    write_lineage(tmp_path / "run", lineage)
    write_text_atomic(tmp_path / "run" / "note.txt", "x")
    for name in ("config.yaml", "lineage.json", "note.txt"):
        assert _mode(tmp_path / "run" / name) == 0o640, name
    assert read_lineage(tmp_path / "run").config_hash == "abc"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "lineage.json", "note.txt"]


def test_make_shareable_opens_a_private_tree_and_keeps_executables(tmp_path, umask_027):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    for path, mode in ((root, 0o700), (root / "sub", 0o700)):
        os.chmod(path, mode)
    (root / "weights.safetensors").write_bytes(b"w")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "weights.safetensors", 0o600)
    os.chmod(root / "run.sh", 0o700)
    make_shareable(root)
    assert [_mode(p) for p in (root, root / "sub", root / "weights.safetensors", root / "run.sh")] == \
        [0o750, 0o750, 0o640, 0o750]


def test_a_stage_export_is_readable_under_the_umask(tmp_path, tiny_model_dir, umask_027):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.export import export_pretrained

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = export_pretrained(model, tokenizer, tmp_path / "sft" / "model", extra_files={"rlhf_summary.json": {}})
    assert _mode(out) == 0o750
    files = [p for p in out.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o640 for p in files}
