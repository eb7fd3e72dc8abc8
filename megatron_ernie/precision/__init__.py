"""FP8 training: Transformer Engine recipes on GPU, an exact FP8 emulation anywhere.

formats.py          E4M3 / E5M2 and TE's saturating cast
scaling.py          amax -> scale for each recipe; delayed-scaling history state
quantize.py         per-tensor and per-block quantise / dequantise
recipes.py          which operand of which GEMM is quantised how (delayed, current,
                    blockwise, mxfp8)
gemm.py             the GEMMs of a linear: emulated (fp32) or real FP8 (torch._scaled_mm)
linear.py           the FP8 linear (autograd.Function)
megatron_linear.py  megatron-core Column/RowParallelLinear subclasses and spec patching
te.py               the one mapping of FP8Config onto TE recipes and megatron-core fields
model.py            `fp8_extensions`: what the [fp8] section changes in the model build
report.py           `python -m megatron_ernie.precision.report`: error vs fp64 per recipe

Nothing is imported here, so `import megatron_ernie.precision.te` does not pull in
megatron-core; `...megatron_linear` and `...model` are the modules that need it.
"""
