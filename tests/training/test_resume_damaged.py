"""A stage whose newest checkpoint is damaged resumes from the newest complete one and says so,
and ends with the model of a run that was never interrupted; with every checkpoint damaged it
stops with one line naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.config import SFTConfig, load_config
from rlhf.errors import UserError
from rlhf.training.output import FINISHED_MARKER
from stages import sft

REPO = Path(__file__).resolve().parents[2]


def sft_config(out: Path, model: Path, data: dict, steps: int):
    return load_config(SFTConfig, [str(REPO / "configs/sft.yaml")], [
        f"output_dir={out}", f"model.path={model}", "model.tiny=null", f"data.train.path={data['sft']}",
        "data.pretrain.path=''", f"train.max_steps={steps}", "train.micro_batch_size=8",
        "train.global_batch_size=8", "train.eval_every=0", "train.save_every=3", "train.keep_last=3",
        "logging.progress=false"])


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model_dir, quickstart_data, capsys):
    straight = sft.main(sft_config(tmp_path / "straight", tiny_model_dir, quickstart_data, 12))
    out = tmp_path / "run"
    sft.main(sft_config(out, tiny_model_dir, quickstart_data, 12))
    # As if it had stopped after step 9 with that checkpoint half written: the export and the
    # marker of a finished run go, step-9's weights are cut short.
    (out / FINISHED_MARKER).unlink()
    weights = out / "checkpoints" / "step-9" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    resumed = sft.main(sft_config(out, tiny_model_dir, quickstart_data, 12))
    printed = capsys.readouterr().out
    assert "step-9 is damaged (policy/model.safetensors" in printed
    assert f"resumed from {out / 'checkpoints' / 'step-6'} at step 6" in printed
    assert resumed.metrics["sft/final_loss"] == pytest.approx(straight.metrics["sft/final_loss"], rel=1e-6)
    expected, got = load_file(straight.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert all((expected[k] - got[k]).abs().max() <= 1e-6 for k in expected)

    # Every checkpoint damaged: one clear error, no traceback from the CLI.
    (out / FINISHED_MARKER).unlink()
    for path in (out / "checkpoints").glob("step-*/policy/model.safetensors"):
        path.write_bytes(b"")
    with pytest.raises(UserError, match=r"is damaged \(policy/model.safetensors.*train.resume=never"):
        sft.main(sft_config(out, tiny_model_dir, quickstart_data, 15))
    done = subprocess.run([sys.executable, "-m", "rlhf", "sft", "--config", str(REPO / "configs/sft.yaml"),
                           f"output_dir={out}", f"model.path={tiny_model_dir}", "model.tiny=null",
                           f"data.train.path={quickstart_data['sft']}", "data.pretrain.path=''", "train.max_steps=15",
                           "train.micro_batch_size=8", "train.global_batch_size=8", "train.save_every=3",
                           "logging.progress=false"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
