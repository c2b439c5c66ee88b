"""The chunked work items of SPEC §13 and the packed layout of SPEC §2.

* the plan: chunks of ≤ 4096 tokens, a grid of ≥ min(#chunks, 2×132) programs for
  any batch shape (one 1M-token row included), chosen from N alone;
* one long row split over many chunks and programs, bit-for-bit deterministic;
* packed ``[N]`` inputs with ``cu_seqlens`` (empty sequences, [N] and [S]
  advantages, every family and aggregation) against the padded reference;
* malformed ``cu_seqlens``: no crash without ``validate``, a clear error with it.
"""
import pytest
import torch

import isreshape_triton as irt
from isreshape_triton import launch
from isreshape_triton.families import kernel_family
from isreshape_triton.inputs import prepare_inputs
from isreshape_triton.inputs import Inputs

from _cases import AGG_MODES, FAMILY_CONFIGS, pairwise, sampled
from test_kernels import SMALL_TILING, check_against_reference, fused_with_counts

SMS = 132


@pytest.mark.parametrize("R,T", [(1, 1 << 20), (1, 4096), (4, 32768), (16, 4096), (64, 4096),
                                 (1024, 4096), (3, 37)])
def test_plan_fills_the_gpu_for_every_shape(R, T):
    x = Inputs(torch.empty(R, T), torch.empty(R, T), None, None, torch.Size((R, T)))
    geo = launch.geometry(x)
    assert geo["chunk"] <= 4096 and geo["n_chunks"] * geo["chunk"] >= R * T
    assert geo["grid"] >= min(geo["n_chunks"], 2 * SMS)
    assert geo["grid"] <= launch.TILING.max_programs  # = the number of partial records
    if R * T >= 2 * SMS * 1024:  # enough tokens: at least two work items per SM
        assert geo["n_chunks"] >= 2 * SMS - 8
    packed = Inputs(torch.empty(R * T), torch.empty(R * T), None, None, torch.Size((R * T,)),
                    torch.arange(0, R * T + 1, T, dtype=torch.int32))
    assert launch.geometry(packed)["grid"] == geo["grid"]  # the plan depends on N only


def _packed_batch(lengths, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    N = int(cu[-1])
    lp = -torch.rand(N, generator=g, dtype=torch.float64) * 3
    olp = lp + 0.6 * torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = torch.rand(N, generator=g) > 0.2
    seq_adv = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    return lp.to(dtype), olp.to(dtype), adv.to(dtype), mask, seq_adv.to(dtype), cu


# every loss type and γ rule, half of the option variants (the padded suite has them all)
PACKED_FAMILIES = sampled(2) + [c for c in FAMILY_CONFIGS[1::2] if c[0] in ("vespo", "sapo") and c not in sampled(2)]
PACKED_CASES = pairwise({"family": PACKED_FAMILIES, "agg": AGG_MODES, "adv": ("N", "S", "none"),
                         "mask": ("bool", "none"), "tiling": ("default", "small"),
                         "lengths": ((37, 0, 5, 60, 1, 20), (300,), (0, 16, 16, 3, 0))})


@pytest.mark.parametrize("case", PACKED_CASES,
                         ids=[f"{c['family'][0]}{c['family'][1]}-{c['agg']}-{c['adv']}-{c['mask']}-{c['tiling']}-"
                              f"{len(c['lengths'])}seq" for c in PACKED_CASES])
def test_packed_matches_padded_reference(case, poisoned_outputs, monkeypatch):
    """Every row rule per sequence; the reference pads to [S, longest] (SPEC §2)."""
    if case["tiling"] == "small":
        monkeypatch.setattr(launch, "TILING", SMALL_TILING)
    loss_type, opts = case["family"]
    lp, olp, adv, mask, seq_adv, cu = _packed_batch(case["lengths"], seed=len(case["lengths"]))
    adv = {"N": adv, "S": seq_adv, "none": None}[case["adv"]]
    mask = mask if case["mask"] == "bool" else None
    per_seq = opts.get("gamma_granularity") == "sequence"
    seq_exact = opts.get("gamma") == "ess_exact" and per_seq
    psis_rows = opts.get("gamma") == "psis" and per_seq  # pads to the longest sequence: one sync
    check_against_reference(lp, olp, adv, mask, loss_type, case["agg"], {**opts, "cu_seqlens": cu},
                            rtol=2e-3 if seq_exact else None, syncs=int(psis_rows))


def _merges_statistics(loss_type, opts) -> bool:
    fam = kernel_family(loss_type, irt.make_params(loss_type, **opts))
    return fam.needs_stats or fam.psis


# the configurations whose context merges records across chunks and programs, and one without
LONG_ROW_FAMILIES = [c for c in sampled(2) if _merges_statistics(*c)] + [("ppo_clip", {})]


def test_one_long_row_spans_many_chunks_and_programs(monkeypatch):
    """R = 1: 19 chunks of 16 tokens on 3 programs; the same bits on every repeat."""
    monkeypatch.setattr(launch, "TILING", SMALL_TILING)
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(1, 300, generator=g)
    olp = lp + 0.5 * torch.randn(1, 300, generator=g)
    adv = torch.randn(1, 300, generator=g)
    mask = torch.rand(1, 300, generator=g) > 0.1
    for loss_type, opts in LONG_ROW_FAMILIES:
        for agg in ("token-mean", "seq-mean-token-mean"):
            first = check_against_reference(lp, olp, adv, mask, loss_type, agg, opts,
                                            rtol=2e-3 if opts.get("gamma") == "ess_exact" else None)
            again = fused_with_counts(lp, olp, adv, mask, loss_type, agg, **opts)
            assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])


