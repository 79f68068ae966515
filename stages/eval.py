"""`rlhf eval`: sample answers from a policy (and a baseline) for held-out prompts and judge them.

    rlhf eval --config configs/eval.yaml [key=value ...]
    rlhf eval policy.path=runs/quickstart/ppo/model baseline.path=runs/quickstart/sft/model \
        prompts.path=data/quickstart/prompts_eval.jsonl judges=[rlhf.data.quickstart:gold_reward,runs/quickstart/rm/model]

Per model: mean reward per judge, KL to the reference (policy only), answer length, EOS rate,
repetition rate, ROUGE-L and BLEU against reference answers, perplexity on a pretraining set;
the policy's win rate against the baseline per judge with a 95% Wilson interval. Writes
eval.json and eval.md into `output_dir`. One process on one device (no training, no Ray).
"""

from __future__ import annotations

from rlhf.config import EvalConfig
from rlhf.data.builders import load_records
from rlhf.distributed.strategy import pick_device
from rlhf.evaluation.judges import build_judges, reference_answers
from rlhf.evaluation.measure import measure_model
from rlhf.evaluation.metrics import win_rate
from rlhf.evaluation.report import markdown, write_report
from rlhf.logging.quiet import quiet_third_party


def main(cfg: EvalConfig) -> dict:
    quiet_third_party(cfg.verbose)
    device = pick_device()

    # 1. Data: the held-out prompts (each repeated samples_per_prompt times), their reference
    #    answers where the file has them, and the pretraining texts for perplexity.
    records, _ = load_records("prompt", cfg.prompts, cfg.on_error)
    records = [r for r in records[: cfg.max_prompts or None] for _ in range(cfg.samples_per_prompt)]
    references = reference_answers(records, cfg.reference_field)
    pretrain = []
    if cfg.pretrain.given:
        texts, _ = load_records("pretrain", cfg.pretrain, cfg.on_error)
        pretrain = [t.text for t in texts[: cfg.pretrain_max_rows or None]]

    # 2. Judges, and the models compared: the policy (with the KL reference: the baseline unless
    #    given) and the baseline.
    judges = build_judges(cfg.judges, cfg.reference_field, device, cfg.rm_max_length, cfg.max_prompt_length,
                          cfg.batch_size, cfg.kernels)
    baseline = cfg.baseline if cfg.baseline.path or cfg.baseline.tiny is not None else None
    reference = cfg.reference if cfg.reference.path or cfg.reference.tiny is not None else baseline
    models = {"policy": (cfg.policy, reference), **({"baseline": (baseline, None)} if baseline else {})}

    # 3. Sample and measure each model, with the same seed (answer i of both shares its random numbers).
    measured, scores, answers = {}, {}, {}
    for name, (model_cfg, kl_reference) in models.items():
        measured[name], scores[name], answers[name] = measure_model(
            model_cfg, kl_reference, records, judges, references, pretrain, cfg, device)

    # 4. Win rate of the policy against the baseline, answer by answer, per judge.
    wins = {j.name: win_rate(scores["policy"][j.name], scores["baseline"][j.name]).as_dict()
            for j in judges} if baseline else {}

    # 5. Write eval.json (with the first answers) and eval.md.
    result = {"policy": cfg.policy.path, "baseline": baseline.path if baseline else None,
              "reference": reference.path if reference else None, "prompts": cfg.prompts.path,
              "answers": len(records), "judges": [j.name for j in judges], "models": measured,
              "win_rate": wins, "win_rate_interval": "Wilson score interval, 95%",
              "samples": [{"prompt": r.prompt[-1].content, **{m: answers[m][i] for m in answers}}
                          for i, r in enumerate(records[:8])]}
    json_path, md_path = write_report(cfg.output_dir, result)
    print(markdown(result), end="")
    print(f"[eval] wrote {json_path} and {md_path}")
    return result
