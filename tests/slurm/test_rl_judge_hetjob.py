"""The judge role as a Slurm het group: rendering, submission checks, and a real het job on the test cluster.

The learned judge ([rl.judge]) runs in its own het group, [slurm.judge], as the
teachers run in [slurm.teacher] (config/slurm.py check_scorer_group is shared).
The real job runs on the cluster's four virtual nodes as trainer (1 task),
rollout (1 task), judge (2 tasks on a CPU node: two processes of the one
judge) and controller (1 task; rewards scored inside it), with the tiny
checkpoint of tests/dist/judge_worker.py as both the policy and the judge of
open_ended, next to arithmetic scored by its verifier. The value checked is
the one a judge exists for: every step's open_ended reward is the judge's
score (a probability strictly inside (0, 1), not the rubric's partial credit).
"""

import json
import shlex
import sys
from pathlib import Path

import pytest

from harness import torchrun
from megatron_ernie.config.slurm import GpuGroupConfig, HetGroupConfig, SlurmConfig
from megatron_ernie.launch.render import JobSpec, render_job
from megatron_ernie.launch.submit import main as submit
from megatron_ernie.posttrain.stages import _scorer_groups

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "rl_tiny_cpu.toml"
TASKS = "rl.tasks=[{name='open_ended'}, {name='arithmetic', options={digits=1, ops='-'}}]"
MODEL = ["model.init_method_std=0.1", "model.seq_length=40", "rl.sampling.max_new_tokens=16", TASKS]
JUDGE = ['rl.judge.checkpoint="/nowhere/judge"', 'rl.judge.tasks=["open_ended"]']
STEPS = 4


