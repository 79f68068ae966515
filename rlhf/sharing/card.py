"""The model card (README.md) of an exported run: YAML front matter the hub reads, then what the
model is, what it was trained from and on, its config without secrets, its evaluation and how
to load it. Everything comes from the run directory; nothing is loaded or computed anew except
the row counts of data files that still have their recorded hash, and, for a run started
directly (no lineage), the hashes of its data files, which the card says were taken at export."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhf.sharing.run_dir import Located, Parent, StageRun, data_inputs, hub_id, lookup

_STAGE_WHAT = {
    "sft": "supervised fine-tuning on (prompt, response) demonstrations",
    "rm": "a reward model trained on ranked answers (pairwise / K-wise ranking loss)",
    "ppo": "a policy optimised against a reward with a KL penalty to its reference",
    "dpo": "a policy trained by direct preference optimisation on ranked answers",
}
_ADVANTAGE = {"gae": "PPO", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}
_KEY_PARAMS = {
    "sft": ("train.epochs", "train.max_steps", "train.lr", "train.global_batch_size", "data.max_length",
            "model.lora.r"),
    "rm": ("train.epochs", "train.max_steps", "train.lr", "train.global_batch_size", "data.max_length",
           "loss.center_coef", "model.lora.r"),
    "ppo": ("ppo.advantage", "ppo.iterations", "ppo.rollout_batch_size", "ppo.mini_batch_size", "ppo.ppo_epochs",
            "ppo.actor_lr", "ppo.critic_lr", "ppo.clip_eps", "ppo.ptx_coef", "kl.coef", "kl.estimator",
            "kl.adaptive", "rollout.n_samples_per_prompt", "rollout.max_new_tokens", "rollout.temperature",
            "reward.normalize", "model.lora.r"),
    "dpo": ("loss.loss_type", "loss.beta", "loss.label_smoothing", "train.epochs", "train.max_steps", "train.lr",
            "train.global_batch_size", "data.max_length", "model.lora.r"),
}
EVAL_DIRS = ("eval", "../eval")
"""Where an `rlhf eval` report of the run is looked for, relative to the run directory (the
pipeline writes its own next to the stages)."""


def algorithm(run: StageRun) -> str:
    cfg, stage = run.config, run.stage
    if stage == "ppo":
        name = _ADVANTAGE.get(str(lookup(cfg, "ppo.advantage")), "PPO")
        return name + ("-ptx" if (lookup(cfg, "ppo.ptx_coef") or 0) > 0 and name == "PPO" else "")
    if stage == "dpo":
        return "IPO" if lookup(cfg, "loss.loss_type") == "ipo" else "DPO"
    return {"sft": "SFT", "rm": "reward modelling"}.get(stage, stage)


def public_config(config: dict) -> dict:
    """`config` without any key that holds a secret: keys named like a token, API key or
    password (W&B's and the hub's included), values holding the value of a secret-looking
    environment variable, and URLs carrying credentials or query values."""
    from rlhf.logging.trackers import REDACTED, public_config as redacted

    def clean(original: Any, masked: Any) -> tuple[bool, Any]:
        if masked == REDACTED and original != REDACTED:  # the whole value sat under a secret key
            return False, None
        if isinstance(original, dict):
            kept = {}
            for key, value in original.items():
                keep, value = clean(value, masked[key])
                if keep:
                    kept[key] = value
            return True, kept
        if isinstance(original, list):
            items = [clean(o, m) for o, m in zip(original, masked)]
            return all(keep for keep, _ in items), [v for _, v in items]
        if isinstance(masked, str) and REDACTED in masked and not (isinstance(original, str) and REDACTED in original):
            return False, None
        if isinstance(original, str) and _has_credentials(original):
            return False, None
        return True, original

    return clean(config, redacted(config))[1]


def _has_credentials(text: str) -> bool:
    if "://" not in text:
        return False
    parts = urllib.parse.urlsplit(text)
    return "@" in parts.netloc or bool(parts.query)


def find_eval(run: StageRun) -> Optional[dict]:
    """The `rlhf eval` report (eval.json) beside the run that judged this export: its policy is
    this run's model/ and it was written after the run finished (an older one judged an earlier
    export of the same directory)."""
    finished = run.finished_file.stat().st_mtime
    for rel in EVAL_DIRS:
        file = run.dir / rel / "eval.json"
        try:
            report = json.loads(file.read_text(encoding="utf-8"))
            written = file.stat().st_mtime
        except (OSError, ValueError):
            continue
        policy = report.get("policy") if isinstance(report, dict) else None
        if isinstance(policy, str) and _names_model(policy, run) and "models" in report and written >= finished:
            return report
    return None


def _names_model(policy: str, run: StageRun) -> bool:
    path = Path(policy).expanduser()
    if path.resolve() == run.model_dir.resolve():
        return True
    # A pipeline with a relative output_dir records a relative path, relative to where it ran.
    return not path.is_absolute() and path.parts[-2:] == (run.dir.name, "model")


def base_model(root: StageRun) -> dict:
    """What the first run of the chain started from: {"text": ..., "hub_id": ..., "license": ...}."""
    model = lookup(root.config, "model") or {}
    path, gguf, tiny = model.get("path") or "", model.get("gguf_file"), model.get("tiny")
    recorded = root.lineage.inputs.get("model.path")
    if path:
        repo = hub_id(path)
        text = f"`{path}`" + (f" (hub model {repo})" if repo and repo != path else " (hub model)" if repo else "")
        if gguf:
            text += f", GGUF file `{gguf}` dequantised on load"
        if recorded:
            text += f"; sha256 of its files at training time `{recorded}`"
        return {"text": text, "hub_id": repo, "license": _license_of(Path(path).expanduser())}
    if isinstance(tiny, dict):
        shape = ", ".join(f"{k} {v}" for k, v in tiny.items())
        return {"text": f"none: a tiny Llama built from the config ({shape}) and trained from scratch",
                "hub_id": None, "license": None}
    return {"text": "unknown (the saved config names no model)", "hub_id": None, "license": None}


def _license_of(model_dir: Path) -> Optional[str]:
    """The license in a local base model's own card front matter, if it has one."""
    try:
        text = (model_dir / "README.md").read_text(encoding="utf-8")
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---", 2)[1])
            value = front.get("license") if isinstance(front, dict) else None
            return str(value) if value else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError, IndexError):
        pass
    return None