@pytest.mark.parametrize("cu", [[0, 5, 3, 20], [0, 50, 60, 70], [-7, 4, 9, 20], [3, 3, 3, 3], [0, 2, 4, 19]])
def test_malformed_cu_seqlens_never_crash_and_validate_names_it(cu):
    lp = torch.randn(20)
    cu = torch.tensor(cu, dtype=torch.int64)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        for loss_type in ("ppo_clip", "vespo", "is_reshape"):
            loss, metrics, grad, work = fused_with_counts(lp, lp - 0.1, torch.randn(20), None, loss_type, agg,
                                                          cu_seqlens=cu)
            assert work.syncs == 0 and grad.shape == (20,)
    with pytest.raises(ValueError, match="cu_seqlens"):
        irt.policy_loss(lp, lp, cu_seqlens=cu, validate=True)


def test_packed_bad_shapes_name_the_argument():
    lp = torch.randn(10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="advantages"):
        irt.policy_loss(lp, lp, torch.randn(3), cu_seqlens=cu)
    with pytest.raises(ValueError, match="log_prob"):
        irt.policy_loss(lp.reshape(2, 5), lp.reshape(2, 5), cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens"):
        irt.policy_loss(lp, lp, cu_seqlens=cu.float())


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_every_output_is_written_with_empty_rows(agg, monkeypatch):
    """Packed rows of length 0 get no piece; the finalizer still writes their n_b = 0, so every
    output of the op (row counts included) is the same whatever the allocator hands out."""
    lp, olp, adv, mask, _, cu = _packed_batch((7, 0, 12, 0, 3))
    outs = []
    for fill in (float("nan"), 7.0):
        monkeypatch.setattr(launch, "empty_buffer",
                            lambda shape, dtype, device, fill=fill: torch.full(shape, fill, dtype=dtype, device=device))
        x = prepare_inputs(lp, olp, adv, mask, cu_seqlens=cu)
        plan = launch.plan_launches(x, irt.families.kernel_family("vespo", irt.make_params("vespo")),
                                    irt.params.AggConfig(agg), 20.0, True)
        for step in plan.steps:
            step()
        outs.append((plan.loss, plan.metrics, plan.neg_phi, plan.grad_scale, plan.row_count))
    for a, b in zip(*outs):
        assert torch.equal(a, b), (a, b)
    assert outs[0][4].tolist() == [float(mask[:7].sum()), 0.0, float(mask[7:19].sum()), 0.0, float(mask[19:].sum())]
