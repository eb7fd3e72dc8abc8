"""Post-training: the four-stage pipeline (stages, manifest, runner) and task evaluation."""
