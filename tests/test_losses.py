"""Every loss against an independent reference written here with explicit loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vembed.losses import (
    CoSENTLoss,
    DistillationLoss,
    EmbeddingLoss,
    HardMiningLoss,
    InfoNCELoss,
    LossFactory,
    MatryoshkaLoss,
    MaxSimLoss,
    SigmoidLoss,
    TripletLoss,
    UnknownLossError,
    available_losses,
    register_loss,
)
from vembed.losses.base import LossInputs

pytestmark = pytest.mark.unit

B, D, K = 5, 8, 3


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist(), strict=True))


# ---------------------------------------------------------------- reference helpers (loops)


def ref_candidates(positive, negatives):
    """All positives in batch order, then the negatives (shared [K, D] or per-query [B, K, D] row-major)."""
    cands = [positive[j] for j in range(positive.shape[0])]
    if negatives is not None:
        flat = negatives.reshape(-1, negatives.shape[-1]) if negatives.dim() == 3 else negatives
        cands += [flat[k] for k in range(flat.shape[0])]
    return cands


def ref_positive_sets(n_anchors, n_paired, labels):
    if labels is None:
        return [{i} for i in range(n_anchors)]
    return [{j for j in range(n_paired) if int(labels[j]) == int(labels[i])} for i in range(n_anchors)]


def ref_softmax_nll(anchors, cands, pos_sets, scale):
    total = 0.0
    for i, a in enumerate(anchors):
        logits = [scale * dot(a, c) for c in cands]
        lse = math.log(sum(math.exp(x) for x in logits))
        total += -sum(logits[j] - lse for j in pos_sets[i]) / len(pos_sets[i])
    return total / len(anchors)


def ref_infonce(q, p, negatives=None, labels=None, temperature=0.05, bidirectional=True):
    pos_sets = ref_positive_sets(len(q), len(p), labels)
    forward = ref_softmax_nll(q, ref_candidates(p, negatives), pos_sets, 1 / temperature)
    if not bidirectional:
        return forward
    backward = ref_softmax_nll(p, [q[j] for j in range(len(q))], pos_sets, 1 / temperature)
    return (forward + backward) / 2


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("negatives_kind", [None, "shared", "per_query"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_infonce_matches_loop_reference(negatives_kind, with_labels, bidirectional):
    q, p = unit(B, D, seed=0), unit(B, D, seed=1)
    negatives = {None: None, "shared": unit(K, D, seed=2), "per_query": unit(B, K, D, seed=3)}[negatives_kind]
    labels = torch.tensor([0, 1, 0, 2, 1]) if with_labels else None
    loss = InfoNCELoss(temperature=0.1, bidirectional=bidirectional)(q, p, negatives, labels)
    expected = ref_infonce(q, p, negatives, labels, temperature=0.1, bidirectional=bidirectional)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_infonce_outputs_batch_call_equals_tensor_call():
    q, p, n = unit(B, D, seed=0), unit(B, D, seed=1), unit(B, K, D, seed=2)
    labels = torch.tensor([3, 1, 3, 0, 2])
    loss = InfoNCELoss()
    by_tensors = loss(q, p, n, labels)
    by_mappings = loss({"query": q, "positive": p, "negatives": n}, {"labels": labels, "input_ids": None})
    assert by_mappings.item() == pytest.approx(by_tensors.item(), rel=1e-12)


def test_learnable_temperature_is_a_parameter_and_changes_after_a_step():
    loss = InfoNCELoss(temperature=0.07, learnable_temperature=True)
    (param,) = list(loss.parameters())
    assert param.item() == pytest.approx(math.log(1 / 0.07))
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    q, p = unit(B, D, seed=0).float(), unit(B, D, seed=1).float()
    loss(q, p).backward()
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(before, param.detach())
    assert loss.logit_scale.temperature != pytest.approx(0.07)


def test_fixed_temperature_has_no_parameters():
    assert list(InfoNCELoss(temperature=0.05).parameters()) == []


def test_learnable_parameters_held_by_the_model_replace_the_losss_own():
    """A model built by build_model holds the loss's scale / bias and returns them in its outputs (open_clip's
    layout): the loss computes with those, in both call forms, and its own copies get no gradient."""
    q, p = unit(B, D, seed=0), unit(B, D, seed=1)
    labels = torch.tensor([1, 1, 0, 2, 0])
    loss = SigmoidLoss(init_scale=10.0, init_bias=-3.0).double()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    value = loss({"query": q, "positive": p, "logit_scale": scale, "logit_bias": bias}, {"labels": labels})
    pos_sets = ref_positive_sets(B, B, labels)
    expected = sum(
        -math.log(1 / (1 + math.exp(-(1.0 if j in pos_sets[i] else -1.0) * (4.0 * dot(q[i], c) - 1.5))))
        for i in range(B)
        for j, c in enumerate(ref_candidates(p, None))
    )
    assert value.item() == pytest.approx(expected / B, rel=1e-9)
    assert loss(q, p, labels=labels, logit_scale=scale, logit_bias=bias).item() == pytest.approx(value.item())
    value.backward()
    assert scale.grad is not None and bias.grad is not None
    assert all(param.grad is None for param in loss.parameters())
    assert {id(t) for t in loss.own_logit_parameters()} == {id(t) for t in loss.parameters()}

    infonce = InfoNCELoss(temperature=0.5, learnable_temperature=True).double()
    got = infonce({"query": q, "positive": p, "logit_scale": torch.tensor(1 / 0.2, dtype=torch.float64)}, {})
    assert got.item() == pytest.approx(ref_infonce(q, p, temperature=0.2), rel=1e-9)


@pytest.mark.parametrize(
    "loss, given, message",
    [
        (InfoNCELoss(learnable_temperature=True), ("logit_scale", "logit_bias"), "built for another loss"),
        (SigmoidLoss(), ("logit_scale",), "built for another loss"),
        (TripletLoss(), ("logit_scale",), "reads no learnable parameters"),
        (MatryoshkaLoss(SigmoidLoss(), [4]), ("logit_scale",), "built for another loss"),
    ],
)
def test_learnable_parameters_of_another_loss_are_refused(loss, given, message):
    outputs = {"query": unit(B, D, seed=0).float(), "positive": unit(B, D, seed=1).float()}
    outputs.update({k: torch.tensor(1.0) for k in given})
    with pytest.raises(ValueError, match=message):
        loss(outputs, {})


def test_a_non_positive_model_scale_is_refused():
    q, p = unit(B, D, seed=0).float(), unit(B, D, seed=1).float()
    with pytest.raises(ValueError, match="'logit_scale' is 0; it must be finite"):
        InfoNCELoss()(q, p, logit_scale=torch.tensor(0.0))
    with pytest.raises(ValueError, match="1-element floating-point tensor"):
        InfoNCELoss()(q, p, logit_scale=torch.ones(2))


@pytest.mark.parametrize(
    "settings, names",
    [
        ({"loss_type": "infonce"}, None),
        ({"loss_type": "infonce", "learnable_temperature": True, "temperature": 0.2}, ("logit_scale",)),
        ({"loss_type": "maxsim", "learnable_temperature": True}, ("logit_scale",)),
        ({"loss_type": "hard_mining", "learnable_temperature": True}, ("logit_scale",)),
        ({"loss_type": "distillation", "learnable_temperature": True}, ("logit_scale",)),
        ({"loss_type": "distillation", "learnable_temperature": True, "distill_alpha": 1.0}, None),
        ({"loss_type": "sigmoid", "sigmoid_init_scale": 5.0, "sigmoid_init_bias": -2.0}, ("logit_scale", "logit_bias")),
        ({"loss_type": "triplet", "learnable_temperature": True}, None),
    ],
)
def test_each_loss_names_the_parameters_its_model_holds(settings, names):
    from vembed.config import as_config
    from vembed.losses import get_loss_class

    cfg = as_config(settings)
    held = get_loss_class(cfg.loss_type).logit_parameters(cfg)
    assert (None if held is None else held.names) == names
    if held is not None:  # the start values are the config's
        values = held()
        start = 1 / cfg.temperature if cfg.loss_type != "sigmoid" else cfg.sigmoid_init_scale
        assert values["logit_scale"].item() == pytest.approx(start, rel=1e-6)
        if "logit_bias" in names:
            assert values["logit_bias"].item() == pytest.approx(cfg.sigmoid_init_bias)


# ---------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("negatives_kind", [None, "shared", "per_query"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_sigmoid_matches_loop_reference(negatives_kind, with_labels):
    q, p = unit(B, D, seed=4), unit(B, D, seed=5)
    negatives = {None: None, "shared": unit(K, D, seed=6), "per_query": unit(B, K, D, seed=7)}[negatives_kind]
    labels = torch.tensor([1, 1, 0, 2, 0]) if with_labels else None
    loss = SigmoidLoss(init_scale=10.0, init_bias=-3.0).double()
    value = loss(q, p, negatives, labels)

    scale, bias = loss.logit_scale().item(), loss.logit_bias.item()  # 10 and -3, up to float32 storage
    assert (scale, bias) == (pytest.approx(10.0), pytest.approx(-3.0))
    cands = ref_candidates(p, negatives)
    pos_sets = ref_positive_sets(B, B, labels)
    expected = 0.0
    for i in range(B):
        for j, c in enumerate(cands):
            z = 1.0 if j in pos_sets[i] else -1.0
            expected += -math.log(1 / (1 + math.exp(-z * (scale * dot(q[i], c) + bias))))
    assert value.item() == pytest.approx(expected / B, rel=1e-9)


def test_sigmoid_scale_and_bias_change_after_one_step():
    loss = SigmoidLoss(init_scale=10.0, init_bias=-10.0)
    assert loss.logit_scale().item() == pytest.approx(10.0)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    before = [t.detach().clone() for t in loss.parameters()]
    loss(unit(B, D, seed=0).float(), unit(B, D, seed=1).float()).backward()
    optimizer.step()
    after = list(loss.parameters())
    assert len(after) == 2 and all(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))


# ---------------------------------------------------------------- triplet, hard mining


@pytest.mark.parametrize("negatives_kind", [None, "shared", "per_query"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_triplet_hardest_negative_matches_loop_reference(negatives_kind, with_labels):
    q, p = unit(B, D, seed=8), unit(B, D, seed=9)
    negatives = {None: None, "shared": unit(K, D, seed=10), "per_query": unit(B, K, D, seed=11)}[negatives_kind]
    labels = torch.tensor([0, 1, 0, 1, 2]) if with_labels else None
    value = TripletLoss(margin=0.3)(q, p, negatives, labels)

    cands = ref_candidates(p, negatives)
    pos_sets = ref_positive_sets(B, B, labels)
    expected = 0.0
    for i in range(B):
        hardest = max(dot(q[i], c) for j, c in enumerate(cands) if j not in pos_sets[i])
        expected += max(0.0, 0.3 - dot(q[i], p[i]) + hardest)
    assert value.item() == pytest.approx(expected / B, rel=1e-9)


def test_triplet_without_any_negative_is_zero():
    assert TripletLoss()(unit(1, D, seed=0), unit(1, D, seed=1)).item() == 0.0


@pytest.mark.parametrize("negatives_kind", [None, "shared", "per_query"])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_hard_mining_keeps_top_k_negatives(negatives_kind, k):
    q, p = unit(B, D, seed=12), unit(B, D, seed=13)
    negatives = {None: None, "shared": unit(K, D, seed=14), "per_query": unit(B, K, D, seed=15)}[negatives_kind]
    labels = torch.tensor([0, 1, 0, 2, 3])
    value = HardMiningLoss(k=k, temperature=0.1)(q, p, negatives, labels)

    cands = ref_candidates(p, negatives)
    pos_sets = ref_positive_sets(B, B, labels)
    expected = 0.0
    for i in range(B):
        negs = sorted((10 * dot(q[i], c) for j, c in enumerate(cands) if j not in pos_sets[i]), reverse=True)[:k]
        logits = [10 * dot(q[i], p[i]), *negs]
        expected += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    assert value.item() == pytest.approx(expected / B, rel=1e-9)


# ---------------------------------------------------------------- CoSENT


def test_cosent_matches_pairwise_loop_reference():
    q, p = unit(6, D, seed=16), unit(6, D, seed=17)
    gold = torch.tensor([4.5, 1.0, 3.0, 1.0, 0.0, 2.5])
    value = CoSENTLoss(scale=20.0)(q, p, labels=gold)

    s = [dot(q[i], p[i]) for i in range(6)]
    terms = [1.0]
    for i in range(6):
        for j in range(6):
            if gold[i] > gold[j]:
                terms.append(math.exp(20.0 * (s[j] - s[i])))
    assert value.item() == pytest.approx(math.log(sum(terms)), rel=1e-9)


def test_cosent_needs_scores_and_refuses_negatives():
    q, p = unit(B, D, seed=0), unit(B, D, seed=1)
    with pytest.raises(ValueError, match="cosent needs labels"):
        CoSENTLoss()(q, p)
    with pytest.raises(ValueError, match="hard negatives"):
        CoSENTLoss()(q, p, unit(K, D, seed=2), torch.rand(B))


# ---------------------------------------------------------------- MaxSim


def ref_maxsim(qv, qm, dv, dm):
    total = 0.0
    for i in range(qv.shape[0]):
        if qm[i]:
            total += max(dot(qv[i], dv[j]) for j in range(dv.shape[0]) if dm[j])
    return total


@pytest.mark.parametrize("negatives_kind", [None, "shared", "per_query"])
def test_maxsim_respects_padding_and_matches_loop_reference(negatives_kind):
    Lq, Lp, Ln = 4, 5, 3
    q, p = unit(B, Lq, D, seed=18), unit(B, Lp, D, seed=19)
    q_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    p_mask = torch.ones(B, Lp, dtype=torch.bool)
    p_mask[0, 3:] = False
    p_mask[2, 1:] = False
    negatives = n_mask = None
    if negatives_kind == "shared":
        negatives, n_mask = unit(K, Ln, D, seed=20), torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    elif negatives_kind == "per_query":
        negatives = unit(B, K, Ln, D, seed=21)
        n_mask = torch.ones(B, K, Ln, dtype=torch.bool)
        n_mask[:, 0, 2] = False
    # padding holds garbage that must not matter
    q = q.masked_fill(~q_mask[..., None], 7.0)
    p = p.masked_fill(~p_mask[..., None], 7.0)
    if negatives is not None:
        negatives = negatives.masked_fill(~n_mask[..., None], 7.0)

    value = MaxSimLoss(temperature=0.5)(q, p, negatives, query_mask=q_mask, positive_mask=p_mask, negative_mask=n_mask)

    docs = [(p[j], p_mask[j]) for j in range(B)]
    if negatives is not None:
        flat, flat_mask = negatives.reshape(-1, Ln, D), n_mask.reshape(-1, Ln)
        docs += [(flat[k], flat_mask[k]) for k in range(flat.shape[0])]
    expected = 0.0
    for i in range(B):
        logits = [ref_maxsim(q[i], q_mask[i], dv, dm) / 0.5 for dv, dm in docs]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert value.item() == pytest.approx(expected / B, rel=1e-9)


def test_maxsim_reads_masks_from_outputs_and_single_vector_losses_ignore_them():
    q, p = unit(B, 3, D, seed=0), unit(B, 4, D, seed=1)
    q_mask, p_mask = torch.ones(B, 3, dtype=torch.bool), torch.ones(B, 4, dtype=torch.bool)
    q_mask[:, 2], p_mask[0, 1:] = False, False
    outputs = {"query": q, "positive": p, "query_mask": q_mask, "positive_mask": p_mask}
    by_tensors = MaxSimLoss()(q, p, query_mask=q_mask, positive_mask=p_mask)
    assert MaxSimLoss()(outputs, {}).item() == pytest.approx(by_tensors.item(), rel=1e-12)
    assert MaxSimLoss()(outputs, {}).item() != pytest.approx(MaxSimLoss()(q, p).item(), rel=1e-6)
    pooled = {"query": q[:, 0], "positive": p[:, 0], "query_mask": q_mask}
    assert InfoNCELoss()(pooled, {}).item() == pytest.approx(InfoNCELoss()(q[:, 0], p[:, 0]).item(), rel=1e-12)


def test_maxsim_rejects_single_vector_and_fully_masked_items():
    with pytest.raises(ValueError, match=r"multi-vector \[B, L, D\]"):
        MaxSimLoss()(unit(B, D, seed=0), unit(B, D, seed=1))
    q, p = unit(B, 3, D, seed=0), unit(B, 3, D, seed=1)
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="masks out every token"):
        MaxSimLoss()(q, p, positive_mask=mask)


# ---------------------------------------------------------------- distillation


@pytest.mark.parametrize("distill_type", ["kl", "mse"])
def test_distillation_matches_loop_reference(distill_type):
    q, p, n = unit(B, D, seed=22), unit(B, D, seed=23), unit(B, 2, D, seed=24)
    tq, tp, tn = unit(B, 6, seed=25), unit(B, 6, seed=26), unit(B, 2, 6, seed=27)
    loss = DistillationLoss(alpha=0.3, distill_type=distill_type, temperature=0.5, contrastive=InfoNCELoss(0.1))
    value = loss(q, p, n, teacher_query=tq, teacher_positive=tp, teacher_negatives=tn)

    student_cands, teacher_cands = ref_candidates(p, n), ref_candidates(tp, tn)
    distill = 0.0
    for i in range(B):
        s = [dot(q[i], c) for c in student_cands]
        t = [dot(tq[i], c) for c in teacher_cands]
        if distill_type == "kl":
            ps = [math.exp(x / 0.5) for x in s]
            pt = [math.exp(x / 0.5) for x in t]
            ps, pt = [x / sum(ps) for x in ps], [x / sum(pt) for x in pt]
            distill += 0.25 * sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
        else:
            distill += sum((a - b) ** 2 for a, b in zip(s, t, strict=True)) / len(s)
    expected = 0.7 * ref_infonce(q, p, n, temperature=0.1) + 0.3 * distill / B
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_distillation_reads_teacher_from_outputs_and_demands_it():
    q, p, tq, tp = unit(B, D, seed=0), unit(B, D, seed=1), unit(B, 4, seed=2), unit(B, 4, seed=3)
    loss = DistillationLoss()
    by_kwargs = loss(q, p, teacher_query=tq, teacher_positive=tp)
    by_outputs = loss({"query": q, "positive": p, "teacher_query": tq, "teacher_positive": tp}, {})
    assert by_outputs.item() == pytest.approx(by_kwargs.item(), rel=1e-12)
    with pytest.raises(ValueError, match="teacher's embeddings"):
        loss(q, p)
    with pytest.raises(ValueError, match="teacher_negatives"):
        loss(q, p, unit(K, D, seed=4), teacher_query=tq, teacher_positive=tp)
    with pytest.raises(TypeError, match="unexpected inputs"):
        InfoNCELoss()(q, p, teacher_query=tq)


# ---------------------------------------------------------------- Matryoshka


def test_matryoshka_renormalises_each_dim_and_keeps_weights_with_their_dims():
    q = torch.randn(B, 16, dtype=torch.float64)  # deliberately not normalised
    p, n = torch.randn(B, 16, dtype=torch.float64), torch.randn(K, 16, dtype=torch.float64)
    inner = InfoNCELoss(temperature=0.2)
    value = MatryoshkaLoss(inner, dims=[4, 16, 8], weights=[0.5, 1.0, 2.0])(q, p, n)

    expected = 0.0
    for dim, weight in [(4, 0.5), (16, 1.0), (8, 2.0)]:
        tq, tp, tn = (F.normalize(t[:, :dim], dim=-1) for t in (q, p, n))
        expected += weight * ref_infonce(tq, tp, tn, temperature=0.2)
    assert value.item() == pytest.approx(expected, rel=1e-9)

    same_pairs_reordered = MatryoshkaLoss(inner, dims=[8, 4, 16], weights=[2.0, 0.5, 1.0])(q, p, n)
    assert same_pairs_reordered.item() == pytest.approx(value.item(), rel=1e-12)
    weights_moved = MatryoshkaLoss(inner, dims=[4, 16, 8], weights=[2.0, 1.0, 0.5])(q, p, n)
    assert weights_moved.item() != pytest.approx(value.item(), rel=1e-6)


def test_matryoshka_inner_loss_sees_unit_norm_prefixes():
    seen: list[LossInputs] = []

    class Recorder(EmbeddingLoss):
        def compute(self, inputs: LossInputs) -> torch.Tensor:
            seen.append(inputs)
            return inputs.query.sum() * 0

    q, p = torch.randn(B, 12) * 3, torch.randn(B, 12) * 3
    MatryoshkaLoss(Recorder(), dims=[3, 12])(q, p, torch.randn(B, 2, 12))
    assert [x.query.shape[-1] for x in seen] == [3, 12]
    for inputs in seen:
        for t in (inputs.query, inputs.positive, inputs.negatives):
            torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))
        torch.testing.assert_close(inputs.query, F.normalize(q[:, : inputs.query.shape[-1]], dim=-1))


def test_matryoshka_rejects_bad_dims():
    with pytest.raises(ValueError, match="one per dim"):
        MatryoshkaLoss(InfoNCELoss(), dims=[4, 8], weights=[1.0])
    with pytest.raises(ValueError, match="exceed the embedding dim 8"):
        MatryoshkaLoss(InfoNCELoss(), dims=[4, 32])(unit(B, D, seed=0), unit(B, D, seed=1))


# ---------------------------------------------------------------- factory and registry


def test_factory_builds_every_registered_loss_from_a_dict():
    assert set(available_losses()) >= {"infonce", "sigmoid", "triplet", "cosent", "hard_mining", "maxsim"}
    for name in available_losses():
        assert isinstance(LossFactory.create({"loss_type": name}), EmbeddingLoss)


def test_factory_reads_config_and_wraps_matryoshka():
    loss = LossFactory.create({"loss_type": "infonce", "temperature": 0.2, "bidirectional": False})
    assert isinstance(loss, InfoNCELoss) and not loss.bidirectional
    assert loss.logit_scale.temperature == pytest.approx(0.2)
    wrapped = LossFactory.create_loss(
        "triplet", {"mrl_dims": [4, 8], "mrl_weights": [1.0, 0.25], "triplet_margin": 0.5}
    )
    assert isinstance(wrapped, MatryoshkaLoss) and wrapped.dims_and_weights == [(4, 1.0), (8, 0.25)]
    assert isinstance(wrapped.loss, TripletLoss) and wrapped.loss.margin == 0.5


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(UnknownLossError, match="unknown loss_type 'infonse'.*infonce"):
        LossFactory.create({"loss_type": "infonse"})


def test_register_a_custom_loss_by_name():
    @register_loss("test_mean_distance")
    class MeanDistance(EmbeddingLoss):
        def compute(self, inputs: LossInputs) -> torch.Tensor:
            return (inputs.query - inputs.positive).pow(2).sum(-1).mean()

    loss = LossFactory.create({"loss_type": "test_mean_distance"})
    assert isinstance(loss, MeanDistance)
    q, p = unit(B, D, seed=0), unit(B, D, seed=1)
    assert loss(q, p).item() == pytest.approx(((q - p) ** 2).sum(-1).mean().item())
    with pytest.raises(ValueError, match="already registered"):
        register_loss("infonce")(MeanDistance)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(3, 8)), ValueError, r"batch sizes.*\[4, 8\].*\[3, 8\]"),
        (
            lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 6)),
            ValueError,
            r"embedding dims.*\[4, 8\].*\[4, 6\]",
        ),
        (lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 7)), ValueError, "negatives dim 7"),
        (lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 2, 8)), ValueError, "per-query"),
        (lambda: InfoNCELoss()(torch.randn(4, 2, 8), torch.randn(4, 2, 8)), ValueError, r"single-vector \[B, D\]"),
        (
            lambda: InfoNCELoss()(torch.full((4, 8), float("nan")), torch.randn(4, 8)),
            ValueError,
            r"'query' \[4, 8\] holds 32 NaN",
        ),
        (lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 8), labels=torch.zeros(3)), ValueError, r"\[4\]"),
        (lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 8), labels=torch.rand(4)), TypeError, "class ids"),
        (lambda: InfoNCELoss()(torch.randint(0, 3, (4, 8)), torch.randn(4, 8)), TypeError, "floating-point"),
        (lambda: InfoNCELoss()({"query": torch.randn(4, 8)}, {}), ValueError, r"lack \['positive'\]"),
        (
            lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 8), query_mask=torch.ones(4)),
            ValueError,
            "only apply to multi-vector",
        ),
        (lambda: InfoNCELoss(temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: InfoNCELoss(temperature=500.0, learnable_temperature=True), ValueError, "learnable temperature"),
    ],
    ids=[
        "batch-size",
        "dim",
        "negative-dim",
        "per-query-batch",
        "ndim",
        "nan",
        "label-shape",
        "float-labels",
        "int-embeddings",
        "missing-role",
        "mask-on-single-vector",
        "zero-temperature",
        "temperature-range",
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
