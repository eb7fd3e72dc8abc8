"""`ernie pipeline --submit` on the real test cluster: the post-training chain as Slurm dependencies.

Two tiny pipelines (configs/posttrain_tiny_cpu.toml, two steps per stage, no
scoring) are submitted at once, every job held (`slurm.extra_sbatch=["--hold"]`)
so the dependency graph can be read from `scontrol` before any job runs (Slurm
forgets a dependency once it is satisfied); then every job is released.

* the good chain: SFT -> experts arith and tools (each afterok SFT) -> OPD
  (afterok both experts) -> general (afterok OPD); every job COMPLETED and
  every stage's output checkpoint written;
* the broken chain: expert tools trains a task whose verifier always raises
  (tests/failing_tasks.py): it passes every check made before submission, and
  the job fails while it runs (rl.stop_on_failures: every sample scored
  "error"); OPD must then be cancelled by Slurm (--kill-on-invalid-dep) and
  never start with a missing teacher, and general after it.

Sizes fit the cluster's four 4-CPU nodes with 2 count-only GPUs each: SFT is
one node x 2 tasks (expert parallel 2), every RL stage a het job of trainer,
rollout and controller nodes (rewards in the controller), OPD one node more
for its teacher group (a task per expert, sized by the pipeline).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "posttrain_tiny_cpu.toml"
ERNIE = f"{sys.executable} -m megatron_ernie.cli"
STAGES = ["sft", "experts/arith", "experts/tools", "opd", "general"]
_JOB = ['slurm.mem=""', "slurm.exclusive=false", 'slurm.time="20:00"', "slurm.signal_lead_s=60",
        'slurm.mpi="none"', f'slurm.ernie="{ERNIE}"', 'slurm.extra_sbatch=["--hold"]']
_RL = ["slurm.nodes=3", "slurm.trainer.gpus_per_node=1", "slurm.rollout.gpus_per_node=1", "slurm.reward.nodes=0",
       "rl.system.reward_workers=0", "rl.sampling.max_new_tokens=8", "log.tensorboard=false",
       "rl.system.heartbeat_timeout_s=120"]  # rewards are scored in the controller, on a busy 2-core host


def _toml_list(items) -> str:
    return json.dumps(list(items))  # a JSON list of strings is a TOML array


def pipeline_overrides(out: Path, tools_set=()) -> list[str]:
    experts = [{"name": "arith", "tasks": ["arithmetic"], "steps": 2, "set": []},
               {"name": "tools", "tasks": ["calc"], "steps": 2, "set": list(tools_set)}]
    experts_toml = ", ".join(f'{{name="{e["name"]}", tasks={_toml_list(e["tasks"])}, steps={e["steps"]}, '
                             f'set={_toml_list(e["set"])}}}' for e in experts)
    sets = [f'pipeline.dir="{out}"', "pipeline.score.prompts=0", "pipeline.sft.steps=2",
            'pipeline.judge.config=""',  # no learned judge here: the chain of SFT, experts, OPD and general
            "pipeline.sft.set=" + _toml_list(["train.eval_interval=0", "checkpoint.save_interval=0",
                                              "slurm.gpus_per_node=2", *_JOB]),
            "pipeline.expert.set=" + _toml_list([*_JOB, *_RL]), f"pipeline.experts=[{experts_toml}]",
            'pipeline.opd.tasks=["arithmetic", "calc"]', "pipeline.opd.steps=2",
            "pipeline.opd.set=" + _toml_list([*_JOB, *_RL, "slurm.teacher.gpus_per_node=1"]),
            'pipeline.general.tasks=["arithmetic", "calc"]', "pipeline.general.steps=2",
            "pipeline.general.set=" + _toml_list([*_JOB, *_RL])]
    return [a for s in sets for a in ("--set", s)]


def submit(cluster, out: Path, tools_set=(), python_path: str = "") -> dict:
    """Submit the chain (python_path: prepended to PYTHONPATH, which sbatch passes on to the jobs);
    returns the manifest's stage records (job ids, dependencies, outputs)."""
    command = [sys.executable, "-m", "megatron_ernie.cli", "pipeline", "--config", str(CONFIG), "--submit",
               *pipeline_overrides(out, tools_set)]
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [python_path, cluster.env.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())["stages"]


def dependencies(cluster, job_id: str) -> set[str]:
    """The job ids a job waits for, as `scontrol show job` reports them (afterok:ID(unfulfilled),...)."""
    text = cluster.job(job_id)["Dependency"]
    ids = set()
    for part in text.split(","):
        kind, _, rest = part.partition(":")
        assert kind == "afterok", text
        ids.update(item.split("(")[0].split("_")[0] for item in rest.split(":"))
    return ids


