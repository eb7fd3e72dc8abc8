"""On-policy distillation (advantage = "opd"): the loss math by hand, the batch layout, and layout invariance.

The multi-process part (tests/dist/rl_worker.py "opd", one 2-process launch) checks
the vocabulary-parallel reverse KL against a single-device computation, that the
OPD loss is the same at DP2, TP2+SP and PP2 for both payloads, that a different
teacher gives gradients on every rank and chunk, and that self-distillation gives
none.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ernie.config.rl import AlgorithmConfig, DistillConfig
from megatron_ernie.model.vocab_parallel import vocab_parallel_kl
from megatron_ernie.rl import algorithms as alg
from megatron_ernie.rl.batch import build_batch
from megatron_ernie.rl.protocol import Sample, ScoredSample

from harness import ROOT, torchrun

OPD = AlgorithmConfig(advantage="opd")


def close(tensor, expected, tol=1e-5):
    assert torch.allclose(torch.as_tensor(tensor, dtype=torch.float64),
                          torch.as_tensor(expected, dtype=torch.float64), atol=tol), (tensor, expected)


# ------------------------------------------------------------------ advantages

def test_opd_advantage_is_teacher_minus_student_per_token():
    student = torch.log(torch.tensor([[0.5, 0.25, 0.1]])).requires_grad_()
    teacher = torch.log(torch.tensor([[0.25, 0.25, 0.4]]))
    adv = alg.opd_advantages(student, teacher, torch.tensor([0.0]), alpha=0.0)
    close(adv, [[math.log(0.5), 0.0, math.log(4.0)]])  # log(0.25/0.5), log 1, log(0.4/0.1)
    assert not adv.requires_grad  # sg[.]: the advantage is a constant of the loss
    # + alpha * GRPO advantage of the sequence, broadcast over its tokens
    with_reward = alg.opd_advantages(student, teacher, torch.tensor([2.0]), alpha=0.5)
    close(with_reward, [[math.log(0.5) + 1.0, 1.0, math.log(4.0) + 1.0]])
    # payload "full": the sampled estimate is left to the exact KL, only alpha * A_reward remains
    close(alg.opd_advantages(student, teacher, torch.tensor([2.0]), alpha=0.5, distill_term=False), [[1.0] * 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opd_loss_gradient_is_teacher_minus_student_times_score(seed):
    """Through the clipped loss with TIS (weights 1 when trainer == rollout), d loss / d log pi_S(y_t) = -A_t / (number of tokens)."""
    g = torch.Generator().manual_seed(seed)
    student = (-3 * torch.rand(2, 5, generator=g)).requires_grad_()
    teacher = -torch.rand(2, 5, generator=g).mul(3)
    mask = torch.ones(2, 5)
    adv = alg.opd_advantages(student.detach(), teacher, torch.zeros(2), alpha=0.0)
    loss, _ = alg.rl_loss(student, student.detach(), student.detach(), adv, mask, OPD)
    loss.backward()
    close(student.grad, -(teacher - student.detach()) / 10)


def test_opd_advantage_uses_whatever_student_logprobs_it_is_given():
    """The trainer passes its own log-probs: a rollout that differs moves the TIS weight, not the advantage."""
    student, teacher = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    close(alg.opd_advantages(student, teacher, torch.zeros(1), 0.0), [[-0.5, 1.0]])


# ------------------------------------------------------------------ exact reverse KL

def random_logits(seed, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_full_reverse_kl_equals_direct_sum_and_its_gradient(seed):
    student = random_logits(seed, (3, 4, 11)).requires_grad_()
    teacher = F.log_softmax(random_logits(seed + 100, (3, 4, 11)), -1)
    kl = alg.teacher_reverse_kl(student, teacher)
    p = F.softmax(student.detach().double(), -1)
    direct = (p * (p.log() - teacher.double())).sum(-1)
    close(kl, direct, tol=1e-5)
    assert (kl > 0).all()
    # the gradient of sum_v p_s (log p_s - log p_t) w.r.t. logits z: p_s * (d - sum_v p_s d), d = log p_s - log p_t
    kl.sum().backward()
    d = p.log() - teacher.double()
    close(student.grad, p * (d - (p * d).sum(-1, keepdim=True)), tol=1e-5)
    # and it agrees with the existing full-vocabulary helper (teacher given as logits)
    close(kl, alg.reverse_kl_from_logits(student.detach(), teacher), tol=1e-5)


def test_full_reverse_kl_gives_no_gradient_to_the_teacher():
    student = random_logits(0, (2, 7)).requires_grad_()
    teacher = F.log_softmax(random_logits(1, (2, 7)), -1).requires_grad_()
    alg.teacher_reverse_kl(student, teacher).sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_full_reverse_kl_ignores_cut_padding_columns():
    """The policy cuts vocabulary padding from the student's shard: a huge padding logit changes nothing."""
    student = random_logits(2, (2, 9))
    teacher = F.log_softmax(random_logits(3, (2, 6)), -1)
    padded = torch.cat([student[:, :6], torch.full((2, 3), 50.0)], -1)
    close(alg.teacher_reverse_kl(padded[:, :6], teacher), alg.teacher_reverse_kl(student[:, :6], teacher))


