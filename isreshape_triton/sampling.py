"""``irt.optimal_sampling``: the sampling distribution of seed 003 (SPEC §9) for one decode step.

q* ∝ π_θ^α · π_t^{1−α} per row, α from KL symmetry (E_{q_α}[log π_t − log π_θ] = 0), from the
SNR of the learning-progress expansion, or given; then one token per row drawn from q* with the
Gumbel-max trick, and the quantities an importance-sampled loss needs afterwards.

CUDA tensors run the Triton kernels of ``kernels/sampling.py``; CPU tensors run the fp64 reference
(``irt.reference.optimal_sampling``) unless ``TRITON_INTERPRET=1``. The kernel path makes a fixed
number of launches (``launch_count``) and no host sync; the seed of the Gumbel noise is drawn from
``generator`` (or the device's default generator) into a device tensor.

Precision: the search passes of kl_symmetry stream in fp32; pass 0 (log-normalisers, E at both
ends) and the last two Newton passes run their element math in fp64, so α, the KLs and log q come out
with fp64 accuracy (then stored as fp32) although the search itself is fp32. SNR passes are
fp64 throughout: locating a flat maximum to 1e-4 needs the ratio to ~1e-8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from .sampling_args import SamplingConfig, SamplingResult, validate

NEWTON_PASSES = 7  # kl_symmetry evaluation passes (the last two in fp64); 6 Newton updates in them and
# a 7th in the draw where the step is short, |δ|·(max ℓ − min ℓ) ≤ 0.01 (else log Z and the KLs are
# those evaluated at the last pass's α, not extrapolated; issue 17)
SNR_PASSES = 7  # grid-search passes of G points each, fp64: 2 cover a 2G-point grid, 5 refine
SNR_POINTS = 8  # G: the refinement step shrinks by (G + 1)/2 per pass; 1/15·(2/9)^5 ≈ 4e-5 at the end
SEG_UNIT = 4096  # segment lengths are multiples of this work-item size (every tile size divides it)
SMS = 132
TARGET_PROGRAMS = 4 * SMS  # 4 programs per SM on 132 SMs: one wave (every streaming kernel fits 4 CTAs/SM)
REC_BLOCK = 64  # records merged per vector step (one step up to V = 256K)
FINAL_ROWS, FINAL_SEGS = 32, 32  # finalize tile: rows × segments

# (tile, launch options) per kernel; every tile divides SEG_UNIT and is fixed, so only dtypes and
# flags ever compile a new specialization
STATS_TILE = (256, dict(num_warps=4))
ALPHA_TILE = {False: (1024, dict(num_warps=4)), True: (512, dict(num_warps=4))}  # by fp64
# the draw: 128 registers allowed (4 CTAs/SM still fit); Triton 3.5/3.6's ptxas otherwise aims at 80
# and spills a register around the fp64 division calls of the final Newton step
DRAW_TILE = (1024, dict(num_warps=4, maxnreg=128))
FINAL_OPTIONS = dict(num_warps=4)


def optimal_sampling(logits_policy, logits_target, method="kl_symmetry", temperature=1.0, ref_logits=None,
                     generator=None, return_log_q=False) -> SamplingResult:
    """Sample one token per row from q* ∝ π_θ^α·π_t^{1−α} (SPEC §9); see :class:`SamplingResult`.

    π = softmax(logits / temperature) for the policy, the target and (SNR) the reference
    (default π_ref = π_θ). ``method``: "kl_symmetry" (α solves E_{q_α}[log π_t/π_θ] = 0),
    "snr" (α maximises |Φ1|/√Φ2, seed 003 §3), or a float α in [0, 1].
    −inf logits (top-k/top-p truncation) are legal: q = 0 there for α ∈ (0, 1). Identical rows
    give α = 0.5. Rows with NaN or +inf logits (or no finite logit) give NaN outputs and token −1.
    """
    from .api import uses_kernels

    config = validate(logits_policy, logits_target, method, temperature, ref_logits, generator, return_log_q)
    if uses_kernels(logits_policy):
        return _optimal_sampling_kernels(logits_policy, logits_target, ref_logits, generator, config)
    from .reference.sampling import optimal_sampling as reference

    return reference(logits_policy, logits_target, method, temperature, ref_logits, generator, return_log_q)


# ----------------------------------------------------------------------------- launch planning

def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace this with a poisoned fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def segment_length(n_rows: int, vocab: int) -> int:
    """Elements per program, a multiple of SEG_UNIT: one work item each (grid = #work items) until
    the batch has more than TARGET_PROGRAMS of them, then about TARGET_PROGRAMS programs in all,
    each walking consecutive work items of one row with the same lane accumulators. A row's
    segments are evened out (V = 128,256 in two segments: 65,536 + 62,720, not 126,976 + 1,280)."""
    def units(n: int) -> int:
        return -(-n // SEG_UNIT) * SEG_UNIT

    nseg = -(-vocab // units(-(-(n_rows * vocab) // TARGET_PROGRAMS)))
    if n_rows * nseg > TARGET_PROGRAMS:  # several waves: whole ones at 4 or 6 resident CTAs per SM
        fits = [n for n in range(nseg, nseg + 4) if -(-(n_rows * n) // SMS) % 12 == 0 and units(-(-vocab // n)) < vocab]
        nseg = fits[0] if fits else nseg
    return units(-(-vocab // nseg))


def _contiguous_rows(vocab: int, *logits: torch.Tensor) -> bool:
    """CONTIG of the streaming kernels: unit element strides, and V and the row strides multiples
    of 16 elements, so every row and tile starts 16-element aligned and the V loads vectorise
    (two specialisations; sizes themselves never specialise)."""
    return vocab % 16 == 0 and all(t.stride(1) == 1 and t.stride(0) % 16 == 0 for t in logits)


def pass_schedule(method: str) -> List[Tuple[bool, int, bool, bool]]:
    """(FIRST, SNR_UPDATE, EVAL_SNR, fp64) of every search launch (SNR_UPDATE: 0 none, 1 after the
    even coarse points, 2 after the odd ones, 3 after a refinement pass)."""
    if method == "kl_symmetry":
        return ([(True, 0, False, False)] + [(False, 0, False, False)] * (NEWTON_PASSES - 3)
                + [(False, 0, False, True)] * 2)
    if method == "snr":
        return ([(True, 0, True, True), (False, 1, True, True), (False, 2, True, True)]
                + [(False, 3, True, True)] * (SNR_PASSES - 3) + [(False, 3, False, True)])
    return [(True, 0, False, True)]


def launch_count(method: str) -> int:
    """Triton launches of one call: pass 0, the search passes, the draw, the finalize."""
    return len(pass_schedule(method)) + 3


@dataclass
class SamplingPlan:
    steps: list  # launch.Launch objects, run in order
    result: SamplingResult  # flat [N] outputs (and [N, V] log q)
    seg: int
    nseg: int


def _seed_tensor(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """A 62-bit seed as a 1-element int64 device tensor (no host sync)."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=gen_device, generator=generator)
    return seed if seed.device == device else seed.to(device)


def plan_sampling(pol: torch.Tensor, tgt: torch.Tensor, ref: Optional[torch.Tensor], config: SamplingConfig,
                  seed: torch.Tensor) -> SamplingPlan:
    """Allocate the buffers and outputs of ``[N, V]`` logits and list the launches."""
    import triton.language as tl

    from .kernels import sampling as ks
    from .launch import Launch

    N, V = pol.shape
    dev = pol.device
    seg = segment_length(N, V)
    nseg = -(-V // seg)
    programs = N * nseg
    snr = config.method == "snr"
    G = SNR_POINTS
    rec_w = 3 * G if snr else ks.MO_W.value
    f64 = torch.float64
    stats = _empty((programs, ks.ST_W.value), f64, dev)
    recs = _empty((2, programs, rec_w), f64, dev)
    states = _empty((2, N, ks.Z_W.value), f64, dev)
    out = SamplingResult(
        tokens=_empty((N,), torch.int64, dev), alpha=_empty((N,), torch.float32, dev),
        log_q=_empty((N,), torch.float32, dev), log_p_policy=_empty((N,), torch.float32, dev),
        log_p_target=_empty((N,), torch.float32, dev), kl_q_policy=_empty((N,), torch.float32, dev),
        kl_q_target=_empty((N,), torch.float32, dev), alpha_at_bound=_empty((N,), torch.bool, dev),
        log_q_full=_empty((N, V), torch.float32, dev) if config.return_log_q else None)
    has_ref = ref is not None
    ref = ref if has_ref else pol
    # 1/T as an fp32 value plus its fp32 residual (Triton passes float arguments as fp32)
    inv_temp = float(np.float32(1.0 / config.temperature))
    temps = dict(inv_temp=inv_temp, inv_temp_lo=1.0 / config.temperature - inv_temp)
    common = dict(V=V, nseg=nseg, seg=seg, s_pr=pol.stride(0), s_pv=pol.stride(1), s_tr=tgt.stride(0),
                  s_tv=tgt.stride(1))
    contig = _contiguous_rows(V, pol, tgt, ref)
    ref_strides = dict(s_rr=ref.stride(0), s_rv=ref.stride(1))
    block, options = STATS_TILE
    steps = [Launch(ks.sampling_stats_kernel, (programs,),
                    dict(pol_ptr=pol, tgt_ptr=tgt, ref_ptr=ref, stats_ptr=stats, **common, **ref_strides, **temps),
                    dict(HAS_REF=has_ref, BLOCK=block, CONTIG=contig), {**options, "num_stages": 1})]
    method_code = {"kl_symmetry": ks.METHOD_KL, "snr": ks.METHOD_SNR, "fixed": ks.METHOD_FIXED}[config.method]
    schedule = pass_schedule(config.method)
    prev_fp64 = True  # pass 0
    for k, (first, snr_update, eval_snr, fp64) in enumerate(schedule, start=1):
        block, options = ALPHA_TILE[fp64]
        steps.append(Launch(
            ks.sampling_alpha_kernel, (programs,),
            dict(pol_ptr=pol, tgt_ptr=tgt, ref_ptr=ref, stats_ptr=stats, prev_ptr=recs[(k - 1) % 2],
                 rec_ptr=recs[k % 2], state_in_ptr=states[(k - 1) % 2], state_out_ptr=states[k % 2],
                 **common, **ref_strides, **temps, method=method_code.value,
                 fixed_alpha=float(config.alpha if config.alpha is not None else 0.0)),
            dict(FIRST=first, SNR_UPDATE=snr_update, PREV_FP64=prev_fp64, EVAL_SNR=eval_snr, HAS_REF=has_ref,
                 ACC=tl.float64 if fp64 else tl.float32, REC_W=rec_w, G=G, BLOCK=block, BLOCK_C=REC_BLOCK,
                 CONTIG=contig),
            {**options, "num_stages": 1}))
        prev_fp64 = fp64
    k = len(schedule) + 1
    block, options = DRAW_TILE
    logq = out.log_q_full if config.return_log_q else out.alpha
    steps.append(Launch(
        ks.sampling_draw_kernel, (programs,),
        dict(pol_ptr=pol, tgt_ptr=tgt, prev_ptr=recs[(k - 1) % 2], rec_ptr=recs[k % 2],
             state_in_ptr=states[(k - 1) % 2], state_out_ptr=states[k % 2], seed_ptr=seed, logq_ptr=logq,
             **common, s_qr=V, inv_temp=inv_temp),
        dict(WRITE_LOGQ=config.return_log_q, PREV_FP64=prev_fp64, REC_W=rec_w, G=G, BLOCK=block,
             BLOCK_C=REC_BLOCK, CONTIG=contig),
        {**options, "num_stages": 1}))
    steps.append(Launch(
        ks.sampling_finalize_kernel, (-(-N // FINAL_ROWS),),
        dict(pol_ptr=pol, tgt_ptr=tgt, rec_ptr=recs[k % 2], state_ptr=states[k % 2], tokens_ptr=out.tokens,
             alpha_ptr=out.alpha, logq_ptr=out.log_q, lp_pol_ptr=out.log_p_policy, lp_tgt_ptr=out.log_p_target,
             kl_p_ptr=out.kl_q_policy, kl_t_ptr=out.kl_q_target, bound_ptr=out.alpha_at_bound,
             N=N, V=V, nseg=nseg, s_pr=pol.stride(0), s_pv=pol.stride(1), s_tr=tgt.stride(0),
             s_tv=tgt.stride(1), **temps),
        dict(REC_W=rec_w, BLOCK_R=FINAL_ROWS, BLOCK_C=FINAL_SEGS),
        {**FINAL_OPTIONS, "num_stages": 1}))
    return SamplingPlan(steps, out, seg, nseg)


def _optimal_sampling_kernels(logits_policy, logits_target, ref_logits, generator,
                              config: SamplingConfig) -> SamplingResult:
    lead, V = logits_policy.shape[:-1], logits_policy.shape[-1]
    pol = logits_policy.reshape(-1, V)
    tgt = logits_target.reshape(-1, V)
    ref = ref_logits.reshape(-1, V) if ref_logits is not None else None
    N = pol.shape[0]
    if N == 0:
        dtypes = (torch.int64,) + (torch.float32,) * 6 + (torch.bool,)
        return SamplingResult(*(torch.empty(lead, dtype=dt, device=pol.device) for dt in dtypes),
                              torch.empty((*lead, V), dtype=torch.float32, device=pol.device)
                              if config.return_log_q else None)
    plan = plan_sampling(pol, tgt, ref, config, _seed_tensor(generator, pol.device))
    for step in plan.steps:
        step()
    r = plan.result
    return SamplingResult(*(t.view(lead) for t in r[:-1]),
                          r.log_q_full.view(*lead, V) if r.log_q_full is not None else None)


def traffic_model(n_rows: int, vocab: int, itemsize: int, method: str = "kl_symmetry", has_ref: bool = False,
                  return_log_q: bool = False) -> dict:
    """Bytes one call moves, by stream. Every launch but the finalize streams the policy and
    target rows once (pass 0 and the SNR passes also the reference); the draw writes log q (fp32)
    when asked. The fp64 records: each program writes one and, in the next launch, every program
    of a row reads all of the row's records (L2-resident, O(rows × segments²))."""
    from .kernels import sampling as ks

    seg = segment_length(n_rows, vocab)
    nseg = -(-vocab // seg)
    n_search = len(pass_schedule(method))
    passes = n_search + 2
    ref_passes = (1 + (SNR_PASSES if method == "snr" else 0)) if has_ref else 0
    logits = n_rows * vocab * itemsize * (2 * passes + ref_passes)
    rec_w = 3 * SNR_POINTS if method == "snr" else ks.MO_W.value
    st_w = ks.ST_W.value
    writes = st_w + n_search * rec_w + 2
    reads = nseg * (st_w + n_search * rec_w + 2)  # the search passes and the draw read the previous records
    records = 8 * n_rows * nseg * (writes + reads) + 8 * n_rows * ks.Z_W.value * (passes + 1)
    logq = 4 * n_rows * vocab if return_log_q else 0
    return {"logits": logits, "records": records, "log_q": logq, "total": logits + records + logq,
            "passes": passes, "segment": seg, "segments_per_row": nseg}
