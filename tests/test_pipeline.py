"""`ernie pipeline`: the plan (stage configs, links, dependencies) and the local run's bookkeeping
(manifest, skip, force, resume, a failed expert blocking OPD)."""

import json
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.posttrain import pipeline as P
from megatron_ernie.posttrain.stages import load_pipeline, plan, slurm_world_check

ROOT = Path(__file__).resolve().parents[1]
RL_TASKS = """
[[rl.tasks]]
name = "arithmetic"
options = { digits = 1, ops = "-" }
[[rl.tasks]]
name = "code"
"""


def _write_pipeline(tmp_path, experts=None, extra=""):
    (tmp_path / "stage.toml").write_text((ROOT / "configs" / "rl_tiny_cpu.toml").read_text().split("[[rl.tasks]]")[0]
                                         + RL_TASKS + "\n[rl.system]\nprompts_per_step = 8\n[slurm]\nnodes = 3\n")
    experts = experts or [("arith", ["arithmetic"], 7), ("coder", ["code"], 5)]
    blocks = "".join(f'[[pipeline.experts]]\nname = "{n}"\ntasks = {json.dumps(t)}\nsteps = {s}\n'
                     for n, t, s in experts)
    (tmp_path / "p.toml").write_text(textwrap.dedent(f"""
        [pipeline]
        dir = "out"
        parallel_experts = 2
        {extra}
        [pipeline.sft]
        config = "{ROOT / 'configs' / 'sft_tiny_cpu.toml'}"
        steps = 3
        procs = 2
        [pipeline.expert]
        config = "stage.toml"
        [pipeline.opd]
        config = "stage.toml"
        steps = 4
        [pipeline.general]
        config = "stage.toml"
        steps = 2
        [pipeline.score]
        prompts = 0
        """) + blocks)
    return tmp_path / "p.toml"


def _stages(tmp_path, **kw):
    pipeline, home = load_pipeline(str(_write_pipeline(tmp_path, **kw)))
    return plan(pipeline, home)


def test_plan_links_every_stage_to_the_checkpoint_it_starts_from(tmp_path):
    stages = {s.name: s for s in _stages(tmp_path)}
    assert list(stages) == ["sft", "experts/arith", "experts/coder", "opd", "general"]
    out = (tmp_path / "out").resolve()
    assert stages["sft"].output == out / "sft" / "checkpoints" / "iter_0000003"
    assert stages["experts/arith"].input == str(stages["sft"].output)
    assert stages["experts/coder"].output == out / "experts" / "coder" / "checkpoints" / "iter_0000005"
    assert stages["opd"].after == ("experts/arith", "experts/coder")
    assert stages["general"].input == str(stages["opd"].output) and stages["general"].after == ("opd",)
    for stage in stages.values():  # what each stage runs is a complete config of its own
        stage.write_config()
        cfg = C.load(stage.config_path)
        assert cfg.run.dir == str(stage.run_dir) and cfg.checkpoint.load == stage.input
        assert cfg.checkpoint.save_on_exit
    arith = C.load(stages["experts/arith"].config_path)
    assert [t.name for t in arith.rl.tasks] == ["arithmetic"] and arith.train.iters == 7
    assert arith.rl.tasks[0].options == {"digits": 1, "ops": "-"}
    opd = C.load(stages["opd"].config_path)
    assert opd.rl.algorithm.advantage == "opd"
    assert opd.rl.distill.teachers == {"arith": str(stages["experts/arith"].output),
                                       "coder": str(stages["experts/coder"].output)}
    assert opd.rl.distill.routes == {"arithmetic": "arith", "code": "coder"}


@pytest.mark.parametrize("experts, field", [
    ([("a", ["arithmetic"], 1), ("b", ["arithmetic"], 1)], "pipeline.experts[1].tasks"),
    ([("a", ["arithmetic"], 1), ("a", ["code"], 1)], "pipeline.experts[1].name"),
    ([("a/b", ["arithmetic"], 1)], "pipeline.experts[0].name"),
    ([("a", ["sorting"], 1)], "pipeline.experts.tasks"),
])
def test_bad_pipelines_are_refused_before_anything_runs(tmp_path, experts, field):
    with pytest.raises(ConfigError) as err:
        _stages(tmp_path, experts=experts)
    assert err.value.field == field
    assert not (tmp_path / "out").exists()