def test_full_reverse_kl_rejects_mismatched_columns():
    with pytest.raises(ValueError, match="same positions and vocabulary columns"):
        alg.teacher_reverse_kl(torch.zeros(2, 5), torch.zeros(2, 4))


def test_self_distillation_gives_zero_advantage_and_zero_kl():
    logits = random_logits(4, (3, 6, 13))
    logp = F.log_softmax(logits, -1)
    tokens = torch.randint(0, 13, (3, 6), generator=torch.Generator().manual_seed(5))
    sampled = alg.token_logprobs(logits, tokens)
    adv = alg.opd_advantages(sampled, sampled.clone(), torch.zeros(3), 0.0)
    assert adv.abs().max() == 0.0
    kl = alg.teacher_reverse_kl(logits, logp)
    assert kl.abs().max() < 1e-5
    sums = alg.teacher_sums(sampled, sampled.clone(), torch.ones(3, 6), torch.tensor([0, 1, 0]), 2, kl)
    metrics = alg.teacher_metrics(sums, ("a", "b"), full=True)
    assert abs(metrics["distill/k1"]) <= 0.01 and metrics["distill/full_kl"] < 1e-5


# ------------------------------------------------------------------ per-teacher monitors

def test_teacher_sums_and_metrics_by_hand():
    student = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
    teacher = torch.log(torch.tensor([[0.25, 0.5, 0.9], [0.4, 0.2, 0.2]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # token 3 of sequence 1 is masked
    sums = alg.teacher_sums(student, teacher, mask, torch.tensor([1, 0]), 2)
    # teacher 1 ("math"), sequence 1: log r = ln 0.5, 0; k1 = -log r; k3 = (r - 1) - log r
    k3_half = (0.5 - 1) - math.log(0.5)
    close(sums[1], [2, -math.log(0.5), k3_half, math.log(2), 0.0])
    # teacher 0 ("code"), sequence 2: log r = ln 2, 0, 0
    close(sums[0], [3, -math.log(2), (2 - 1) - math.log(2), math.log(2), 0.0])
    m = alg.teacher_metrics(sums, ("code", "math"), full=False)
    close(m["distill/math/k1"], math.log(2) / 2)
    close(m["distill/math/k3"], k3_half / 2)
    close(m["distill/code/abs_adv"], math.log(2) / 3)
    close([m["distill/code/token_share"], m["distill/math/token_share"]], [0.6, 0.4])
    close(m["distill/k1"], 0.0)  # ln 2 - ln 2 over 5 tokens
    assert "distill/full_kl" not in m and "distill/math/full_kl" not in m


def test_sampled_k1_and_k3_estimate_the_full_reverse_kl():
    """Over many tokens drawn from the student, mean k1 and k3 approach the exact KL(student || teacher)."""
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        s_logits, t_logits = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
        exact = float(alg.teacher_reverse_kl(s_logits, F.log_softmax(t_logits, -1)))
        tokens = torch.multinomial(F.softmax(s_logits, -1), 200_000, replacement=True, generator=g)
        student = F.log_softmax(s_logits, -1).gather(-1, tokens)
        teacher = F.log_softmax(t_logits, -1).gather(-1, tokens)
        sums = alg.teacher_sums(student, teacher, torch.ones_like(student), torch.tensor([0]), 1)
        m = alg.teacher_metrics(sums, ("t",), full=False)
        assert m["distill/k1"] == pytest.approx(exact, rel=0.05, abs=2e-3)
        assert m["distill/k3"] == pytest.approx(exact, rel=0.05, abs=2e-3)


def test_rl_loss_adds_the_exact_kl_token_mean():
    logprobs = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    kl = torch.tensor([[0.2, 0.4]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    loss, metrics = alg.rl_loss(logprobs, logprobs.detach(), logprobs.detach(), torch.zeros(1, 2), mask, OPD,
                                teacher_kl=kl)
    close(loss, 0.2)  # PG term 0 (A = 0); masked token's KL excluded
    close(metrics["teacher_kl"], 0.2)
    loss.backward()
    close(kl.grad, [[1.0, 0.0]])


# ------------------------------------------------------------------ shared vocab-parallel helper

def test_forward_kl_helper_unchanged_for_elastic():
    """The elastic distillation's forward KL, now shared, still equals KL(teacher || student)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        student, teacher = random_logits(7, (3, 10)), random_logits(8, (3, 10))
        kl = vocab_parallel_kl(student, teacher, dist.group.WORLD)
    finally:
        if owned:
            dist.destroy_process_group()
    p_t = F.softmax(teacher.double(), -1)
    close(kl, (p_t * (p_t.log() - F.log_softmax(student.double(), -1))).sum(-1))


# ------------------------------------------------------------------ batch

def scored(i, prompt, response, teacher="math", full_vocab=0, with_sampled=True):
    rng = np.random.default_rng(i)
    sample = Sample(f"p{i // 2}", i % 2, "arithmetic", prompt, response, -np.ones(len(response)), 0)
    rows = None
    if full_vocab:
        logits = rng.normal(size=(len(response), full_vocab))
        rows = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    sampled = -rng.uniform(0.1, 3, len(response)).astype(np.float32) if rows is None else \
        rows[np.arange(len(response)), response]
    return ScoredSample(sample, float(i % 2), "ok", teacher=teacher,
                        teacher_logprobs=sampled if with_sampled else None, teacher_full=rows)


def test_build_batch_aligns_teacher_rows_like_rollout_logprobs():
    distill = DistillConfig(teachers={"math": "/a", "code": "/b"}, routes={"arithmetic": "math"}, payload="full")
    samples = [scored(0, [5, 6, 7], [8, 9], "math", 12), scored(1, [5, 6, 7], [10], "code", 12, with_sampled=False)]
    batch = build_batch([samples], OPD, seq_limit=16, distill=distill)
    assert batch.teacher_aliases == ("code", "math") and batch.teacher_index.tolist() == [1, 0]
    # response token j of a P-token prompt sits at P + j - 1 (here P = 3: positions 2, 3)
    assert batch.teacher_logprobs[0, 2:4].tolist() == samples[0].teacher_logprobs.tolist()
    assert batch.teacher_logprobs[0, :2].abs().sum() == 0 and batch.teacher_logprobs[0, 4:].abs().sum() == 0
    assert torch.equal(batch.teacher_full[0, 2:4], torch.tensor(samples[0].teacher_full))
    # no sampled log-probs sent: read from the full row at the sampled token (id 10)
    assert batch.teacher_logprobs[1, 2] == float(samples[1].teacher_full[0, 10])
    assert torch.equal(batch.loss_mask[:, 2:4].bool(), batch.teacher_logprobs[:, 2:4] != 0)
    mb = batch.rows(slice(1, 2))
    assert mb["teacher_full"].shape == (1, 8, 12) and mb["teacher_index"].tolist() == [0]


def test_build_batch_without_distillation_has_no_teachers():
    samples = [scored(0, [5, 6], [8]), scored(1, [5, 6], [9])]
    batch = build_batch([samples], AlgorithmConfig(), seq_limit=16)
    assert batch.teacher_logprobs is None and batch.teacher_full is None
    assert batch.teacher_index.tolist() == [-1, -1] and "teacher_logprobs" not in batch.rows(slice(0, 1))


def test_build_batch_rejects_missing_or_foreign_teachers():
    distill = DistillConfig(teachers={"math": "/a"}, routes={"arithmetic": "math"})
    plain = ScoredSample(Sample("p", 0, "arithmetic", [1, 2], [3], [-1.0], 0), 1.0, "ok")
    with pytest.raises(ValueError, match="sample p/0 of task 'arithmetic' was scored by teacher ''"):
        build_batch([[plain, scored(1, [1, 2], [3])]], OPD, 16, distill=distill)
    with pytest.raises(ValueError, match="teacher 'code', not one of rl.distill.teachers \\['math'\\]"):
        build_batch([[scored(0, [1, 2], [3], "code"), scored(1, [1, 2], [3])]], OPD, 16, distill=distill)
    full = DistillConfig(teachers={"math": "/a"}, routes={"arithmetic": "math"}, payload="full")
    with pytest.raises(ValueError, match="no full teacher rows but rl.distill.payload = \"full\""):
        build_batch([[scored(0, [1, 2], [3]), scored(1, [1, 2], [3])]], OPD, 16, distill=full)
    with pytest.raises(ValueError, match="different vocabulary sizes \\[12, 13\\]"):
        build_batch([[scored(0, [1, 2], [3], full_vocab=12), scored(1, [1, 2], [3], full_vocab=13)]], OPD, 16,
                    distill=full)
    with pytest.raises(ValueError, match="needs the \\[rl.distill\\] config"):
        build_batch([[scored(0, [1, 2], [3]), scored(1, [1, 2], [3])]], OPD, 16)


# ------------------------------------------------------------------ megatron-core layouts (one 2-process launch)

LAYOUTS = {"dp2": [], "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline=2"], "pp2_vpp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]}
COMPARED = ("pg_loss", "grad_norm", "entropy", "distill/k1", "distill/k3", "distill/abs_adv",
            "distill/math/k1", "distill/math/k3", "distill/math/abs_adv", "distill/coder/k1", "distill/coder/k3")


@pytest.fixture(scope="module")
def opd_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("opd") / "result.json"
    case = {"steps": 3, "layouts": LAYOUTS, "self_layouts": ["tp2", "pp2"]}
    torchrun(2, [ROOT / "tests" / "dist" / "rl_worker.py", "opd", out, json.dumps(case)], timeout=900)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["40", "100"])
def test_vocab_parallel_reverse_kl_equals_one_device(opd_runs, vocab):
    """Two TP shards of a padded 128-column vocabulary (at 40 real tokens the second shard is all padding)."""
    ranks = opd_runs["sharded_kl"][vocab]
    assert [r["width"] for r in ranks] == ([40, 0] if vocab == "40" else [64, 36])
    for r in ranks:
        assert r["kl_mean"] > 1.0
        assert r["value_err"] < 1e-5 and r["grad_err"] < 1e-5
    assert all(r["grad_norm"] > 0.1 for r in ranks if r["width"])


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["sampled", "full"])
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vpp2"])
def test_opd_loss_is_layout_invariant(opd_runs, payload, layout):
    """Three optimizer steps on a fixed batch with a fixed random teacher: DP2 vs TP2+SP vs PP2 (and VPP)."""
    ref, got = opd_runs[f"{payload}/dp2"]["metrics"], opd_runs[f"{payload}/{layout}"]["metrics"]
    assert len(ref) == len(got) == 3
    keys = COMPARED + (("distill/full_kl", "distill/math/full_kl") if payload == "full" else ())
    for step, (a, b) in enumerate(zip(ref, got)):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (step, key, a[key], b[key])
    assert ref[0]["pg_loss"] != 0.0  # the PG term is live (payload full: through alpha * A_reward)


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["sampled", "full"])
def test_distillation_moves_the_student_towards_the_teacher(opd_runs, payload):
    """sampled: the K1 estimate over the batch falls; full (with alpha = 0.5 of an unrelated reward): the exact KL falls."""
    steps = opd_runs[f"{payload}/dp2"]["metrics"]
    kl = [m["distill/k1" if payload == "sampled" else "distill/full_kl"] for m in steps]
    assert kl[0] > 1.0 and kl[0] > kl[1] > kl[2]
    for m in steps:
        shares = [m[f"distill/{alias}/token_share"] for alias in ("coder", "math")]
        assert sum(shares) == pytest.approx(1.0) and min(shares) > 0.3
        assert m["distill/k3"] > 0 and m["distill/abs_adv"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["sampled", "full"])
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vpp2"])
def test_a_different_teacher_gives_gradients_on_every_rank_and_chunk(opd_runs, payload, layout):
    run = opd_runs[f"{payload}/{layout}"]
    for step, norms in enumerate(zip(*run["grad_norms"])):  # per step: [rank 0 chunks, rank 1 chunks]
        chunks = [n for rank in norms for n in rank]
        assert len(chunks) == (4 if layout == "pp2_vpp2" else 2)
        assert min(chunks) > 1e-2 * run["metrics"][step]["grad_norm"], (step, chunks)


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["sampled", "full"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_self_distillation_has_zero_kl_and_no_gradient(opd_runs, payload, layout):
    """Teacher = the student itself (its log-prob rows at TP1): k1, k3, |A| and the full KL vanish, so does the update."""
    m = opd_runs[f"self/{payload}/{layout}"]["metrics"][0]
    assert abs(m["distill/k1"]) <= 0.01 and abs(m["distill/k1"]) < 1e-5
    assert m["distill/k3"] < 1e-6 and m["distill/abs_adv"] < 1e-5
    if payload == "full":
        assert m["distill/full_kl"] < 1e-5
    different = opd_runs[f"{payload}/{layout}"]
    assert m["grad_norm"] < 1e-4 * different["metrics"][0]["grad_norm"]
    self_norms = [n for rank in opd_runs[f"self/{payload}/{layout}"]["grad_norms"] for n in rank[0]]
    assert max(self_norms) < 1e-4 * min(n for rank in different["grad_norms"] for n in rank[0])
