"""An untrained checkpoint of the RL model, as `ernie sft`/`ernie rl` would save one, for the workers
whose tests need a checkpoint to load (a teacher, a judge, an expert to evaluate) but not a trained one.

Training one first would cost a launch; the weights' values do not matter to those tests, only that
the checkpoint is complete: config.toml, tokenizer.json, the weights and meta.json with the resolved
config, exactly the files a real run writes.
"""

from __future__ import annotations

from pathlib import Path

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store
from megatron_ernie.rl.rollout.megatron_engine import MegatronEngine


def save_untrained_checkpoint(cfg, groups, tokenizer, run_dir: Path):
    """The engine built from cfg (fp32, seeded by run.seed) and the checkpoint it was saved to."""
    from megatron_ernie.runtime.groups import current_layout

    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / "tokenizer.json")
    C.save_resolved(cfg, run_dir)
    engine = MegatronEngine(cfg.model, cfg.moe, groups, tokenizer.vocab_size, dtype="fp32", seed=cfg.run.seed)
    meta = store.Meta(iteration=0, consumed_samples=0, consumed_tokens=0, layout=current_layout(),
                      extra={"config": C.loader.to_dict(cfg)})
    files = {name: run_dir / name for name in ("config.toml", "tokenizer.json")}
    return engine, store.save(run_dir / "checkpoints", meta, [engine.model], None, 0, files)