def render(located: Located, chain: list[Parent], others: list[Parent], model_ref: str) -> str:
    """The whole README.md. `chain`: the runs the model descends from, newest first; `others`:
    the rest of the run's parents (a PPO run's reward model); `model_ref`: the hub id or
    directory the loading snippet names."""
    run = located.run
    root = chain[-1].run if chain and chain[-1].run is not None else run
    base = base_model(root)
    algo = algorithm(run)
    front: dict[str, Any] = {"library_name": "transformers"}
    if base["hub_id"]:
        front["base_model"] = base["hub_id"]
    if base["license"]:
        front["license"] = base["license"]
    front["tags"] = ["rlhf", run.stage] + ([algo.lower()] if algo.lower() not in ("sft", run.stage) and
                                          " " not in algo else [])
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
             f"# {run.dir.name}: {algo}\n",
             _what(run, algo), _lineage_section(run, chain, others, base), _data_section(run, chain, others),
             _config_section(run), _eval_section(run), _load_section(run, model_ref)]
    return "\n".join(parts)


def _what(run: StageRun, algo: str) -> str:
    code = run.lineage.code
    made = f"rlhf {code.get('package', '?')}"
    if code.get("git_commit"):
        made += f" at commit {code['git_commit'][:12]}" + (" (uncommitted changes)" if code.get("git_dirty") else "")
    if run.direct:
        made = "rlhf, started directly rather than by `rlhf pipeline`, so no lineage (code version not recorded)"
        finished = f"finished {run.lineage.created}."
    else:
        finished = f"finished {run.lineage.created}, lineage id `{run.lineage.lineage_id[:12]}`."
    lines = ["## What it is", "",
             f"Stage `{run.stage}`: {_STAGE_WHAT.get(run.stage, run.stage)}, with {algo}. Trained by {made}; "
             f"{finished}", "",
             "| hyper-parameter | value |", "|---|---|"]
    for key in _KEY_PARAMS.get(run.stage, ()):
        value = lookup(run.config, key)
        if value is not None:
            lines.append(f"| `{key}` | {value} |")
    lines.append(f"| `seed` | {run.config.get('seed')} |")
    return "\n".join(lines) + "\n"


def _lineage_section(run: StageRun, chain: list[Parent], others: list[Parent], base: dict) -> str:
    names = [run.stage.upper()] + [p.role.upper() for p in chain] + ["base"]
    lines = ["## Base model", "", " <- ".join(names), ""]
    lines.append(f"- **{run.stage.upper()}** (this model): `{run.dir}`")
    for parent in chain + others:
        lines.append(f"- **{parent.role.upper()}**{'' if parent in chain else ' (used in training, not an ancestor)'}: "
                     + _parent_text(parent))
    lines.append(f"- **base**: {base['text']}")
    return "\n".join(lines) + "\n"


