"""The calculator task with a verifier that always raises: an RL run on it fails at run time.

The Slurm chain test (tests/slurm/test_pipeline_chain.py) needs an expert that
passes every check made before submission (the module imports, the task
exists) and then fails while it runs, so that the OPD job waiting on it is
cancelled instead of starting with a missing teacher. Every sample is scored
"error", and the run stops after rl.stop_on_failures steps with exit 1.
Imported as [[rl.tasks]] module = "failing_tasks" (the test puts tests/ on the
PYTHONPATH that sbatch passes on to the jobs).
"""

from megatron_ernie.rl.tasks import register_task
from megatron_ernie.rl.tasks.calc import demo, make_example


def reward(response: str, reference: str, sandbox=None):
    raise RuntimeError("this verifier is broken on purpose (tests/failing_tasks.py)")


register_task("calc", make_example, reward, description="calc with a broken verifier", replace=True, demo=demo)
