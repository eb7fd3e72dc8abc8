"""`ernie plan`: per-rank memory, communication and step time of every valid layout.

Pure arithmetic over the config sections (no torch.distributed, no model
build), so a 768-GPU config plans in well under a second per layout:

    inventory.py   the parameters each rank holds, in megatron-core's order
    memory.py      parameters, main-grad buffers, optimizer state, activations
    comm.py        bytes per step handed to each process group's collectives
    steptime.py    roofline compute + exposed communication + pipeline bubble
    layouts.py     every layout that passes config/checks.py for N devices
    hardware.py    device presets (memory, peak FLOP/s, link bandwidths)
    cli.py         the command line and the table
"""
