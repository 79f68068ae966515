"""SIGTERM (what SLURM sends before preemption) to `rlhf sft`, `rlhf rm`, `rlhf ppo` and `rlhf
pipeline` mid-run: a checkpoint, one line with the resume hint and exit 143; running the same
command again resumes and finishes, and a stage's export equals the one of the uninterrupted
run."""

import subprocess
import sys
from pathlib import Path

import pytest
from child_runs import assert_stopped_with_one_line, child_env, logged_steps, numbers, stop_with_sigterm
from safetensors.torch import load_file

from rlhf.logging.metrics import read_metrics

pytestmark = pytest.mark.claim  # the proof of the README's SIGTERM and exact-resume claims (tests/README.md)

REPO = Path(__file__).resolve().parents[2]
ENV = child_env(OMP_NUM_THREADS="1")  # the stopped and the straight run share the two cores


def sft_command(out: Path, model: Path, data: dict) -> list[str]:
    return [sys.executable, "-m", "rlhf", "sft", "--config", str(REPO / "configs/sft.yaml"), f"output_dir={out}",
            f"model.path={model}", "model.tiny=null", f"data.train.path={data['sft']}", "data.pretrain.path=''",
            "train.max_steps=40", "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_every=0",
            "logging.progress=false"]


def rm_command(out: Path, model: Path, data: dict) -> list[str]:
    return [sys.executable, "-m", "rlhf", "rm", "--config", str(REPO / "configs/rm.yaml"), f"output_dir={out}",
            f"model.path={model}", f"data.train.path={data['rank']}", "data.eval_fraction=0.05",
            "train.max_steps=40", "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_every=20",
            "data.max_length=96", "data.max_prompt_length=48", "logging.progress=false"]


def ppo_command(out: Path, model: Path, data: dict) -> list[str]:
    return [sys.executable, "-m", "rlhf", "ppo", "--config", str(REPO / "configs/ppo.yaml"), f"output_dir={out}",
            f"model.path={model}", f"reward_model.path={model}", f"data.prompts.path={data['prompts']}",
            f"data.eval_prompts.path={data['prompts_eval']}", f"data.pretrain.path={data['pretrain']}",
            "ppo.iterations=16", "ppo.eval_every=8", "reward.normalize=running", "kl.adaptive=true",
            "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "ppo.ptx_coef=0.5",
            "rollout.max_new_tokens=8", "eval.max_prompts=4", "logging.progress=false"]


COMMANDS = {"sft": sft_command, "rm": rm_command, "ppo": ppo_command}


def assert_same_export(expected_dir: Path, got_dir: Path) -> None:
    expected = load_file(expected_dir / "model" / "model.safetensors")
    got = load_file(got_dir / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("stage, stop_after", [("sft", 5), ("rm", 5), ("ppo", 3)])
def test_sigterm_checkpoints_and_the_rerun_resumes_to_the_same_model(stage, stop_after, tmp_path, tiny_model_dir,
                                                                   quickstart_data):
    # The uninterrupted run and the one to stop, side by side (one thread each).
    straight_dir, out = tmp_path / "straight", tmp_path / "stopped"
    command = COMMANDS[stage](out, tiny_model_dir, quickstart_data)
    straight = subprocess.Popen(COMMANDS[stage](straight_dir, tiny_model_dir, quickstart_data), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = stop_with_sigterm(process, out, stop_after)
        _, straight_err = straight.communicate(timeout=600)
    finally:
        for child in (process, straight):
            if child.poll() is None:
                child.kill()
                child.wait()
    assert straight.returncode == 0, straight_err[-3000:]

    stopped_at = assert_stopped_with_one_line(process, stderr, stage)
    total = max(logged_steps(straight_dir))
    assert stop_after <= stopped_at < total and max(logged_steps(out)) == stopped_at
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at}"
    assert not (out / "model").exists()

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in resumed.stdout
    assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(straight_dir)]
    for a, b in zip(numbers(straight_dir), numbers(out)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    assert_same_export(straight_dir, out)


def pipeline_command(root: Path, data: dict) -> list[str]:
    return [sys.executable, "-m", "rlhf", "pipeline", "--config", str(REPO / "configs/pipeline.yaml"),
            f"output_dir={root}", "ray.enabled=false", "eval=null",
            f"sft.data.train.path={data['sft']}", f"sft.data.pretrain.path={data['pretrain']}",
            "sft.model.tiny.hidden_size=32", "sft.model.tiny.intermediate_size=64", "sft.train.max_steps=3",
            f"rm.data.train.path={data['rank']}", "rm.train.max_steps=40", "rm.data.eval_fraction=0.02",
            "rm.train.micro_batch_size=4", "rm.train.global_batch_size=8", "rm.train.eval_every=20",
            f"ppo.data.prompts.path={data['prompts']}", f"ppo.data.eval_prompts.path={data['prompts_eval']}",
            f"ppo.data.pretrain.path={data['pretrain']}", "ppo.ppo.iterations=2", "ppo.ppo.rollout_batch_size=8",
            "ppo.ppo.mini_batch_size=8", "ppo.ppo.micro_batch_size=8", "ppo.rollout.max_new_tokens=6",
            "ppo.eval.max_prompts=4", "ppo.ppo.eval_every=2",
            *[f"{stage}.logging.progress=false" for stage in ("sft", "rm", "ppo")]]


@pytest.mark.slow
def test_sigterm_to_the_pipeline_stops_the_stage_and_the_rerun_resumes_it(tmp_path, quickstart_data):
    root = tmp_path / "run"
    command = pipeline_command(root, quickstart_data)
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = stop_with_sigterm(process, root / "rm", 5)  # during the reward model, SFT done
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stopped_at = assert_stopped_with_one_line(process, stderr, "rm")
    assert (root / "sft" / "lineage.json").is_file()
    assert (root / "rm" / "lineage.pending.json").is_file() and not (root / "rm" / "lineage.json").exists()
    assert (root / "rm" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at}"
    assert not (root / "ppo").exists()

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = rerun.stdout.splitlines()
    assert any(line.startswith("[pipeline] sft:") and "skipped" in line for line in lines), rerun.stdout[-3000:]
    assert any(line.startswith("[pipeline] rm:") and "resuming" in line for line in lines), rerun.stdout[-3000:]
    assert f"resumed from {root / 'rm' / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in rerun.stdout
    assert [r["step"] for r in read_metrics(root / "rm")] == [0, *range(1, 41)]
    for stage in ("sft", "rm", "ppo"):
        assert (root / stage / "lineage.json").is_file() and not (root / stage / "lineage.pending.json").exists()
