"""Two arithmetic tasks under other names, so that a distillation test can route two tasks to two teachers.

Imported by every RL role through [[rl.tasks]] module = "opd_test_tasks"
(tests/ on PYTHONPATH). Same alphabet as arithmetic, so the student's and the
teachers' tokenizer stays the one of their checkpoint.
"""

from megatron_ernie.rl.tasks import register_task
from megatron_ernie.rl.tasks.arithmetic import make_example, reward

for _name in ("arith_a", "arith_b"):
    register_task(_name, make_example, reward, description="arithmetic, for teacher routing tests", replace=True)