def test_training_stages_slurm_job_has_the_ranks_it_has_here(tmp_path, capsys):
    """SFT (and the judge) run as `procs` ranks here; their Slurm job gets as many: derived from procs
    where the stage config leaves [slurm] nodes / gpus_per_node out, refused where it sets another."""
    def shape(stage):
        slurm = tomllib.loads(stage.config_text)["slurm"]
        return slurm["nodes"], slurm["gpus_per_node"]

    sized = {s.name: shape(s) for s in plan(*load_pipeline(str(ROOT / "configs" / "posttrain_tiny_cpu.toml")))}
    assert sized["sft"] == sized["judge"] == (1, 2)  # procs = 2
    path = _write_pipeline(tmp_path)
    three_nodes = plan(*load_pipeline(str(path), ['pipeline.sft.set=["slurm.nodes=3"]']))  # fine to run here
    with pytest.raises(ConfigError) as err:  # not to submit: 3 nodes x 1 GPU
        slurm_world_check(three_nodes[0])
    assert err.value.field == "pipeline.sft.procs" and err.value.value == 2
    assert "3 node(s) x 1 GPUs = 3 ranks" in err.value.fix and "pipeline.sft.procs = 3" in err.value.fix
    assert P.main(["--config", str(path), "--submit", "--dry-run", "--set", 'pipeline.sft.set=["slurm.nodes=3"]']) == 2
    assert "pipeline.sft.procs = 2" in capsys.readouterr().err
    for procs, expected in [(16, (2, 8)), (4, (1, 4))]:
        assert shape(plan(*load_pipeline(str(path), [f"pipeline.sft.procs={procs}"]))[0]) == expected


def test_unknown_keys_and_stage_errors_name_the_field(tmp_path, capsys):
    path = _write_pipeline(tmp_path, extra="paralel_experts = 2")
    assert P.main(["--config", str(path)]) == 2
    assert "pipeline.paralel_experts" in capsys.readouterr().err
    path = _write_pipeline(tmp_path)
    assert P.main(["--config", str(path), "--set", 'pipeline.opd.set=["rl.sampling.temperature=0.7"]']) == 2
    err = capsys.readouterr().err
    assert "rl.sampling.temperature" in err and "pipeline.opd" in err


# ------------------------------------------------------------------ local run
FAKE_STAGE = """
import json, os, sys, pathlib
cfg = sys.argv[sys.argv.index("--config") + 1]
run = pathlib.Path(cfg).parent
with open(os.environ["PIPELINE_TEST_LOG"], "a") as log:
    log.write(run.name + "\\n")
with open(os.environ["PIPELINE_TEST_LOG"] + ".found", "a") as log:  # what --resume auto would pick up
    log.write(run.name + (":resumes" if (run / "checkpoints").exists() else ":fresh") + "\\n")
if run.name in os.environ.get("PIPELINE_TEST_FAIL", "").split(","):
    (run / "checkpoints" / "iter_0000001").mkdir(parents=True, exist_ok=True)  # killed after a save
    sys.exit(3)
import tomllib
iters = tomllib.loads(pathlib.Path(cfg).read_text())["train"]["iters"]
out = run / "checkpoints" / f"iter_{iters:07d}"
out.mkdir(parents=True, exist_ok=True)
(out / "tokenizer.json").write_text(json.dumps({"format": "megatron_ernie.char_tokenizer/1", "alphabet": "0123456789-="}))
(out / "meta.json").write_text("{}")
"""