def _parent_text(parent: Parent) -> str:
    if parent.run is None:
        return "its run directory or lineage is gone"
    if parent.run.direct:
        text = f"`{parent.run.dir}`, started directly (no lineage)"
    else:
        text = f"`{parent.run.dir}`, lineage id `{parent.run.lineage.lineage_id[:12]}`"
    if parent.current is None:
        text += "; which version of it was used is not recorded, so a re-training since would not show here"
    elif not parent.current:
        text += " (re-trained since: the run this model used had another lineage id)"
    metrics = {k: v for k, v in parent.run.lineage.metrics.items() if k.startswith("eval/")}
    if metrics:
        text += "; " + ", ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:4])
    return text


def _data_section(run: StageRun, chain: list[Parent], others: list[Parent]) -> str:
    runs = [run] + [p.run for p in chain + others if p.run is not None]
    intro = "Every data file of every run above, with the sha256 its lineage recorded."
    direct = [one.stage for one in runs if one.direct]
    if direct:
        named = f"the {direct[0]} run was" if len(direct) == 1 else \
            f"the {', '.join(direct[:-1])} and {direct[-1]} runs were"
        recorded = "" if len(direct) == len(runs) else " as its lineage recorded"
        intro = (f"Every data file of every run above with its sha256{recorded}; "
                 f"{named} started directly (not by `rlhf pipeline`) and recorded no lineage, so those files were "
                 "hashed at export time, not at training: a file changed since training would not be noticed.")
    lines = ["## Data", "", intro, "",
             "| stage | config key | file | sha256 | rows |", "|---|---|---|---|---|"]
    for one in runs:
        for item in data_inputs(one):
            rows = str(item.rows) if item.rows is not None else f"? ({item.note})" if item.note else "?"
            sha = f"`{item.sha256}`" if item.sha256 else "?"
            if item.at_export:
                sha += " (at export, not at training)"
            lines.append(f"| {item.stage} | `{item.key}` | `{item.path}` | {sha} | {rows} |")
    return "\n".join(lines) + "\n"


def _config_section(run: StageRun) -> str:
    text = yaml.safe_dump(public_config(run.config), sort_keys=False)
    return "## Training config\n\nThe resolved config of the stage (keys holding secrets left out).\n\n" \
           f"```yaml\n{text}```\n"


def _eval_section(run: StageRun) -> str:
    lines = ["## Evaluation", ""]
    report = find_eval(run)
    if report is not None:
        from rlhf.evaluation.report import markdown

        baseline = f" against `{report['baseline']}`" if report.get("baseline") else ""
        lines += [f"`rlhf eval` on {report.get('answers', '?')} sampled answers to `{report.get('prompts')}`{baseline}:",
                  "", markdown(report)]
    else:
        lines += ["Not evaluated (no `rlhf eval` report of this export beside the run).", ""]
    metrics = {k: v for k, v in run.lineage.metrics.items() if isinstance(v, (int, float))}
    if metrics:
        source = run.metrics_source if run.direct else "from its lineage"
        lines += [f"Held-out numbers the stage logged while training ({source}):", "",
                  "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def _load_section(run: StageRun, model_ref: str) -> str:
    if _is_classifier(run):
        code = (f"import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"model = AutoModelForSequenceClassification.from_pretrained({model_ref!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({model_ref!r})\n"
                "messages = [{\"role\": \"user\", \"content\": \"Hello!\"}, {\"role\": \"assistant\", \"content\": \"Hi there.\"}]\n"
                "inputs = tokenizer.apply_chat_template(messages, return_tensors=\"pt\", return_dict=True)\n"
                "with torch.no_grad():\n    print(model(**inputs).logits[0, 0].item())  # the answer's reward\n")
    else:
        code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({model_ref!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({model_ref!r})\n"
                "messages = [{\"role\": \"user\", \"content\": \"Hello!\"}]\n"
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
                "                                       return_dict=True)\n"
                "output = model.generate(**inputs, max_new_tokens=64)\n"
                "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n")
    return f"## How to load\n\n```python\n{code}```\n"


def _is_classifier(run: StageRun) -> bool:
    try:
        config = json.loads((run.model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return run.stage == "rm"
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ())
