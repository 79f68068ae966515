"""A full disk while saving a checkpoint or exporting: one DiskFullError (a UserError) naming
the path being written, the partial files removed, the previous checkpoint (and `latest`) or
the previous export kept as it was. On a real full filesystem (a 2 MiB tmpfs, where mounting
is allowed) and, everywhere, with the writer made to fail with ENOSPC."""

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.distributed import checkpoint as checkpoint_module
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.strategy import World
from rlhf.errors import UserError
from rlhf.models.export import DiskFullError, disk_full_reason, export_pretrained


class Trainee:
    """A `Checkpointable` tiny model; `extra` adds that many float32 values to optimizer.pt."""

    def __init__(self, features: int = 8, extra: int = 0, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.Linear(features, features)
        self.extra = torch.zeros(extra)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.module.state_dict().items()}

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.weights(), directory / "model.safetensors")
        torch.save({"extra": self.extra}, directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        self.module.load_state_dict(load_file(directory / "model.safetensors"))
        torch.load(directory / "optimizer.pt", weights_only=True)


def tiny_lm(vocab: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=False))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# -- a real full disk ------------------------------------------------------------------------

@pytest.mark.parametrize("too_big", ["weights", "optimizer"])
def test_checkpoint_that_does_not_fit(small_fs, too_big):
    """weights: safetensors' own error type ("No space left on device"); optimizer: torch.save's
    bare RuntimeError ("unexpected pos ...")."""
    root = small_fs / "checkpoints"
    manager = CheckpointManager(root, World(), keep_last=2)
    first = Trainee()
    manager.save({"policy": first}, 1, {"step": 1})
    saved = first.weights()

    big = Trainee(features=1024) if too_big == "weights" else Trainee(extra=1_000_000)
    with pytest.raises(UserError) as caught:
        manager.save({"policy": big}, 2, {"step": 2})
    message = str(caught.value)
    assert isinstance(caught.value, DiskFullError)
    assert "\n" not in message
    assert message.startswith(f"no space left on device while writing {root / '.step-2.tmp' / 'policy'}")
    assert f"the previous checkpoint {root / 'step-1'} is kept" in message
    assert not (root / ".step-2.tmp").exists() and not (root / "step-2").exists()
    assert (root / "latest").read_text().strip() == "step-1"

    resumed = CheckpointManager(root, World(), keep_last=2)
    assert resumed.resolve("auto") == root / "step-1"
    first.module.reset_parameters()
    assert resumed.load({"policy": first}, root / "step-1")["step"] == 1
    for name, value in first.module.state_dict().items():
        assert torch.equal(value, saved[name])
    # The space is back: the next save that fits goes through.
    resumed.save({"policy": first}, 2, {"step": 2})
    assert resumed.resolve("auto") == root / "step-2"


def test_export_that_does_not_fit(small_fs, tokenizer):
    target = small_fs / "export"
    export_pretrained(tiny_lm(vocab=64, hidden=16), tokenizer, target, extra_files={"card.json": {"ok": 1}})
    before = snapshot(target)

    big = tiny_lm(vocab=4096, hidden=256)  # 2 x 4 MiB of float32 embeddings
    with pytest.raises(UserError) as caught:
        export_pretrained(big, tokenizer, target)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"no space left on device while writing {target}")
    assert f"the previous export {target} is kept" in message
    assert sorted(p.name for p in small_fs.iterdir()) == ["export"], "no partial directory is left"
    assert snapshot(target) == before

    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.from_pretrained(target).config.vocab_size == 64

    with pytest.raises(UserError, match="nothing was left at"):
        export_pretrained(big, tokenizer, small_fs / "fresh")
    assert sorted(p.name for p in small_fs.iterdir()) == ["export"]


# -- ENOSPC from the writer, wherever mounting is not allowed --------------------------------

class _RustError(Exception):
    """Stands in for safetensors' SafetensorError: its own type, the OS error only as text."""


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    _RustError("Error while serializing: I/O error: No space left on device (os error 28)"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed, No space left on device"),
])
def test_checkpoint_writer_out_of_space(tmp_path, monkeypatch, error):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, World(), keep_last=2)
    trainee = Trainee()
    manager.save({"policy": trainee}, 1, {"step": 1})

    def full(directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(trainee, "save_state", full)
    with pytest.raises(DiskFullError) as caught:
        manager.save({"policy": trainee}, 2, {"step": 2})
    message = str(caught.value)
    assert message.startswith(f"no space left on device while writing {root / '.step-2.tmp' / 'policy'}")
    assert f"the previous checkpoint {root / 'step-1'} is kept" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    assert (root / "latest").read_text().strip() == "step-1"


def test_pointer_write_out_of_space_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, World(), keep_last=2)
    manager.save({"policy": Trainee()}, 1, {"step": 1})

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "write_text_atomic", full)
    with pytest.raises(DiskFullError, match=f"while writing {root / 'latest'}"):
        manager.save({"policy": Trainee()}, 2, {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    assert manager.resolve("auto") == root / "step-1"


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    if shutil.disk_usage(tmp_path).free < 1 << 30:
        pytest.skip("needs a filesystem with free space")
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, World(), keep_last=2)
    trainee = Trainee()
    manager.save({"policy": trainee}, 1, {"step": 1})

    def broken(directory):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainee, "save_state", broken)
    with pytest.raises(RuntimeError, match="^boom$"):
        manager.save({"policy": trainee}, 2, {"step": 2})
    assert (root / "latest").read_text().strip() == "step-1"


def test_export_writer_out_of_space(tmp_path, monkeypatch, tokenizer):
    target = tmp_path / "export"
    model = tiny_lm(vocab=64, hidden=16)
    export_pretrained(model, tokenizer, target)
    before = snapshot(target)

    def full(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(DiskFullError) as caught:
        export_pretrained(model, tokenizer, target)
    assert str(caught.value).startswith(f"no space left on device while writing {target}")
    assert f"the previous export {target} is kept" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert snapshot(target) == before


def test_disk_full_reason():
    assert disk_full_reason(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert disk_full_reason(OSError(errno.EDQUOT, "x")) == "disk quota exceeded"
    chained = RuntimeError("save failed")
    chained.__cause__ = OSError(errno.ENOSPC, "x")
    assert disk_full_reason(chained) == "no space left on device"
    assert disk_full_reason(_RustError("I/O error: No space left on device (os error 28)")) is not None
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full_reason(ValueError(json.dumps({"no": "space"}))) is None
