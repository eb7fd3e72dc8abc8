"""The teacher role of on-policy distillation: frozen checkpoints that score the student's samples."""
