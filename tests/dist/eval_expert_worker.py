"""A checkpoint as a domain expert of a pipeline holds it (run under torchrun, 1 process).

    torchrun --nproc_per_node=1 tests/dist/eval_expert_worker.py checkpoint OUT.json CASE_JSON

Its config lists only the expert's own tasks (case["overrides"] on
configs/rl_tiny_cpu.toml, e.g. arithmetic with a 4-token budget), while its
character tokenizer covers every task of the pipeline (case["tokenizer_tasks"]),
because a pipeline's stages share the SFT model's tokenizer. A freshly
initialised tiny MoE is saved with the project's checkpoint store (so every
integrity check at load applies); tests/test_eval_task_definitions.py scores
it off its domain.
"""

from __future__ import annotations

from pathlib import Path

from megatron_ernie import config as C
from megatron_ernie.config.rl import TaskConfig
from megatron_ernie.data.char_tokenizer import CharTokenizer
from megatron_ernie.rl.task_tokenizer import task_texts
from untrained import save_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def scenario_checkpoint(case: dict, _tmp: Path) -> dict:
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    run_dir = Path(case["run_dir"])
    cfg = C.load(ROOT / "configs" / "rl_tiny_cpu.toml", [f'run.dir="{run_dir}"', *case["overrides"]])
    groups = G.build_groups(ParallelDims(world=1))
    G.model_parallel_seed(cfg.run.seed)
    tokenizer = CharTokenizer.train(task_texts([TaskConfig(name=n) for n in case["tokenizer_tasks"]]))
    _, path = save_untrained_checkpoint(cfg, groups, tokenizer, run_dir)
    return {"checkpoint": str(path)}


SCENARIOS = {"checkpoint": scenario_checkpoint}


if __name__ == "__main__":
    import runner

    runner.run(SCENARIOS)