def final_state(cluster, job_id: str, timeout: float) -> dict:
    """The job's end state. A client call that fails on a loaded host (scontrol killed by SIGPIPE when
    slurmctld drops a connection) is retried: only the job's own end counts."""
    for attempt in range(5):
        try:
            info = cluster.wait(job_id, timeout=timeout)
            break
        except subprocess.CalledProcessError:
            if attempt == 4:
                raise
            time.sleep(2)
    return {"state": info["JobState"], "reason": info.get("Reason", ""), "exit": info.get("ExitCode", ""),
            "log": info.get("StdOut", "")}


def _log(path: str) -> str:
    return Path(path).read_text()[-3000:] if path and Path(path).is_file() else f"(no log {path})"


@pytest.fixture(scope="module")
def chains(slurm_cluster, tmp_path_factory):
    good_dir = tmp_path_factory.mktemp("chain-good") / "out"
    bad_dir = tmp_path_factory.mktemp("chain-bad") / "out"
    good = submit(slurm_cluster, good_dir)
    bad = submit(slurm_cluster, bad_dir, ['rl.tasks=[{name="calc", module="failing_tasks"}]', "rl.stop_on_failures=1"],
                 python_path=str(Path(__file__).resolve().parents[1]))  # tests/: failing_tasks.py
    graph = {chain: {name: dependencies(slurm_cluster, record["job_id"]) if record["after_jobs"] else set()
                     for name, record in manifest.items()} for chain, manifest in (("good", good), ("bad", bad))}
    held = {name: slurm_cluster.job(r["job_id"])["Reason"] for name, r in good.items()}
    ids = [r["job_id"] for manifest in (good, bad) for r in manifest.values()]
    slurm_cluster.run(["scontrol", "release", *ids])
    states = {chain: {name: final_state(slurm_cluster, r["job_id"], timeout=1500) for name, r in manifest.items()}
              for chain, manifest in (("good", good), ("bad", bad))}
    return {"good": good, "bad": bad, "graph": graph, "states": states, "held": held,
            "dirs": {"good": good_dir, "bad": bad_dir}}


def test_manifest_records_every_stage_job_and_what_it_waits_for(chains):
    good = chains["good"]
    assert sorted(good) == sorted(STAGES)
    assert all(r["status"] == "submitted" and r["job_id"].isdigit() for r in good.values())
    ids = {name: r["job_id"] for name, r in good.items()}
    assert len(set(ids.values())) == len(STAGES)
    assert good["sft"]["after_jobs"] == []
    assert good["experts/arith"]["after_jobs"] == [ids["sft"]]
    assert sorted(good["opd"]["after_jobs"]) == sorted([ids["experts/arith"], ids["experts/tools"]])
    assert good["general"]["after_jobs"] == [ids["opd"]]
    assert all(reason == "JobHeldUser" for reason in chains["held"].values()), chains["held"]


def test_slurm_sees_the_dependency_graph(chains):
    for chain in ("good", "bad"):
        ids = {name: r["job_id"] for name, r in chains[chain].items()}
        graph = chains["graph"][chain]
        assert graph["sft"] == set()
        assert graph["experts/arith"] == {ids["sft"]} and graph["experts/tools"] == {ids["sft"]}
        assert graph["opd"] == {ids["experts/arith"], ids["experts/tools"]}
        assert graph["general"] == {ids["opd"]}


def test_every_stage_of_the_good_chain_completes_with_its_checkpoint(chains):
    states, good = chains["states"]["good"], chains["good"]
    for name in STAGES:
        assert (states[name]["state"], states[name]["exit"]) == ("COMPLETED", "0:0"), \
            (name, states[name], _log(states[name]["log"]))
        assert (Path(good[name]["output"]) / "meta.json").is_file(), name
    opd = (chains["dirs"]["good"] / "opd" / "stage.toml").read_text()
    assert good["experts/arith"]["output"] in opd and good["experts/tools"]["output"] in opd  # both teachers
    metrics = [json.loads(line) for line in (chains["dirs"]["good"] / "opd" / "rl" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_a_failed_expert_cancels_opd_instead_of_starting_it(chains):
    states, bad = chains["states"]["bad"], chains["bad"]
    assert states["sft"]["state"] == "COMPLETED" and states["experts/arith"]["state"] == "COMPLETED"
    assert states["experts/tools"]["state"] == "FAILED", states["experts/tools"]
    log = _log(states["experts/tools"]["log"])
    assert "all failed in the reward scorer" in log and "broken on purpose" in log, log  # failed while running
    for name in ("opd", "general"):
        assert states[name]["state"] == "CANCELLED", (name, states[name])
        assert states[name]["reason"] == "DependencyNeverSatisfied", (name, states[name])
        assert not (chains["dirs"]["bad"] / name / "rl").exists()  # never started: no run files
        assert not Path(bad[name]["output"]).exists()
