"""A damaged newest checkpoint: `resolve("auto")` skips it for the previous complete one
(truncated or missing files, checked against meta.json's manifest), `load` falls back when a
file is corrupted in place, and a run with nothing complete left, or an explicit damaged
`train.resume` path, stops with one UserError line naming the file."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.distributed.checkpoint import FILES, META, CheckpointManager
from rlhf.distributed.strategy import World
from rlhf.errors import UserError


class Trainee:
    """The `Checkpointable` of a tiny model: weights in safetensors, optimizer via torch.save."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.Linear(8, 4)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)

    def train_step(self) -> None:
        self.module(torch.randn(2, 8)).pow(2).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.weights().items()}, directory / "model.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict()}, directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        self.module.load_state_dict(load_file(directory / "model.safetensors"))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True)["optimizer"])


@pytest.fixture
def run(tmp_path):
    """Checkpoints step-1..3 of a tiny trainee; the weights saved at each step."""
    root = tmp_path / "checkpoints"
    trainee = Trainee()
    manager = CheckpointManager(root, World(), keep_last=3)
    saved = {}
    for step in (1, 2, 3):
        trainee.train_step()
        manager.save({"policy": trainee}, step, {"step": step})
        saved[step] = trainee.weights()
    trainee.train_step()  # the live model moves on: a load must bring the saved weights back
    return root, trainee, saved


def fresh(root: Path) -> CheckpointManager:
    return CheckpointManager(root, World(), keep_last=3)


def assert_weights(trainee: Trainee, expected: dict[str, torch.Tensor]) -> None:
    for name, value in trainee.module.state_dict().items():
        assert torch.equal(value, expected[name]), name


def corrupt_in_place(path: Path, at_end: bool = False) -> None:
    data = bytearray(path.read_bytes())
    where = slice(len(data) - 22, len(data)) if at_end else slice(0, 8)
    data[where] = b"\xff" * len(data[where])
    path.write_bytes(bytes(data))


def test_meta_holds_a_manifest_of_every_file(run):
    root, _, _ = run
    meta = json.loads((root / "step-3" / META).read_text())
    files = meta[FILES]
    assert set(files) == {"policy/model.safetensors", "policy/optimizer.pt", "client_state_rank0.pt"}
    for rel, size in files.items():
        assert (root / "step-3" / rel).stat().st_size == size


