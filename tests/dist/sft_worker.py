"""SFT scenarios, all in one launch (run under torchrun with 2 processes).

    torchrun --nproc_per_node=2 tests/dist/sft_worker.py sft OUT.json CASE_JSON

1. layouts: the same masked-loss SFT at DP2, TP2+SP, PP2 and EP2 (loss curves);
2. stop: SFT a tiny character model on arithmetic demos, then greedy decoding
   on held-out prompts (does it write the answer and then end of text?);
3. base: a second SFT run starting from (2)'s checkpoint takes its weights
   only (iteration 0, fresh schedule) and the same tokenizer;
4. resume: N steps, stop, --resume auto, N steps == 2N steps straight.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ernie import config as C
from megatron_ernie.cli import sft_job
from megatron_ernie.train import loop
from worker import gather, param_fingerprint  # tests/dist is sys.path[0] under torchrun

BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "moe.num_experts=4", "moe.router_topk=2", "moe.expert_ffn_hidden_size=64",
    "moe.aux_loss_coeff=0.001", "train.eval_interval=0", "train.eval_iters=1", "checkpoint.save_interval=0",
    "checkpoint.save_on_exit=false", "checkpoint.resume=\"none\"", "checkpoint.load_weights_only=true",
    "log.tensorboard=false", "log.level=\"WARNING\"", "schedule.warmup_iters=0", "schedule.decay_style=\"constant\"",
    "optimizer.weight_decay=0.0",
]


def sft_run(run_dir: Path, overrides) -> loop.Run:
    cfg = C.load(None, BASE + [f"run.dir=\"{run_dir}\""] + list(overrides))
    objective, source = sft_job(cfg)
    return loop.setup(cfg, objective, source)


def trained(run_dir: Path, overrides) -> loop.Run:
    run = sft_run(run_dir, overrides)
    loop.train(run)
    return run


def layouts(case: dict, tmp: Path) -> dict:
    out = {}
    for name, overrides in case["layouts"].items():
        run = trained(tmp / f"layout_{name}", case["common"] + overrides)
        out[name] = run.progress.losses
        run.experts.remove()
    return out


@torch.no_grad()
def greedy_answers(run, prompts: list[str], max_new: int) -> list[tuple[str, bool]]:
    """(text before end of text, whether end of text came) per prompt: greedy, full re-forward per token.

    Runs on one model replica (TP1/PP1/EP1 layouts only)."""
    tokenizer, model = run.data.tokenizer, run.model[0]
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        new, stopped = [], False
        for _ in range(max_new):
            tokens = torch.tensor([ids + new])
            logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)
            nxt = int(logits[0, -1, : tokenizer.vocab_size].argmax())
            if nxt == tokenizer.eod_id:
                stopped = True
                break
            new.append(nxt)
        out.append((tokenizer.decode(new), stopped))
    model.train()
    return out


def stop(case: dict, tmp: Path, seed: int) -> dict:
    from megatron_ernie.rl.tasks import get_task

    run = trained(tmp / f"stop_{seed}", case["common"] + [f"run.seed={seed}", f"sft.seed={seed}"])
    path = loop.save_checkpoint(run)
    task = get_task("arithmetic")
    options = case["options"]
    held_out = [task.make_example(case["eval_seed"], i, options) for i in range(case["eval_prompts"])]
    answers = greedy_answers(run, [e.prompt for e in held_out], case["max_new"])
    stopped = [s for _, s in answers]
    correct = [s and text == e.reference for (text, s), e in zip(answers, held_out)]
    digits_only = [s and text.lstrip("-").isdigit() for text, s in answers]
    return {"losses": run.progress.losses, "stop_rate": sum(stopped) / len(stopped),
            "accuracy": sum(correct) / len(correct), "stop_after_number": sum(digits_only) / len(digits_only),
            "examples": [[e.prompt, t, s] for e, (t, s) in zip(held_out[:8], answers[:8])],
            "checkpoint": str(path), "fingerprint": gather(param_fingerprint(run.model)),
            "tokenizer": (Path(run.cfg.run.dir) / "tokenizer.json").read_text()}


def base(case: dict, tmp: Path, checkpoint: str) -> dict:
    run = sft_run(tmp / "from_base", case["common"] + ["train.iters=2", f"checkpoint.load=\"{checkpoint}\""])
    out = {"iteration": run.progress.iteration, "consumed_samples": run.progress.consumed_samples,
           "lr": run.optimizer.param_groups[0]["lr"], "fingerprint": gather(param_fingerprint(run.model)),
           "tokenizer": (Path(run.cfg.run.dir) / "tokenizer.json").read_text()}
    loop.train(run)
    saved = loop.save_checkpoint(run)
    out["files"] = sorted(p.name for p in saved.iterdir())
    out["saved_iteration"] = run.progress.iteration
    return out


def resume(case: dict, tmp: Path) -> dict:
    n, common = case["resume_n"], case["common"] + [f"train.iters={2 * case['resume_n']}"]
    straight = trained(tmp / "straight", common)
    trained(tmp / "split", common + [f"train.exit_interval={n}", "checkpoint.save_on_exit=true"])
    second = trained(tmp / "split", common + ["checkpoint.resume=\"auto\""])
    return {"straight": straight.progress.losses, "second": second.progress.losses,
            "fp_straight": gather(param_fingerprint(straight.model)), "fp_split": gather(param_fingerprint(second.model))}


def scenario_sft(case: dict, tmp: Path) -> dict:
    out = {"layouts": layouts(case["layouts"], tmp)}
    out["stop"] = [stop(case["stop"], tmp, seed) for seed in case["stop"]["seeds"]]
    out["base"] = base(case["stop"], tmp, out["stop"][0]["checkpoint"])
    out["resume"] = resume(case["stop"], tmp)
    return out


if __name__ == "__main__":
    import runner

    runner.run({"sft": scenario_sft})
