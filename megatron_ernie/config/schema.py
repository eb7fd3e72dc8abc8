"""The configuration tree: one small frozen dataclass per component.

Functions take the section they need (``ModelConfig``, ``ParallelConfig``...),
never the whole tree.  Each section validates its own fields in
``validate(path)``; rules that relate two sections live in
``megatron_ernie.config.checks`` and run before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ernie.config.errors import require
from megatron_ernie.config.distill import DistillConfig
from megatron_ernie.config.elastic import ElasticConfig
from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.config.rl import RLConfig
from megatron_ernie.config.sft import SFTConfig
from megatron_ernie.config.slurm import SlurmConfig
from megatron_ernie.data.config import DataConfig



def _positive(path: str, value) -> None:
    require(value > 0, path, value, "must be a positive number")


def _one_of(path: str, value, allowed) -> None:
    require(value in allowed, path, value, f"allowed values are {sorted(allowed)}")


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives and how it is seeded."""

    name: str = "ernie"
    dir: str = "runs/ernie"
    seed: int = 1234

    def validate(self, path: str) -> None:
        require(bool(self.dir), f"{path}.dir", self.dir, "give a directory for checkpoints and logs")
        require(self.seed >= 0, f"{path}.seed", self.seed, "use a non-negative integer")


@dataclass(frozen=True)
class ModelConfig:
    """The dense part of an ERNIE-style decoder (RMSNorm, RoPE, SwiGLU, GQA)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128  # dense-layer FFN width
    seq_length: int = 64
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    rotary_base: int = 10000
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: str = "fp32"  # fp32 | bf16 (params and activations)

    def validate(self, path: str) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "seq_length", "num_query_groups"):
            _positive(f"{path}.{name}", getattr(self, name))
        require(self.hidden_size % self.num_attention_heads == 0, f"{path}.hidden_size",
                 self.hidden_size, f"must be divisible by num_attention_heads={self.num_attention_heads}")
        require(self.num_attention_heads % self.num_query_groups == 0, f"{path}.num_query_groups",
                 self.num_query_groups,
                 f"must divide num_attention_heads={self.num_attention_heads} (grouped-query attention)")
        _one_of(f"{path}.normalization", self.normalization, {"RMSNorm", "LayerNorm"})
        _one_of(f"{path}.dtype", self.dtype, {"fp32", "bf16"})
        for name in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, name)
            require(0.0 <= v < 1.0, f"{path}.{name}", v, "must be in [0, 1)")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts layers (megatron-core's MoELayer)."""

    num_experts: int = 4  # 0 = dense model
    router_topk: int = 2
    expert_ffn_hidden_size: int = 64
    shared_expert_ffn_hidden_size: int = 0  # 0 = no shared expert
    first_dense_layers: int = 0  # leading layers with a dense FFN (DeepSeek/ERNIE style)
    score_function: str = "softmax"  # softmax | sigmoid
    router_pre_softmax: bool = False  # softmax over all experts, then top-k (else softmax over the top-k)
    load_balancing: str = "aux_loss"  # aux_loss | seq_aux_loss | none (aux-loss-free uses expert_bias)
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    expert_bias_update_rate: float = 1e-3
    token_dispatcher: str = "alltoall"  # alltoall | allgather
    grouped_gemm: bool = False  # TE grouped GEMM (GPU only)

    def validate(self, path: str) -> None:
        require(self.num_experts >= 0, f"{path}.num_experts", self.num_experts, "use 0 for dense or a positive count")
        if self.num_experts == 0:
            return
        require(1 <= self.router_topk <= self.num_experts, f"{path}.router_topk", self.router_topk,
                 f"must be between 1 and num_experts={self.num_experts}")
        _positive(f"{path}.expert_ffn_hidden_size", self.expert_ffn_hidden_size)
        require(self.shared_expert_ffn_hidden_size >= 0, f"{path}.shared_expert_ffn_hidden_size",
                 self.shared_expert_ffn_hidden_size, "use 0 (no shared expert) or a positive width")
        require(self.first_dense_layers >= 0, f"{path}.first_dense_layers", self.first_dense_layers,
                 "must be >= 0")
        _one_of(f"{path}.score_function", self.score_function, {"softmax", "sigmoid"})
        _one_of(f"{path}.load_balancing", self.load_balancing, {"aux_loss", "seq_aux_loss", "none"})
        _one_of(f"{path}.token_dispatcher", self.token_dispatcher, {"alltoall", "allgather"})
        require(self.aux_loss_coeff >= 0, f"{path}.aux_loss_coeff", self.aux_loss_coeff, "must be >= 0")
        require(not self.expert_bias or self.score_function == "sigmoid", f"{path}.expert_bias",
                 self.expert_bias, "aux-loss-free expert bias needs score_function = \"sigmoid\" in megatron-core")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split (megatron-core's TP/PP/VPP/EP/ETP/DP)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    expert: int = 1
    expert_tensor: int = 0  # 0 = same as tensor (megatron-LM's default)
    context: int = 1
    sequence_parallel: bool = False  # forced on for MoE with TP > 1 (megatron-core requires it)
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor or self.tensor

    def validate(self, path: str) -> None:
        for name in ("tensor", "pipeline", "virtual_pipeline", "expert", "context"):
            _positive(f"{path}.{name}", getattr(self, name))
        require(self.expert_tensor >= 0, f"{path}.expert_tensor", self.expert_tensor,
                 "use 0 (same as tensor) or a positive size")
        require(self.virtual_pipeline == 1 or self.pipeline > 1, f"{path}.virtual_pipeline",
                 self.virtual_pipeline, "interleaving needs parallel.pipeline > 1; set it to 1")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW through megatron-core's get_megatron_optimizer."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self, path: str) -> None:
        _positive(f"{path}.lr", self.lr)
        require(0 <= self.min_lr <= self.lr, f"{path}.min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        require(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            require(0 <= v < 1, f"{path}.{name}", v, "must be in [0, 1)")
        require(self.clip_grad >= 0, f"{path}.clip_grad", self.clip_grad, "use 0 to disable clipping")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then cosine decay to min_lr."""

    warmup_iters: int = 5
    decay_style: str = "cosine"  # cosine | linear | constant
    # A continuation (training an extracted sub-network, train/continuation.py) warms up to this
    # fraction of its source's final LR, then decays to min; 0 = optimizer.lr and warmup_iters as usual.
    continue_peak_fraction: float = 1.0
    continue_warmup_fraction: float = 0.05  # of train.iters (Sheared-LLaMA / Minitron use 3-10%)

    def validate(self, path: str) -> None:
        require(self.warmup_iters >= 0, f"{path}.warmup_iters", self.warmup_iters, "must be >= 0")
        _one_of(f"{path}.decay_style", self.decay_style, {"cosine", "linear", "constant"})
        require(0.0 <= self.continue_peak_fraction <= 1.0, f"{path}.continue_peak_fraction",
                self.continue_peak_fraction, "must be in [0, 1]: 1 continues at the source's final LR, a smaller "
                "value below it, 0 uses optimizer.lr (a jump to the config's peak, not a continuation)")
        require(0.0 <= self.continue_warmup_fraction <= 0.5, f"{path}.continue_warmup_fraction",
                self.continue_warmup_fraction, "must be in [0, 0.5] (a fraction of train.iters; 0.03-0.1 is usual)")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how big a batch, how often to evaluate."""

    iters: int = 40
    global_batch_size: int = 8
    micro_batch_size: int = 2
    eval_interval: int = 20
    eval_iters: int = 2
    exit_interval: int = 0  # stop (with a checkpoint) after this many iterations of this job; 0 = never

    def validate(self, path: str) -> None:
        for name in ("iters", "global_batch_size", "micro_batch_size"):
            _positive(f"{path}.{name}", getattr(self, name))
        require(self.eval_interval >= 0, f"{path}.eval_interval", self.eval_interval, "use 0 to disable")
        require(self.eval_iters >= 0, f"{path}.eval_iters", self.eval_iters, "must be >= 0")
        require(self.exit_interval >= 0, f"{path}.exit_interval", self.exit_interval, "use 0 to disable")


@dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to load (megatron-core dist_checkpointing)."""

    save_interval: int = 20  # 0 = only at the end
    keep_last: int = 2  # 0 = keep all
    load: str = ""  # a checkpoint dir to initialise from (weights + state), empty = none
    resume: str = "auto"  # auto (from <run.dir>/checkpoints/latest if present) | none
    save_on_exit: bool = True
    load_optimizer: bool = True  # false: take weights, schedule and data position, start fresh Adam moments
    load_weights_only: bool = False  # true: take only the weights of `load` (fine-tuning a base model, SFT)
    # An extracted sub-network records its supernet's data position: true continues the data stream
    # there (new tokens), false re-reads from sample 0. Ignored with load_weights_only (SFT starts at 0).
    load_data_position: bool = True

    def validate(self, path: str) -> None:
        require(self.save_interval >= 0, f"{path}.save_interval", self.save_interval, "use 0 to save only at the end")
        require(self.keep_last >= 0, f"{path}.keep_last", self.keep_last, "use 0 to keep all")
        _one_of(f"{path}.resume", self.resume, {"auto", "none"})


@dataclass(frozen=True)
class LogConfig:
    """Console and TensorBoard output (written by one rank only)."""

    interval: int = 1
    tensorboard: bool = True
    level: str = "INFO"

    def validate(self, path: str) -> None:
        _positive(f"{path}.interval", self.interval)
        _one_of(f"{path}.level", self.level, {"DEBUG", "INFO", "WARNING", "ERROR"})


@dataclass(frozen=True)
class ErnieConfig:
    """The root of the tree. Only the CLI and the run setup hold it whole."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    rl: RLConfig = field(default_factory=RLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