def test_truncated_file_resumes_from_the_previous_checkpoint(run, capsys):
    root, trainee, saved = run
    target = root / "step-3" / "policy" / "model.safetensors"
    size = target.stat().st_size
    with target.open("r+b") as f:
        f.truncate(size // 2)

    manager = fresh(root)
    assert manager.resolve("auto") == root / "step-2"
    out = capsys.readouterr().out
    assert (f"[checkpoint] step-3 is damaged (policy/model.safetensors: {size // 2} bytes, {size} expected); "
            "resuming from step-2") in out
    assert manager.load({"policy": trainee}, root / "step-2")["step"] == 2
    assert_weights(trainee, saved[2])


def test_missing_file_resumes_from_the_previous_checkpoint(run, capsys):
    root, trainee, saved = run
    (root / "step-3" / "policy" / "optimizer.pt").unlink()

    manager = fresh(root)
    assert manager.resolve("auto") == root / "step-2"
    assert ("[checkpoint] step-3 is damaged (policy/optimizer.pt: missing); resuming from step-2"
            in capsys.readouterr().out)
    assert manager.load({"policy": trainee}, root / "step-2")["step"] == 2
    assert_weights(trainee, saved[2])


def test_missing_latest_directory_resumes_from_the_previous_checkpoint(run, capsys):
    root, _, _ = run
    import shutil

    shutil.rmtree(root / "step-3")
    assert fresh(root).resolve("auto") == root / "step-2"
    assert "step-3 is damaged (the directory is missing); resuming from step-2" in capsys.readouterr().out


@pytest.mark.parametrize("rel, at_end, error", [
    ("policy/model.safetensors", False, "SafetensorError"),
    ("policy/optimizer.pt", True, "RuntimeError"),
])
def test_file_corrupted_in_place_falls_back_on_load(run, capsys, rel, at_end, error):
    root, trainee, saved = run
    corrupt_in_place(root / "step-3" / rel, at_end=at_end)

    manager = fresh(root)
    path = manager.resolve("auto")
    assert path == root / "step-3", "same sizes: the manifest cannot tell"
    state = manager.load({"policy": trainee}, path)
    assert state["step"] == 2
    assert manager.loaded == root / "step-2"
    assert_weights(trainee, saved[2])
    out = capsys.readouterr().out
    assert f"[checkpoint] step-3 could not be loaded ({rel}: {error}" in out
    assert out.rstrip().endswith("resuming from step-2")


def test_every_checkpoint_damaged_is_one_user_error(run):
    root, _, _ = run
    for step in (1, 2, 3):
        target = root / f"step-{step}" / "policy" / "model.safetensors"
        target.write_bytes(target.read_bytes()[:10])
    with pytest.raises(UserError) as caught:
        fresh(root).resolve("auto")
    message = str(caught.value)
    assert "\n" not in message
    assert str(root / "step-3") in message and "policy/model.safetensors" in message
    assert "train.resume=never" in message


def test_every_checkpoint_corrupted_in_place_is_one_user_error_on_load(run, capsys):
    root, trainee, _ = run
    for step in (1, 2, 3):
        corrupt_in_place(root / f"step-{step}" / "policy" / "model.safetensors")
    manager = fresh(root)
    path = manager.resolve("auto")
    with pytest.raises(UserError) as caught:
        manager.load({"policy": trainee}, path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"checkpoint {root / 'step-3'} is damaged (policy/model.safetensors: SafetensorError" in message
    assert "train.resume=never" in message
    out = capsys.readouterr().out
    assert "step-3 could not be loaded" in out and "step-2 could not be loaded" in out


def test_explicit_damaged_path_is_a_user_error(run):
    root, _, _ = run
    (root / "step-2" / "client_state_rank0.pt").unlink()
    with pytest.raises(UserError) as caught:
        fresh(root).resolve(str(root / "step-2"))
    message = str(caught.value)
    assert "\n" not in message
    assert str(root / "step-2") in message and "client_state_rank0.pt: missing" in message


def test_explicit_path_corrupted_in_place_does_not_fall_back(run, capsys):
    root, trainee, _ = run
    corrupt_in_place(root / "step-2" / "policy" / "model.safetensors")
    manager = fresh(root)
    path = manager.resolve(str(root / "step-2"))
    with pytest.raises(UserError) as caught:
        manager.load({"policy": trainee}, path)
    assert "policy/model.safetensors" in str(caught.value)
    assert "resuming from" not in capsys.readouterr().out


def test_checkpoint_without_manifest_counts_as_complete(run):
    root, trainee, saved = run
    meta_path = root / "step-3" / META
    meta = json.loads(meta_path.read_text())
    del meta[FILES]
    meta_path.write_text(json.dumps(meta))
    manager = fresh(root)
    assert manager.resolve("auto") == root / "step-3"
    assert manager.load({"policy": trainee}, root / "step-3")["step"] == 3
    assert_weights(trainee, saved[3])


class Follower(World):
    """Rank 1 of two, whose all_reduce(max) sees rank 0 contribute `leader`."""

    def __init__(self, leader: float):
        super().__init__()
        self.rank, self.world_size, self.leader = 1, 2, leader

    def all_reduce(self, values, op="mean"):
        assert op == "max"
        return {k: max(float(v), self.leader) for k, v in values.items()}


def test_other_workers_follow_rank_0(run, capsys):
    root, _, _ = run
    # Rank 1 sees an intact step-3, but rank 0 chose step-2: rank 1 resumes from step-2 too.
    assert CheckpointManager(root, Follower(2.0), keep_last=3).resolve("auto") == root / "step-2"
    # Rank 0 found nothing complete: rank 1 stops too, with one line.
    with pytest.raises(UserError, match="no complete checkpoint"):
        CheckpointManager(root, Follower(-2.0), keep_last=3).resolve("auto")
    assert capsys.readouterr().out == "", "only rank 0 prints"