def found(tmp_path) -> list[str]:
    """Per stage start: whether its directory held checkpoints (--resume auto would resume them)."""
    return (tmp_path / "ran.log.found").read_text().split()


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Stand-in stage commands (the orchestration is under test here, the stages elsewhere)."""
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    log = tmp_path / "ran.log"
    monkeypatch.setenv("PIPELINE_TEST_LOG", str(log))
    monkeypatch.setattr(P, "stage_command", lambda stage: [sys.executable, str(script), "--config",
                                                           str(stage.config_path)])
    return lambda: log.read_text().split() if log.exists() else []


def test_a_rerun_skips_done_stages_and_force_reruns_a_stage_and_what_follows(tmp_path, fake_stages):
    path = str(_write_pipeline(tmp_path))
    assert P.main(["--config", path]) == 0
    assert sorted(fake_stages()) == ["arith", "coder", "general", "opd", "sft"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert {k: v["status"] for k, v in manifest.items()} == dict.fromkeys(
        ["sft", "experts/arith", "experts/coder", "opd", "general"], "done")
    assert manifest["opd"]["input_tokenizer_hash"] == manifest["opd"]["output_tokenizer_hash"]
    assert P.main(["--config", path]) == 0
    assert len(fake_stages()) == 5  # nothing ran again
    assert P.main(["--config", path, "--force", "opd"]) == 0
    assert fake_stages()[5:] == ["opd", "general"]
    assert P.main(["--config", path, "--set", "pipeline.general.steps=3"]) == 0  # a changed config reruns
    assert fake_stages()[7:] == ["general"]
    # ... each from its input, never from the checkpoint the earlier plan left (kept beside it)
    assert found(tmp_path)[5:] == ["opd:fresh", "general:fresh", "general:fresh"]
    out = tmp_path / "out"
    assert (out / "general.previous" / "checkpoints" / "iter_0000002" / "meta.json").is_file()
    assert sorted(p.name for p in (out / "general" / "checkpoints").iterdir()) == ["iter_0000003"]


def test_a_failed_expert_blocks_distillation(tmp_path, fake_stages, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_TEST_FAIL", "coder")
    path = str(_write_pipeline(tmp_path))
    assert P.main(["--config", path]) == 1
    assert "experts/coder failed" in capsys.readouterr().err
    assert "opd" not in fake_stages() and "general" not in fake_stages()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert manifest["experts/coder"]["status"] == "failed" and manifest["experts/arith"]["status"] == "done"
    monkeypatch.setenv("PIPELINE_TEST_FAIL", "")
    assert P.main(["--config", path]) == 0  # the rerun continues where it stopped
    assert fake_stages()[-3:] == ["coder", "opd", "general"]
    assert found(tmp_path)[-3:] == ["coder:resumes", "opd:fresh", "general:fresh"]


def test_only_a_later_stage_needs_the_earlier_outputs(tmp_path, fake_stages, capsys):
    path = str(_write_pipeline(tmp_path))
    assert P.main(["--config", path, "--only", "opd"]) == 2
    assert "needs the output of experts/arith" in capsys.readouterr().err
    assert P.main(["--config", path, "--only", "sft,experts"]) == 0
    assert P.main(["--config", path, "--only", "opd"]) == 0
    assert fake_stages()[-1] == "opd"


def test_submit_dry_run_renders_one_job_per_stage_in_chain_order(tmp_path, capsys):
    path = str(_write_pipeline(tmp_path))
    assert P.main(["--config", path, "--submit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("# ---- ")]
    assert headers == ["# ---- sft (after nothing)", "# ---- experts/arith (after sft)",
                       "# ---- experts/coder (after sft)", "# ---- opd (after experts/arith, experts/coder)",
                       "# ---- general (after opd)"]
    sft_script = out.split("# ---- experts/arith")[0]
    assert " sft --config " in sft_script and "hetjob" not in sft_script
    assert out.count("#SBATCH hetjob") >= 4  # every RL stage is a heterogeneous job
    assert str((tmp_path / "out" / "opd" / "stage.toml").resolve()) in out


def test_every_stage_is_scored_and_the_scoreboard_has_a_row_per_stage(tmp_path, fake_stages):
    def scorer(stage):  # stands in for `ernie eval-tasks` on the stage's (fake) checkpoint
        value = len(stage.name) / 100
        return {"arithmetic": {"greedy": [value, 0.01], "sampled": [value / 2, 0.02]},
                "code": {"greedy": [0.5, 0.05], "sampled": [0.25, 0.04]}}

    assert P.main(["--config", str(_write_pipeline(tmp_path))], scorer=scorer) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert manifest["opd"]["scores"]["arithmetic"]["greedy"] == [0.03, 0.01]
    table = (tmp_path / "out" / "scoreboard" / "greedy" / "scoreboard.txt").read_text().splitlines()
    assert [line.split()[0] for line in table[1:]] == ["sft", "experts/arith", "experts/coder", "opd", "general"]
    assert "0.130 ± 0.010" in table[2]  # experts/arith: 13 characters
    png = (tmp_path / "out" / "scoreboard" / "sampled" / "scoreboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_scoring_settings_are_validated(tmp_path, capsys):
    path = str(_write_pipeline(tmp_path))
    assert P.main(["--config", path, "--set", "pipeline.score.prompts=1", "--dry-run"]) == 2
    assert "pipeline.score.prompts" in capsys.readouterr().err


def test_plan_has_a_judge_stage_whose_output_rewards_general_rl(tmp_path):
    judge = '[pipeline.judge]\nconfig = "stage.toml"\ntasks = ["open_ended"]\nsteps = 6\n'
    path = _write_pipeline(tmp_path, extra=judge)
    stage = tmp_path / "stage.toml"
    stage.write_text(stage.read_text().replace("[rl.system]", '[[rl.tasks]]\nname = "open_ended"\n[rl.system]'))
    stages = {s.name: s for s in plan(*load_pipeline(str(path)))}
    assert list(stages) == ["sft", "experts/arith", "experts/coder", "opd", "judge", "general"]
    judge_stage, general = stages["judge"], stages["general"]
    assert judge_stage.kind == "sft" and judge_stage.after == ("sft",) and judge_stage.tasks == ("open_ended",)
    assert judge_stage.input == str(stages["sft"].output)  # the SFT model's weights and tokenizer
    assert judge_stage.output == tmp_path / "out" / "judge" / "checkpoints" / "iter_0000006"
    judge_cfg = C.load(judge_stage.write_config())
    assert judge_cfg.sft.source == "judge" and judge_cfg.sft.error_fraction == 0
    assert general.after == ("opd", "judge") and general.input == str(stages["opd"].output)
    general_cfg = C.load(general.write_config())
    assert general_cfg.rl.judge.checkpoint == str(judge_stage.output)
    assert general_cfg.rl.judge.tasks == ("open_ended",)
    assert {"open_ended", "arithmetic", "code"} <= set(general.tasks)  # verifiable domains mixed in
    assert "open_ended" not in stages["opd"].tasks  # no expert owns it: OPD routes only expert domains
    items = judge.replace("steps = 6", "steps = 6\nset = ['sft.source=\"judge-items\"']")
    path.write_text(path.read_text().replace(judge, items))
    items_stage = {s.name: s for s in plan(*load_pipeline(str(path)))}["judge"]
    assert C.load(items_stage.write_config()).sft.source == "judge-items"  # per-item verdicts kept


def test_a_judge_stage_without_tasks_is_refused(tmp_path):
    path = _write_pipeline(tmp_path, extra='[pipeline.judge]\nconfig = "stage.toml"\n')
    with pytest.raises(ConfigError, match="pipeline.judge.tasks"):
        load_pipeline(str(path))


GPU_PIPELINE = ROOT / "configs" / "posttrain_gpu_16b.toml"


def _het_groups(script: str) -> dict:
    """{role: (partition, nodes, tasks per node, GPUs per node)} from a het job's `# het group k: role`
    blocks; a plain job (no het groups) is returned as the role "job"."""
    groups, role = {}, "job"
    for line in script.splitlines():
        if line.startswith("# het group "):
            role = line.split(": ", 1)[1].split(" ", 1)[0]
        elif line.startswith("#SBATCH --") and "=" in line:
            key, value = line[len("#SBATCH --"):].split("=", 1)
            if key in ("partition", "nodes", "ntasks-per-node", "gpus-per-node"):
                groups.setdefault(role, {})[key] = value
    return {r: (g.get("partition"), int(g["nodes"]), int(g["ntasks-per-node"]), int(g.get("gpus-per-node", 0)))
            for r, g in groups.items()}


def test_gpu_pipeline_renders_the_whole_chain_with_each_jobs_groups(tmp_path, capsys):
    """configs/posttrain_gpu_16b.toml (the 16B-A3B MoE on H100 nodes): `--submit --dry-run` renders one
    sbatch script per stage in chain order, with the shapes the file sizes: SFT on 4 x 8 GPUs, every RL
    stage a het job (trainer 2 x 8, rollout 2 x 8, CPU reward nodes where rewards need them, a CPU
    controller), OPD's teacher group one task per expert, the judge's SFT on 2 x 8, general RL's judge
    group. The dry run writes nothing under pipeline.dir."""
    out = tmp_path / "out"
    sets = ["--set", f'pipeline.dir="{out}"']
    assert P.main(["--config", str(GPU_PIPELINE), "--dry-run", *sets]) == 0  # the plan
    plan_rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in plan_rows] == ["sft", "experts/arith", "experts/tools", "experts/coder",
                                                     "opd", "judge", "general"]
    assert P.main(["--config", str(GPU_PIPELINE), "--submit", "--dry-run", *sets]) == 0
    text = capsys.readouterr().out
    scripts = dict(part.split("\n", 1) for part in text.split("# ---- ")[1:])
    assert list(scripts) == ["sft (after nothing)", "experts/arith (after sft)", "experts/tools (after sft)",
                             "experts/coder (after sft)", "opd (after experts/arith, experts/tools, experts/coder)",
                             "judge (after sft)", "general (after opd, judge)"]
    jobs = {header.split(" ")[0]: _het_groups(script) for header, script in scripts.items()}
    gpu, cpu = "gpu", "cpu"
    trainer, rollout, controller = (gpu, 2, 8, 8), (gpu, 2, 8, 8), (cpu, 1, 1, 0)
    assert jobs["sft"] == {"job": (gpu, 4, 8, 8)}  # pipeline.sft.procs = 32
    assert jobs["experts/arith"] == {"trainer": trainer, "rollout": rollout, "controller": controller}
    assert jobs["experts/tools"] == {"trainer": trainer, "rollout": rollout, "reward": (cpu, 1, 32, 0),
                                     "controller": controller}
    assert jobs["experts/coder"] == {"trainer": trainer, "rollout": rollout, "reward": (cpu, 2, 32, 0),
                                     "controller": controller}
    pipeline, _ = load_pipeline(str(GPU_PIPELINE))
    assert jobs["opd"] == {"trainer": trainer, "rollout": rollout, "reward": (cpu, 1, 32, 0),
                           "teacher": (gpu, 1, len(pipeline.experts), 3), "controller": controller}
    assert jobs["judge"] == {"job": (gpu, 2, 8, 8)}  # pipeline.judge.procs = 16
    assert jobs["general"] == {"trainer": trainer, "rollout": rollout, "reward": (cpu, 1, 32, 0),
                               "judge": (gpu, 1, 4, 4), "controller": controller}
    roles = [line for line in scripts["general (after opd, judge)"].splitlines() if "ERNIE_HET_ROLES=" in line]
    assert roles == ["export ERNIE_HET_ROLES=trainer,rollout,reward,judge,controller"]
    assert f"ernie sft --config {out / 'sft' / 'stage.toml'} " in scripts["sft (after nothing)"]
    assert not out.exists()
    stages = {s.name: s for s in plan(pipeline, GPU_PIPELINE.parent)}
    assert stages["sft"].input == "/checkpoint/ernie/moe16b-a3b/checkpoints/iter_0250000"  # the pretraining run's end
    general = tomllib.loads(stages["general"].config_text)
    assert general["rl"]["judge"]["checkpoint"] == str(stages["judge"].output)
    assert sorted(tomllib.loads(stages["opd"].config_text)["rl"]["distill"]["teachers"]) == ["arith", "coder", "tools"]


def test_the_cpu_demonstration_renders_as_a_slurm_chain(capsys):
    """The README's `ernie pipeline --config configs/posttrain_tiny_cpu.toml --submit`: every RL stage's
    het job is sized by the RL stage config (one node per group), SFT and the judge by procs."""
    assert P.main(["--config", str(ROOT / "configs" / "posttrain_tiny_cpu.toml"), "--submit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    jobs = dict(part.split(" (after ", 1)[0:2] for part in out.split("# ---- ")[1:])
    assert list(jobs) == ["sft", "experts/arith", "experts/tools", "experts/coder", "opd", "judge", "general"]
    hetjobs = {name: text.splitlines().count("#SBATCH hetjob") for name, text in jobs.items()}
    # trainer, rollout, reward, controller (+ OPD's teacher group, + general RL's judge group)
    assert hetjobs == {"sft": 0, "experts/arith": 3, "experts/tools": 3, "experts/coder": 3, "opd": 4,
                       "judge": 0, "general": 4}
    assert "#SBATCH --nodes=1" in jobs["sft"] and "#SBATCH --gpus-per-node=2" in jobs["sft"]


def test_a_resubmitted_chain_resumes_only_stages_interrupted_with_the_same_plan(tmp_path):
    from megatron_ernie.posttrain.manifest import Manifest

    stages = P.plan(*load_pipeline(str(_write_pipeline(tmp_path))))
    manifest = Manifest(tmp_path / "m.json")
    for stage in stages:  # the chain as a first submission records it
        manifest.update(stage.name, status="submitted", config_hash=stage.config_hash, input=stage.input)
    assert P.fresh_stages(stages, manifest, []) == set()  # the same chain again: every job resumes its own
    manifest.update("experts/coder", config_hash="another plan")
    assert P.fresh_stages(stages, manifest, []) == {"experts/coder", "opd", "general"}
    assert P.fresh_stages(stages, manifest, ["sft"]) == {s.name for s in stages}
    coder = next(s for s in stages if s.name == "experts/coder")
    manifest.update("experts/coder", config_hash=coder.config_hash, status="done")
    assert P.fresh_stages(stages, manifest, []) == {"experts/coder", "opd", "general"}  # done: nothing to resume