def _dry_run(capsys, *sets: str) -> tuple[int, str, str]:
    args = ["rl", "--config", str(CONFIG), "--dry-run"]
    for s in (TASKS, "slurm.trainer.gpus_per_node=1", "slurm.rollout.gpus_per_node=1", *sets):
        args += ["--set", s]
    code = submit(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_renders_the_judge_group(capsys):
    code, script, err = _dry_run(capsys, *JUDGE, "slurm.nodes=4", "slurm.judge.nodes=1",
                                 "slurm.judge.gpus_per_node=0", "slurm.judge.tasks_per_node=3")
    assert code == 0, err
    assert "export ERNIE_HET_ROLES=trainer,rollout,judge,controller" in script.splitlines()
    assert "export ERNIE_CPU_ROLES=judge  # model roles on CPU-only nodes: gloo, no GPU" in script.splitlines()
    assert "srun --het-group=0-3 " in script
    judge = script.split("# het group 2: judge (1 nodes x 3 tasks)\n")[1].split("#SBATCH hetjob")[0]
    assert "#SBATCH --nodes=1" in judge and "#SBATCH --ntasks-per-node=3" in judge
    assert "--gpus-per-node" not in judge
    controller = script.split("# het group 3: controller (1 nodes x 1 tasks)\n")[1]
    assert "#SBATCH --nodes=1" in controller


@pytest.mark.parametrize("sets, words", [
    ([*JUDGE, "slurm.nodes=3"], ["slurm.judge.nodes", "rl.judge.checkpoint needs 1 judge task"]),  # no group
    (["slurm.nodes=4", "slurm.judge.nodes=1"], ["slurm.judge.nodes", "would idle"]),  # a group without a judge
])
def test_judge_group_must_match_the_judge(capsys, sets, words):
    code, _, err = _dry_run(capsys, *sets)
    assert code == 2
    for word in words:
        assert word in err, (word, err)


def test_pipeline_gives_the_general_stage_a_judge_group_and_opd_a_teacher_group():
    """stages.py sizes the scorer groups a stage config leaves unsized: a task per teacher, one judge task,
    one node each on top of the job; a group the config sizes itself is kept."""
    general = {"rl": {"judge": {"checkpoint": "j", "tasks": ["open_ended"]}}, "slurm": {"nodes": 3}}
    out = _scorer_groups(general)
    assert out["slurm"] == {"nodes": 4, "judge": {"nodes": 1, "tasks_per_node": 1}}
    opd = {"rl": {"distill": {"teachers": {"a": "x", "b": "y"}}}, "slurm": {"nodes": 3, "teacher": {"gpus_per_node": 1}}}
    assert _scorer_groups(opd)["slurm"] == {"nodes": 4, "teacher": {"nodes": 1, "tasks_per_node": 2,
                                                                    "gpus_per_node": 1}}
    sized = {**general, "slurm": {"nodes": 5, "judge": {"nodes": 2}}}
    assert _scorer_groups(sized) == sized
    assert _scorer_groups({"rl": {}, "slurm": {"nodes": 3}}) == {"rl": {}, "slurm": {"nodes": 3}}


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge-ckpt")
    case = {"run_dir": str(out / "base"), "overrides": MODEL}
    torchrun(1, [REPO / "tests" / "dist" / "judge_worker.py", "checkpoint", out / "result.json", json.dumps(case)],
             timeout=600)
    return json.loads((out / "result.json").read_text())["checkpoint"]


@pytest.mark.slurm
@pytest.mark.slow
def test_het_job_with_a_judge_group_rewards_open_ended_by_the_judge(slurm_cluster, judge_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    slurm = SlurmConfig(nodes=4, time="20:00", mem="", exclusive=False, mpi="none", log_dir=str(tmp_path),
                        trainer=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        rollout=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        reward=HetGroupConfig(nodes=0), judge=GpuGroupConfig(nodes=1, gpus_per_node=0, tasks_per_node=2),
                        controller=HetGroupConfig(nodes=1))
    sets = [*MODEL, f'run.dir="{run_dir}"', f"train.iters={STEPS}", f'checkpoint.load="{judge_checkpoint}"',
            f'rl.judge.checkpoint="{judge_checkpoint}"', "rl.judge.tasks=['open_ended']", "log.tensorboard=false",
            "checkpoint.save_on_exit=false", "rl.system.reward_workers=0", "rl.system.heartbeat_timeout_s=120"]
    command = shlex.join([sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(CONFIG),
                          *[a for s in sets for a in ("--set", s)], "--resume", "auto"])
    script = tmp_path / "rl.sbatch"
    script.write_text(render_job(slurm, JobSpec("rl", str(CONFIG), str(run_dir), command=command)))
    job_id = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job_id, timeout=900)
    log = (tmp_path / f"ernie-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "roles trainer,rollout,judge,controller" in log
    roles = json.loads((run_dir / "rl" / "roles.json").read_text())
    assert sorted((r["role"], r["rank"]) for r in roles) == [("judge", 0), ("judge", 1), ("rollout", 0),
                                                              ("trainer", 0)]
    metrics = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    judged = [m for m in metrics if "reward/open_ended" in m]
    assert judged, metrics  # the prompt mix draws open_ended in (almost) every batch
    batch = 8 * 8  # rl_tiny_cpu: prompts_per_step x n_per_prompt
    for m in metrics:
        if "reward/open_ended" not in m:
            assert "judge/samples" not in m
            continue
        n = m["judge/samples"]  # the open_ended samples only (a batch may draw no arithmetic prompt)
        assert 0 < n <= batch and (n == batch) == ("reward/arithmetic" not in m)
        assert m["reward/open_ended"] == pytest.approx(m["judge/score"], abs=1e-9)
        assert 0 < m["judge/score"] < 1 and 0 <= m["judge/rubric_reward"] <= 1
        arithmetic = m.get("reward/arithmetic", 0.0)  # every open_ended sample judged: the mean splits in two
        assert m["reward/mean"] == pytest.approx((n * m["judge/score"] + (batch - n) * arithmetic) / batch)


def test_pipeline_submission_renders_the_general_stage_with_its_judge_group(tmp_path, capsys):
    """`ernie pipeline --submit --dry-run` of the tiny pipeline: general RL's het job has a judge group
    (one node, one task) that reads the judge stage's output; OPD's has its teachers, and no judge."""
    from megatron_ernie.posttrain.pipeline import main as pipeline

    rl = json.dumps(["slurm.nodes=3", "slurm.trainer.gpus_per_node=1", "slurm.rollout.gpus_per_node=1",
                     "slurm.reward.nodes=0", "rl.system.reward_workers=0"])
    sets = [f'pipeline.dir="{tmp_path / "out"}"', f"pipeline.expert.set={rl}", f"pipeline.opd.set={rl}",
            f'pipeline.general.set={json.dumps([*json.loads(rl), "rl.algorithm.kl_coef=0.05"])}']
    args = ["--config", str(REPO / "configs" / "posttrain_tiny_cpu.toml"), "--submit", "--dry-run"]
    assert pipeline(args + [a for s in sets for a in ("--set", s)]) == 0
    scripts = dict(part.split(" (after", 1) for part in capsys.readouterr().out.split("# ---- ")[1:])
    general, opd = scripts["general"], scripts["opd"]
    assert "export ERNIE_HET_ROLES=trainer,rollout,judge,controller" in general.splitlines()
    judge = general.split("# het group 2: judge (1 nodes x 1 tasks)\n")[1].split("#SBATCH hetjob")[0]
    assert "#SBATCH --nodes=1" in judge and "#SBATCH --ntasks-per-node=1" in judge
    assert "export ERNIE_HET_ROLES=trainer,rollout,teacher,controller" in opd.splitlines()
    assert not (tmp_path / "out").exists()  # a dry run writes nothing under pipeline.dir
    from megatron_ernie.posttrain.stages import load_pipeline, plan

    stage = plan(*load_pipeline(args[1], sets))[-1].config_text  # what the general stage's job would read
    assert f'checkpoint = "{tmp_path / "out" / "judge" / "checkpoints"}' in stage
