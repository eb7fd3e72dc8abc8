"""Slurm job scripts from the config: render (render.py) and submit (submit.py, `ernie submit`)."""
