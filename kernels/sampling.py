"""Optimal sampling distribution of seed 003 (SPEC §9) as a few streaming passes over V.

Per row: a = z_θ/T, b = z_t/T (logits), A = lse(a), B = lse(b), d = b − a, ℓ = d − (B − A)
= log π_t − log π_θ, S = {a > −∞} ∩ {b > −∞}. For α ∈ (0, 1), q_α = softmax(s), s = α·a + (1−α)·b
on S (q = 0 off S); q_1 = π_θ and q_0 = π_t. KL symmetry: E_{q_α}[ℓ] = 0, dE/dα = −Var_{q_α}(ℓ).

After pass 0 every pass works with max-shifted logits a' = (z_θ − max z_θ)/T ≤ 0 (b', r' alike)
and the log-sums λ_a = A − max a ≥ 0, λ_b, λ_r, so log π_θ = a' − λ_a and ℓ = (b' − a') − (λ_b − λ_a)
keep fp32's relative precision where the probability mass is (ℓ of a token with π ≈ 1 − 1e-10 is
~1e-10, which fp32 loses in d − (B − A) but not in this form).

Work items: a row's V is cut into segments of ``seg`` elements (a multiple of the 4096-element work
item, chosen by the host: one work item per program until there are more than 4 per SM, so the
grid is min(#work items, ~528) programs — one wave — for any N; one row of V = 256K is 64 programs,
not one). With CONTIG (unit element stride, V and row strides multiples of 16) the V loads vectorise.
Each program keeps lane (vector) accumulators over its tiles — online max and rescaled sums, like
an online softmax; no block reduction inside a tile loop — and writes one record; the next launch
merges the row's records in a fixed order (deterministic). Every program of a row merges the same
records with the same code, so all of them see bit-identical α; segment 0 also writes the row
state. The price of splitting V is one launch per Newton step (no program waits on another) and
O(segments²) record reads per row from L2.

Precision: pass 0 and the last search passes do their element math in fp64 (so α, log Z and the KLs
have fp64 accuracy); the other Newton passes are fp32. SNR passes are fp64 (a flat maximum located
to 1e-4 needs the ratio to ~1e-8).

Launches (fixed per method, never data-dependent):
  ``sampling_stats_kernel``     pass 0 (fp64): A, B (and the reference's lse), E_S(0), E_S(1), the
                                range of d on S, support counts, non-finite count;
  ``sampling_alpha_kernel`` ×K  merge the previous records, update α, evaluate at the new α:
                                Newton moments (kl_symmetry, fixed α) or SNR terms at G points;
  ``sampling_draw_kernel``      a last Newton step where it is short (``_final``; else the last search pass's α,
                                where it evaluated), KLs and log Z, the draw per segment (exponential race), optional log q;
  ``sampling_finalize_kernel``  per row: token, log-probs at the token, outputs.
"""
import triton
import triton.language as tl

# pass-0 statistics record, one per (row, segment); sums of e^{x − m} are relative to the record's max m
ST_MA = tl.constexpr(0)  # max a
ST_SA = tl.constexpr(1)  # Σ e^{a−m_a}
ST_UA = tl.constexpr(2)  # Σ_S e^{a−m_a}
ST_UDA = tl.constexpr(3)  # Σ_S e^{a−m_a}·d
ST_MB = tl.constexpr(4)
ST_SB = tl.constexpr(5)
ST_UB = tl.constexpr(6)
ST_UDB = tl.constexpr(7)
ST_MR = tl.constexpr(8)  # reference logits (SNR)
ST_SR = tl.constexpr(9)
ST_NDMIN = tl.constexpr(10)  # −min_S d
ST_DMAX = tl.constexpr(11)
ST_NS = tl.constexpr(12)  # |S|
ST_NP = tl.constexpr(13)  # #{a > −∞, b = −∞}
ST_NT = tl.constexpr(14)  # #{b > −∞, a = −∞}
ST_NR = tl.constexpr(15)  # #{on S, reference = −∞}
ST_BAD = tl.constexpr(16)  # #NaN or +∞ entries
ST_W = tl.constexpr(17)

STATS_MERGE_BLOCK = tl.constexpr(16)  # pass-0 records merged per vector step

# moments record (Newton passes): max s, Σw, Σwℓ⁺, Σwℓ⁻, Σwℓ⁺², Σwℓ⁻² with w = e^{s−max} on supp(q)
MO_M = tl.constexpr(0)
MO_S0 = tl.constexpr(1)
MO_P = tl.constexpr(2)
MO_N = tl.constexpr(3)
MO_P2 = tl.constexpr(4)
MO_N2 = tl.constexpr(5)
MO_W = tl.constexpr(6)
# SNR record: T1, T2, T3 at G points (slots k·G + i); draw record: best race key, its index
DR_SCORE = tl.constexpr(0)
DR_IDX = tl.constexpr(1)

# row state, written by segment 0 of every launch for the next one
Z_ALPHA = tl.constexpr(0)  # α evaluated by this launch (final α after the draw)
Z_LO = tl.constexpr(1)  # Newton bracket [lo, hi]; SNR: first grid point, grid step
Z_HI = tl.constexpr(2)
Z_MODE = tl.constexpr(3)
Z_BOUND = tl.constexpr(4)
Z_ZA = tl.constexpr(5)  # max raw logit of the policy, target, reference
Z_ZB = tl.constexpr(6)
Z_ZR = tl.constexpr(7)
Z_LA = tl.constexpr(8)  # λ = lse − max of the scaled logits (≥ 0)
Z_LB = tl.constexpr(9)
Z_LR = tl.constexpr(10)
Z_LMIN = tl.constexpr(11)  # min_S ℓ (SNR shift)
Z_BEST_A = tl.constexpr(12)
Z_BEST_V = tl.constexpr(13)
Z_NP = tl.constexpr(14)
Z_NT = tl.constexpr(15)
Z_LSE_S = tl.constexpr(16)  # after the draw: lse(s') at the final α, KLs
Z_KL_P = tl.constexpr(17)
Z_KL_T = tl.constexpr(18)
Z_LMAX = tl.constexpr(19)  # max_S ℓ (the draw's step test)
Z_W = tl.constexpr(20)

# row modes
NEWTON = tl.constexpr(0.0)
FIXED = tl.constexpr(1.0)
SNR = tl.constexpr(2.0)
INVALID = tl.constexpr(3.0)
FP32_TOL = tl.constexpr(1e-3)  # |g| below which an fp32 evaluation does not move the Newton bracket
IDENTICAL_SPREAD = tl.constexpr(1e-5)  # max − min of d on S below which equal supports count as identical
STEP_REACH = tl.constexpr(1e-2)  # the draw's last step δ only where |δ|·(max ℓ − min ℓ) ≤ this (``_final``)
FLAT = tl.constexpr(1e-12)  # E_S(0) − E_S(1) below this: E_S is constant at fp64 resolution
# methods (runtime argument)
METHOD_KL = tl.constexpr(0)
METHOD_SNR = tl.constexpr(1)
METHOD_FIXED = tl.constexpr(2)


# ----------------------------------------------------------------------------- tiles and lanes

@triton.jit
def _load_row(row_ptr, offs, V, s_v, ACC: tl.constexpr, CONTIG: tl.constexpr):
    """Raw logits of one tile in ACC; lanes past V read −∞ (outside every support). CONTIG: unit
    element stride and V a multiple of 16 (``_hint``), so the loads vectorise."""
    if CONTIG:
        ptrs = row_ptr + offs
    else:
        ptrs = row_ptr + offs.to(tl.int64) * s_v
    return tl.load(ptrs, mask=offs < V, other=float("-inf")).to(ACC)


@triton.jit
def _load_pair(pol_row, tgt_row, offs, V, s_pv, s_tv, ACC: tl.constexpr, CONTIG: tl.constexpr):
    """Raw policy and target logits of one tile (``_load_row``)."""
    return _load_row(pol_row, offs, V, s_pv, ACC, CONTIG), _load_row(tgt_row, offs, V, s_tv, ACC, CONTIG)


@triton.jit
def _hint(x, CONTIG: tl.constexpr):
    """x, a multiple of 16 under CONTIG (V, row strides, segment length), written so that the
    compiler sees it (tl.multiple_of does not survive on scalars): the vector loads."""
    if CONTIG:
        return (x // 16) * 16
    else:
        return x


@triton.jit
def _inv_temp(hi, lo, ACC: tl.constexpr):
    """1/T in ACC: hi = fp32(1/T), lo = the fp32 residual (kernel float arguments are fp32)."""
    if ACC == tl.float64:
        return tl.cast(hi, tl.float64) + lo
    else:
        return hi


@triton.jit
def _online(m, x):
    """Lane-wise online max: the new max m' and the factors e^{m−m'}, e^{x−m'} (0 for −∞), with one
    exponential: one of the two factors is 1, the other e^{−|x − m|}."""
    m_new = tl.maximum(m, x)
    up = x > m
    # the smaller minus the larger, −∞ when both are −∞ (no −∞ − (−∞) is ever computed)
    e = tl.exp(tl.where(up, m, x) - tl.where(m_new == float("-inf"), 0.0, tl.where(up, x, m)))
    return m_new, tl.where(up, e, 1.0), tl.where(up, 1.0, e)


@triton.jit
def _lanes_to_row(m):
    """Max over lanes and each lane's factor e^{m − max} (0 for empty lanes)."""
    mx = tl.max(m, 0)
    return mx, tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx))


@triton.jit
def _gap(a, b, both):
    """d = b − a on S (``both``), 0 off S: no −∞ − (−∞) on a discarded lane."""
    return tl.where(both, b, 0.0) - tl.where(both, a, 0.0)


@triton.jit
def _q_logits(a, b, alpha, beta, at_one, at_zero):
    """s = α·a + (1−α)·b on S, −∞ off S; s = a at α = 1 and s = b at α = 0 (whole supports)."""
    both = (a > float("-inf")) & (b > float("-inf"))
    s = tl.where(both, alpha * tl.where(both, a, 0.0) + beta * tl.where(both, b, 0.0), float("-inf"))
    return tl.where(at_one, a, tl.where(at_zero, b, s)), both


# ----------------------------------------------------------------------------- record merges
# A row's records are merged in a fixed order, BLOCK_C records per vector step: sums of e^{x − m_j}
# are rescaled to the row max of their group (e^{m_j − max}), counts are summed, maxima maxed.

@triton.jit
def _merge_stats(base, nseg, BLOCK_C: tl.constexpr):
    """The pass-0 records of one row: max and rescaled sums of a, b and the reference, the S sums
    behind E_S(0) and E_S(1), min/max of d, and the counts. (BLOCK_C × 32 fp64 tiles: the caller
    passes a small BLOCK_C, the first launch's registers are set by this merge.)"""
    j = tl.arange(0, BLOCK_C)
    k = tl.arange(0, 32)
    cols = k < ST_W
    is_max = (k == ST_MA) | (k == ST_MB) | (k == ST_MR) | (k == ST_NDMIN) | (k == ST_DMAX)
    grp_a = (k == ST_SA) | (k == ST_UA) | (k == ST_UDA)
    grp_b = (k == ST_SB) | (k == ST_UB) | (k == ST_UDB)
    acc = tl.full([BLOCK_C, 32], float("-inf"), tl.float64)
    for j0 in range(0, nseg, BLOCK_C):
        jj = j0 + j
        acc = tl.maximum(acc, tl.load(base + jj[:, None] * ST_W + k[None, :],
                                      mask=(jj < nseg)[:, None] & (cols & is_max)[None, :], other=float("-inf")))
    mx = tl.max(acc, 0)
    m_a = tl.sum(tl.where(k == ST_MA, mx, 0.0), 0)
    m_b = tl.sum(tl.where(k == ST_MB, mx, 0.0), 0)
    m_r = tl.sum(tl.where(k == ST_MR, mx, 0.0), 0)
    sh_a = tl.where(m_a == float("-inf"), 0.0, m_a)
    sh_b = tl.where(m_b == float("-inf"), 0.0, m_b)
    sh_r = tl.where(m_r == float("-inf"), 0.0, m_r)
    acc = tl.zeros([BLOCK_C, 32], tl.float64)
    for j0 in range(0, nseg, BLOCK_C):
        jj = j0 + j
        rows = jj < nseg
        rec = base + jj * ST_W
        fa = tl.exp(tl.load(rec + ST_MA, mask=rows, other=float("-inf")) - sh_a)
        fb = tl.exp(tl.load(rec + ST_MB, mask=rows, other=float("-inf")) - sh_b)
        fr = tl.exp(tl.load(rec + ST_MR, mask=rows, other=float("-inf")) - sh_r)
        f = tl.where(grp_a[None, :], fa[:, None], tl.where(grp_b[None, :], fb[:, None],
                                                            tl.where((k == ST_SR)[None, :], fr[:, None], 1.0)))
        x = tl.load(rec[:, None] + k[None, :], mask=rows[:, None] & (cols & ~is_max)[None, :], other=0.0)
        acc += x * f
    tot = tl.sum(acc, 0)
    return (m_a, tl.sum(tl.where(k == ST_SA, tot, 0.0), 0), tl.sum(tl.where(k == ST_UA, tot, 0.0), 0),
            tl.sum(tl.where(k == ST_UDA, tot, 0.0), 0),
            m_b, tl.sum(tl.where(k == ST_SB, tot, 0.0), 0), tl.sum(tl.where(k == ST_UB, tot, 0.0), 0),
            tl.sum(tl.where(k == ST_UDB, tot, 0.0), 0),
            m_r, tl.sum(tl.where(k == ST_SR, tot, 0.0), 0),
            -tl.sum(tl.where(k == ST_NDMIN, mx, 0.0), 0), tl.sum(tl.where(k == ST_DMAX, mx, 0.0), 0),
            tl.sum(tl.where(k == ST_NS, tot, 0.0), 0), tl.sum(tl.where(k == ST_NP, tot, 0.0), 0),
            tl.sum(tl.where(k == ST_NT, tot, 0.0), 0), tl.sum(tl.where(k == ST_NR, tot, 0.0), 0),
            tl.sum(tl.where(k == ST_BAD, tot, 0.0), 0))


@triton.jit
def _merge_moments(base, nseg, W: tl.constexpr, BLOCK_C: tl.constexpr):
    """(max s, Σw, Σwℓ⁺, Σwℓ⁻, Σwℓ⁺², Σwℓ⁻²) of a row from its moments records."""
    j = tl.arange(0, BLOCK_C)
    k = tl.arange(0, 8)
    acc_m = tl.full([BLOCK_C], float("-inf"), tl.float64)
    for j0 in range(0, nseg, BLOCK_C):
        jj = j0 + j
        acc_m = tl.maximum(acc_m, tl.load(base + jj * W + MO_M, mask=jj < nseg, other=float("-inf")))
    mx = tl.max(acc_m, 0)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    acc = tl.zeros([BLOCK_C, 8], tl.float64)
    for j0 in range(0, nseg, BLOCK_C):
        jj = j0 + j
        rows = jj < nseg
        f = tl.exp(tl.load(base + jj * W + MO_M, mask=rows, other=float("-inf")) - shift)
        x = tl.load(base + jj[:, None] * W + k[None, :], mask=rows[:, None] & ((k > MO_M) & (k < MO_W))[None, :],
                    other=0.0)
        acc += x * f[:, None]
    tot = tl.sum(acc, 0)
    return (mx, tl.sum(tl.where(k == MO_S0, tot, 0.0), 0), tl.sum(tl.where(k == MO_P, tot, 0.0), 0),
            tl.sum(tl.where(k == MO_N, tot, 0.0), 0), tl.sum(tl.where(k == MO_P2, tot, 0.0), 0),
            tl.sum(tl.where(k == MO_N2, tot, 0.0), 0))


@triton.jit
def _merge_snr(base, nseg, active, W: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    """(T1, T2, T3) G-vectors of a row: plain sums of its SNR records (slots k·G + i); zeros for a row
    that is not ``active`` (its records are moments, or unwritten: no arithmetic on them)."""
    j = tl.arange(0, BLOCK_C)
    k = tl.arange(0, 4)
    i = tl.arange(0, G)
    acc = tl.zeros([BLOCK_C, 4, G], tl.float64)
    for j0 in range(0, nseg, BLOCK_C):
        jj = j0 + j
        rec = tl.load(base + jj[:, None, None] * W + k[None, :, None] * G + i[None, None, :],
                      mask=(jj < nseg)[:, None, None] & (k < 3)[None, :, None], other=0.0)
        acc += tl.where(active, rec, 0.0)
    tot = tl.sum(acc, 0)
    return (tl.sum(tl.where(k[:, None] == 0, tot, 0.0), 0), tl.sum(tl.where(k[:, None] == 1, tot, 0.0), 0),
            tl.sum(tl.where(k[:, None] == 2, tot, 0.0), 0))


# ----------------------------------------------------------------------------- row state

@triton.jit
def _load_state(ptr):
    return (tl.load(ptr + Z_ALPHA), tl.load(ptr + Z_LO), tl.load(ptr + Z_HI), tl.load(ptr + Z_MODE),
            tl.load(ptr + Z_BOUND), tl.load(ptr + Z_ZA), tl.load(ptr + Z_ZB), tl.load(ptr + Z_ZR),
            tl.load(ptr + Z_LA), tl.load(ptr + Z_LB), tl.load(ptr + Z_LR), tl.load(ptr + Z_LMIN), tl.load(ptr + Z_LMAX),
            tl.load(ptr + Z_BEST_A), tl.load(ptr + Z_BEST_V), tl.load(ptr + Z_NP), tl.load(ptr + Z_NT))


@triton.jit
def _store_state(ptr, alpha, lo, hi, mode, bound, za, zb, zr, la, lb, lr, lmin, lmax, best_a, best_v, n_p, n_t):
    tl.store(ptr + Z_ALPHA, alpha)
    tl.store(ptr + Z_LO, lo)
    tl.store(ptr + Z_HI, hi)
    tl.store(ptr + Z_MODE, mode)
    tl.store(ptr + Z_BOUND, bound)
    tl.store(ptr + Z_ZA, za)
    tl.store(ptr + Z_ZB, zb)
    tl.store(ptr + Z_ZR, zr)
    tl.store(ptr + Z_LA, la)
    tl.store(ptr + Z_LB, lb)
    tl.store(ptr + Z_LR, lr)
    tl.store(ptr + Z_LMIN, lmin)
    tl.store(ptr + Z_LMAX, lmax)
    tl.store(ptr + Z_BEST_A, best_a)
    tl.store(ptr + Z_BEST_V, best_v)
    tl.store(ptr + Z_NP, n_p)
    tl.store(ptr + Z_NT, n_t)


@triton.jit
def _init_state(base, nseg, method, fixed_alpha, inv_t, HAS_REF: tl.constexpr, G: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Row constants and the first α from the pass-0 records.

    Newton rows start at the secant root of E_S between the ends, E_S(0) > 0 > E_S(1), with the
    bracket [0, 1]. No interior root: E_S(1) ≥ 0 → α = 1, E_S(0) ≤ 0 → α = 0 (at the bound). E_S
    flat (ℓ constant on S, or E_S(0) − E_S(1), the Jeffreys divergence on S, ≤ FLAT, e.g. two
    near-certain rows) → the sign of E_S decides (0.5 within ±FLAT); disjoint supports → α = 1;
    equal supports and d = b − a constant up to IDENTICAL_SPREAD, or E_S flat and ≈ 0 (identical
    distributions up to rounding; the root is then 1/2 + O(spread)) → α = 0.5. SNR rows (equal
    supports, not identical) start the grid search; other rows of an SNR call run Newton.
    inv_t: 1/T in fp64.
    Rows with NaN/+∞ entries, or with no finite logit, are INVALID (α = NaN).
    """
    (m_a, s_a, u_a, ud_a, m_b, s_b, u_b, ud_b, m_r, s_r, d_min, d_max,
     n_s, n_p, n_t, n_r, bad) = _merge_stats(base, nseg, BLOCK_C)
    la = tl.log(s_a)
    lb = tl.log(s_b)
    zero = n_s * 0.0  # counts are finite
    invalid = (bad > 0.0) | (s_a == 0.0) | (s_b == 0.0)
    lr = zero
    if HAS_REF:
        lr = tl.log(s_r)
        invalid = invalid | (s_r == 0.0)
    c = (m_b + lb) - (m_a + la)  # B − A
    # E_S(1) = E_{π_θ|S}[ℓ], E_S(0) = E_{π_t|S}[ℓ]; NaN for an empty S (disjoint supports), without 0/0
    e1 = tl.where(u_a > 0.0, ud_a / tl.where(u_a > 0.0, u_a, 1.0), float("nan")) - c
    e0 = tl.where(u_b > 0.0, ud_b / tl.where(u_b > 0.0, u_b, 1.0), float("nan")) - c
    lower = e0 <= 0.0
    upper = e1 >= 0.0
    alpha = tl.where(upper, 1.0, tl.where(lower, 0.0, e0 / tl.where(e0 == e1, 1.0, e0 - e1)))  # e0 = e1: flat
    bound = tl.where(lower | upper, 1.0, 0.0)
    const = d_min == d_max
    flat = const | (e0 - e1 <= FLAT)
    e_flat = tl.where(const, d_min - c, 0.5 * (e0 + e1))
    alpha = tl.where(flat, tl.where(e_flat > FLAT, 1.0, tl.where(e_flat < -FLAT, 0.0, 0.5)), alpha)
    bound = tl.where(flat, tl.where(tl.abs(e_flat) > FLAT, 1.0, 0.0), bound)
    alpha = tl.where(n_s == 0.0, 1.0, alpha)
    bound = tl.where(n_s == 0.0, 1.0, bound)
    identical = ((d_max - d_min <= IDENTICAL_SPREAD) | (flat & (tl.abs(e_flat) <= FLAT))) & (n_p + n_t == 0.0)
    alpha = tl.where(identical, 0.5, alpha)
    bound = tl.where(identical, 0.0, bound)
    mode = tl.where((bound > 0.0) | identical | flat, FIXED, NEWTON)
    mode = tl.where(n_s == 0.0, FIXED, mode)
    snr = (method == METHOD_SNR) & (n_p + n_t + n_r == 0.0) & ~identical
    mode = tl.where(snr, SNR, mode)
    lo = zero
    hi = tl.where(snr, 2.0 / (2 * G - 1), zero + 1.0)
    fixed = method == METHOD_FIXED
    alpha = tl.where(fixed, zero + fixed_alpha, alpha)
    bound = tl.where(fixed, 0.0, bound)
    mode = tl.where(fixed, FIXED, mode)
    # a fixed α ∈ (0, 1) on disjoint supports has no q_α
    invalid = invalid | (fixed & (n_s == 0.0) & (alpha > 0.0) & (alpha < 1.0))
    alpha = tl.where(invalid, float("nan"), alpha)
    bound = tl.where(invalid, 0.0, bound)
    mode = tl.where(invalid, INVALID, mode)
    # raw maxima: max(z·inv_t) = max(z)·inv_t up to rounding (the shift needs no more)
    return (alpha, lo, hi, mode, bound, m_a / inv_t, m_b / inv_t, m_r / inv_t, la, lb, lr, d_min - c, d_max - c,
            zero, zero - 1.0, n_p, n_t)


@triton.jit
def _newton_step(alpha, lo, hi, p, n, p2, n2, tol):
    """Safeguarded Newton on g(α) = log Σqℓ⁺ − log Σqℓ⁻ (g = 0 ⇔ E_q[ℓ] = 0, decreasing).

    g' = −(Σqℓ⁺²/Σqℓ⁺ + Σqℓ⁻²/Σqℓ⁻), so g is exactly linear in α for two-token rows and far less
    curved than E itself. The bracket keeps g(lo) > 0 > g(hi); it only moves where |g| > tol, the
    rounding level of the evaluation (an fp32 pass must not shut the fp64 polish out of the root).
    A step that leaves the bracket (or is not finite) is a bisection; a step below the resolution
    of α stays at α.
    """
    ok = (p > 0.0) & (n > 0.0)  # else g = ±∞ (or 0 at p = n = 0) and a bisection, no log 0 or 0/0
    ps = tl.where(ok, p, 1.0)
    ns = tl.where(ok, n, 1.0)
    g = tl.where(ok, tl.log(ps) - tl.log(ns), tl.where(p > n, float("inf"), tl.where(p < n, float("-inf"), 0.0)))
    g = tl.where((p != p) | (n != n), float("nan"), g)
    lo = tl.where(g > tol, alpha, lo)
    hi = tl.where(g < -tol, alpha, hi)
    den = p2 / ps + n2 / ns
    new = tl.where(ok & (den > 0.0), alpha + tl.where(ok, g, 0.0) / tl.where(den > 0.0, den, 1.0), float("nan"))
    new = tl.where((new >= lo) & (new <= hi), new, 0.5 * (lo + hi))
    return tl.where(p == n, alpha, new), lo, hi


@triton.jit
def _snr_grid(lo, h, G: tl.constexpr):
    """The G points of one SNR search pass."""
    return tl.minimum(lo + tl.arange(0, G) * h, 1.0)


@triton.jit
def _snr_step(base, nseg, active, lo, h, best_a, best_v, STAGE: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """SNR_i = |Φ1|/√Φ2 at the last pass's points α_i = lo + i·h; keep the best point so far. The
    first two passes cover the 2G-point grid k/(2G−1) (even k, then odd k: STAGE 1 moves to the odd
    points), so a secondary maximum is not taken for the global one on a coarse grid alone; then
    every pass searches G interior points of [best − δ, best + δ], δ the distance between
    neighbouring points so far (h/2 after the coarse grid, STAGE 2), shrinking by (G + 1)/2."""
    i = tl.arange(0, G)
    t1, t2, t3 = _merge_snr(base, nseg, active, W, G, BLOCK_C)
    var = t3 - t2 * t2
    snr = tl.where(var > 0.0, tl.abs(t1) / tl.sqrt(tl.where(var > 0.0, var, 1.0)), 0.0)
    v_max = tl.max(snr, 0)
    i_max = tl.min(tl.where(snr == v_max, i, G), 0)
    a_max = tl.sum(tl.where(i == i_max, _snr_grid(lo, h, G), 0.0), 0)
    better = v_max > best_v
    best_a = tl.where(better, a_max, best_a)
    best_v = tl.where(better, v_max, best_v)
    if STAGE == 1:
        return 0.5 * h, h, best_a, best_v
    else:
        delta = 0.5 * h if STAGE == 2 else h
        new_lo = tl.maximum(best_a - delta, 0.0)
        step = (tl.minimum(best_a + delta, 1.0) - new_lo) / (G + 1)
        return new_lo + step, step, best_a, best_v


@triton.jit
def _advance(base, nseg, alpha, lo, hi, mode, bound, best_a, best_v,
             SNR_UPDATE: tl.constexpr, END_SNR: tl.constexpr, PREV_FP64: tl.constexpr, W: tl.constexpr,
             G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Update a row from the previous launch's records: a Newton step (NEWTON rows), a grid step
    (SNR rows after an SNR pass, SNR_UPDATE > 0 the stage of _snr_step; END_SNR fixes α at the best
    point); FIXED rows keep α.
    Also returns the merged moments (used by the draw's last step)."""
    mx, s0, p, n, p2, n2 = _merge_moments(base, nseg, W, BLOCK_C)
    newton = mode == NEWTON  # other rows' records are not moments (SNR terms, or unwritten): read as 0
    new, new_lo, new_hi = _newton_step(alpha, lo, hi, tl.where(newton, p, 0.0), tl.where(newton, n, 0.0),
                                       tl.where(newton, p2, 0.0), tl.where(newton, n2, 0.0),
                                       0.0 if PREV_FP64 else FP32_TOL)
    alpha_n = tl.where(newton, new, alpha)
    lo_n = tl.where(newton, new_lo, lo)
    hi_n = tl.where(newton, new_hi, hi)
    if SNR_UPDATE > 0:
        snr = mode == SNR
        g_lo, g_h, g_best_a, g_best_v = _snr_step(base, nseg, snr, lo, hi, best_a, best_v, SNR_UPDATE, W, G,
                                                  BLOCK_C)
        lo_n = tl.where(snr, g_lo, lo_n)
        hi_n = tl.where(snr, g_h, hi_n)
        best_a = tl.where(snr, g_best_a, best_a)
        best_v = tl.where(snr, g_best_v, best_v)
        if END_SNR:
            alpha_n = tl.where(snr, best_a, alpha_n)
            bound = tl.where(snr, tl.where((best_a == 0.0) | (best_a == 1.0), 1.0, 0.0), bound)
            mode = tl.where(snr, FIXED, mode)
    return alpha_n, lo_n, hi_n, mode, bound, best_a, best_v, mx, s0, p, n, p2, n2


# ----------------------------------------------------------------------------- streaming evaluations

@triton.jit
def _moments_segment(pol_row, tgt_row, e0, e1, V, s_pv, s_tv, inv_t, za, zb, la, lb, alpha,
                     ACC: tl.constexpr, BLOCK: tl.constexpr, CONTIG: tl.constexpr):
    """(max s', Σw, Σwℓ⁺, Σwℓ⁻, Σwℓ⁺², Σwℓ⁻²), w = e^{s' − max}, over elements e0 … e1−1 of a row,
    s' = α·a' + (1−α)·b'. ℓ is taken on S only (q's mass off S, possible at α ∈ {0, 1}, is
    accounted for by the support counts)."""
    lanes = tl.arange(0, BLOCK)
    at_one = alpha == 1.0
    at_zero = alpha == 0.0
    al = alpha.to(ACC)
    be = (1.0 - alpha).to(ACC)
    c = (lb - la).to(ACC)
    za = za.to(ACC)
    zb = zb.to(ACC)
    m = tl.full([BLOCK], float("-inf"), ACC)
    s0 = tl.zeros([BLOCK], ACC)
    sp = tl.zeros([BLOCK], ACC)
    sn = tl.zeros([BLOCK], ACC)
    sp2 = tl.zeros([BLOCK], ACC)
    sn2 = tl.zeros([BLOCK], ACC)
    for t0 in range(e0, e1, BLOCK):
        offs = t0 + lanes
        a, b = _load_pair(pol_row, tgt_row, offs, V, s_pv, s_tv, ACC, CONTIG)
        a = (a - za) * inv_t
        b = (b - zb) * inv_t
        s, both = _q_logits(a, b, al, be, at_one, at_zero)
        ell = tl.where(both, _gap(a, b, both) - c, 0.0)
        lp = tl.maximum(ell, 0.0)
        ln = tl.maximum(-ell, 0.0)
        m, r, w = _online(m, s)
        s0 = s0 * r + w
        sp = sp * r + w * lp
        sn = sn * r + w * ln
        sp2 = sp2 * r + w * lp * lp
        sn2 = sn2 * r + w * ln * ln
    mx, f = _lanes_to_row(m)
    return (mx.to(tl.float64), tl.sum(s0 * f, 0).to(tl.float64), tl.sum(sp * f, 0).to(tl.float64),
            tl.sum(sn * f, 0).to(tl.float64), tl.sum(sp2 * f, 0).to(tl.float64),
            tl.sum(sn2 * f, 0).to(tl.float64))


@triton.jit
def _snr_segment(pol_row, tgt_row, ref_row, e0, e1, V, s_pv, s_tv, s_rv, inv_t, za, zb, zr, la, lb, lr,
                 lmin, alphas, HAS_REF: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr, CONTIG: tl.constexpr):
    """SNR terms at G points α_i (fp64), with w = π_θ/q_α = Z·e^{−(1−α)ℓ} and r = log π_t/π_ref:
    T1 = Σ(π_t − π_θ)·u·r, T2 = Σπ_θ·u·r, T3 = Σπ_θ·u²·r², u = e^{−(1−α)(ℓ − min ℓ)} ≤ 1.
    SNR = |T1|/√(T3 − T2²) = |Φ1|/√Φ2 (Z and the shift cancel). Rows here have equal supports."""
    lanes = tl.arange(0, BLOCK)
    beta = (1.0 - alphas)[None, :]
    c = lb - la
    t1 = tl.zeros([BLOCK, G], tl.float64)
    t2 = tl.zeros([BLOCK, G], tl.float64)
    t3 = tl.zeros([BLOCK, G], tl.float64)
    for t0 in range(e0, e1, BLOCK):
        offs = t0 + lanes
        a, b = _load_pair(pol_row, tgt_row, offs, V, s_pv, s_tv, tl.float64, CONTIG)
        a = (a - za) * inv_t
        b = (b - zb) * inv_t
        both = (a > float("-inf")) & (b > float("-inf"))
        ell = tl.where(both, _gap(a, b, both) - c, 0.0)
        p_th = tl.where(both, tl.exp(a - la), 0.0)
        p_t = tl.where(both, tl.exp(b - lb), 0.0)
        if HAS_REF:
            rl = _load_row(ref_row, offs, V, s_rv, tl.float64, CONTIG)
            r = tl.where(both, (b - lb) - ((rl - zr) * inv_t - lr), 0.0)
        else:
            r = ell
        u = tl.exp(-beta * tl.where(both, ell - lmin, 0.0)[:, None])
        ur = u * r[:, None]
        t1 += (p_t - p_th)[:, None] * ur
        t2 += p_th[:, None] * ur
        t3 += p_th[:, None] * ur * ur
    return tl.sum(t1, 0), tl.sum(t2, 0), tl.sum(t3, 0)


@triton.jit
def _store_moments(ptr, mx, s0, p, n, p2, n2):
    tl.store(ptr + MO_M, mx)
    tl.store(ptr + MO_S0, s0)
    tl.store(ptr + MO_P, p)
    tl.store(ptr + MO_N, n)
    tl.store(ptr + MO_P2, p2)
    tl.store(ptr + MO_N2, n2)


@triton.jit
def _segment(pid, nseg, seg, V, CONTIG: tl.constexpr):
    """(row, segment index, first element, end element) of program ``pid``."""
    row = pid // nseg
    j = pid - row * nseg
    e0 = j * _hint(seg, CONTIG)
    return row.to(tl.int64), j, e0, tl.minimum(e0 + seg, V)


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["V", "nseg", "seg", "s_pr", "s_pv", "s_tr", "s_tv", "s_rr", "s_rv"])
def sampling_stats_kernel(pol_ptr, tgt_ptr, ref_ptr, stats_ptr, V, nseg, seg,
                          s_pr, s_pv, s_tr, s_tv, s_rr, s_rv, inv_temp, inv_temp_lo,
                          HAS_REF: tl.constexpr, BLOCK: tl.constexpr, CONTIG: tl.constexpr):
    """Pass 0 (fp64) over one segment: online lse of a and b (and the reference), the S-restricted
    sums that give E_S(1) = E_{π_θ|S}[ℓ] and E_S(0) = E_{π_t|S}[ℓ], min/max of d on S, support
    counts and the number of NaN/+∞ entries."""
    pid = tl.program_id(0)
    row, j, e0, e1 = _segment(pid, nseg, seg, V, CONTIG)
    V = _hint(V, CONTIG)
    pol_row = pol_ptr + _hint(row * s_pr, CONTIG)
    tgt_row = tgt_ptr + _hint(row * s_tr, CONTIG)
    ref_row = ref_ptr + _hint(row * s_rr, CONTIG)
    inv_t = _inv_temp(inv_temp, inv_temp_lo, tl.float64)
    lanes = tl.arange(0, BLOCK)
    ninf = tl.full([BLOCK], float("-inf"), tl.float64)
    zero = tl.zeros([BLOCK], tl.float64)
    m_a, s_a, u_a, ud_a = ninf, zero, zero, zero
    m_b, s_b, u_b, ud_b = ninf, zero, zero, zero
    m_r, s_r = ninf, zero
    nd_min, d_max = ninf, ninf
    n_s, n_p, n_t, n_r, bad = zero, zero, zero, zero, zero
    for t0 in range(e0, e1, BLOCK):
        offs = t0 + lanes
        a, b = _load_pair(pol_row, tgt_row, offs, V, s_pv, s_tv, tl.float64, CONTIG)
        bad += ((a != a) | (a == float("inf")) | (b != b) | (b == float("inf"))).to(tl.float64)
        a = a * inv_t
        b = b * inv_t
        fa = a > float("-inf")
        fb = b > float("-inf")
        both = fa & fb
        d = _gap(a, b, both)
        m_a, r, w = _online(m_a, a)
        s_a = s_a * r + w
        u_a = u_a * r + tl.where(both, w, 0.0)
        ud_a = ud_a * r + tl.where(both, w * d, 0.0)
        m_b, r, w = _online(m_b, b)
        s_b = s_b * r + w
        u_b = u_b * r + tl.where(both, w, 0.0)
        ud_b = ud_b * r + tl.where(both, w * d, 0.0)
        nd_min = tl.maximum(nd_min, tl.where(both, -d, float("-inf")))
        d_max = tl.maximum(d_max, tl.where(both, d, float("-inf")))
        n_s += both.to(tl.float64)
        n_p += (fa & ~fb).to(tl.float64)
        n_t += (fb & ~fa).to(tl.float64)
        if HAS_REF:
            rl = _load_row(ref_row, offs, V, s_rv, tl.float64, CONTIG)
            bad += ((rl != rl) | (rl == float("inf"))).to(tl.float64)
            m_r, r, w = _online(m_r, rl * inv_t)
            s_r = s_r * r + w
            n_r += (both & (rl == float("-inf"))).to(tl.float64)
    out = stats_ptr + pid.to(tl.int64) * ST_W
    mx, f = _lanes_to_row(m_a)
    tl.store(out + ST_MA, mx)
    tl.store(out + ST_SA, tl.sum(s_a * f, 0))
    tl.store(out + ST_UA, tl.sum(u_a * f, 0))
    tl.store(out + ST_UDA, tl.sum(ud_a * f, 0))
    mx, f = _lanes_to_row(m_b)
    tl.store(out + ST_MB, mx)
    tl.store(out + ST_SB, tl.sum(s_b * f, 0))
    tl.store(out + ST_UB, tl.sum(u_b * f, 0))
    tl.store(out + ST_UDB, tl.sum(ud_b * f, 0))
    mx, f = _lanes_to_row(m_r)
    tl.store(out + ST_MR, mx)
    tl.store(out + ST_SR, tl.sum(s_r * f, 0))
    tl.store(out + ST_NDMIN, tl.max(nd_min, 0))
    tl.store(out + ST_DMAX, tl.max(d_max, 0))
    tl.store(out + ST_NS, tl.sum(n_s, 0))
    tl.store(out + ST_NP, tl.sum(n_p, 0))
    tl.store(out + ST_NT, tl.sum(n_t, 0))
    tl.store(out + ST_NR, tl.sum(n_r, 0))
    tl.store(out + ST_BAD, tl.sum(bad, 0))


@triton.jit(do_not_specialize=["V", "nseg", "seg", "s_pr", "s_pv", "s_tr", "s_tv", "s_rr", "s_rv",
                               "method"])
def sampling_alpha_kernel(pol_ptr, tgt_ptr, ref_ptr, stats_ptr, prev_ptr, rec_ptr, state_in_ptr,
                          state_out_ptr, V, nseg, seg, s_pr, s_pv, s_tr, s_tv, s_rr, s_rv, inv_temp,
                          inv_temp_lo, method, fixed_alpha,
                          FIRST: tl.constexpr, SNR_UPDATE: tl.constexpr, PREV_FP64: tl.constexpr,
                          EVAL_SNR: tl.constexpr, HAS_REF: tl.constexpr, ACC: tl.constexpr, REC_W: tl.constexpr,
                          G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CONTIG: tl.constexpr):
    """One search pass: update the row's α from the previous records (FIRST: initialise from the
    pass-0 records), then evaluate at the new α over this program's segment — the Newton moments
    in ACC, or (EVAL_SNR, SNR rows) the SNR terms at G points in fp64."""
    pid = tl.program_id(0)
    row, j, e0, e1 = _segment(pid, nseg, seg, V, CONTIG)
    V = _hint(V, CONTIG)
    if FIRST:
        (alpha, lo, hi, mode, bound, za, zb, zr, la, lb, lr, lmin, lmax, best_a, best_v, n_p, n_t) = _init_state(
            stats_ptr + row * nseg * ST_W, nseg, method, fixed_alpha,
            _inv_temp(inv_temp, inv_temp_lo, tl.float64), HAS_REF, G, STATS_MERGE_BLOCK)
    else:
        (alpha, lo, hi, mode, bound, za, zb, zr, la, lb, lr, lmin, lmax, best_a, best_v, n_p, n_t) = _load_state(
            state_in_ptr + row * Z_W)
        alpha, lo, hi, mode, bound, best_a, best_v, mx, s0, p, n, p2, n2 = _advance(
            prev_ptr + row * nseg * REC_W, nseg, alpha, lo, hi, mode, bound, best_a, best_v,
            SNR_UPDATE, not EVAL_SNR, PREV_FP64, REC_W, G, BLOCK_C)
    if j == 0:
        _store_state(state_out_ptr + row * Z_W, alpha, lo, hi, mode, bound, za, zb, zr, la, lb, lr, lmin, lmax,
                     best_a, best_v, n_p, n_t)
    pol_row = pol_ptr + _hint(row * s_pr, CONTIG)
    tgt_row = tgt_ptr + _hint(row * s_tr, CONTIG)
    out = rec_ptr + pid.to(tl.int64) * REC_W
    if EVAL_SNR:
        if mode == SNR:
            i = tl.arange(0, G)
            t1, t2, t3 = _snr_segment(pol_row, tgt_row, ref_ptr + _hint(row * s_rr, CONTIG), e0, e1, V, s_pv, s_tv,
                                      s_rv, _inv_temp(inv_temp, inv_temp_lo, tl.float64), za, zb, zr, la, lb, lr,
                                      lmin, _snr_grid(lo, hi, G), HAS_REF, BLOCK // G, G, CONTIG)
            tl.store(out + i, t1)
            tl.store(out + G + i, t2)
            tl.store(out + 2 * G + i, t3)
        else:
            mx, s0, p, n, p2, n2 = _moments_segment(pol_row, tgt_row, e0, e1, V, s_pv, s_tv,
                                                    _inv_temp(inv_temp, inv_temp_lo, ACC), za, zb, la, lb,
                                                    alpha, ACC, BLOCK, CONTIG)
            _store_moments(out, mx, s0, p, n, p2, n2)
    else:
        mx, s0, p, n, p2, n2 = _moments_segment(pol_row, tgt_row, e0, e1, V, s_pv, s_tv,
                                                _inv_temp(inv_temp, inv_temp_lo, ACC), za, zb, la, lb,
                                                alpha, ACC, BLOCK, CONTIG)
        _store_moments(out, mx, s0, p, n, p2, n2)


@triton.jit
def _final(alpha_k, alpha_n, span, mode, la, lb, n_p, n_t, mx, s0, p, n, p2, n2):
    """The final α, lse(s'), KL(q‖π_θ), KL(q‖π_t) from the fp64 moments at α_k (the last search
    pass) and the last Newton step α_n: log Z(α) = lse(s') − α·λ_a − (1−α)·λ_b, d log Z/dα = −E,
    dE/dα = −Var, δ = α − α_k, so log Z(α) = log Z_k − δ·E_k + δ²·Var_k/2 and E(α) = E_k − δ·Var_k.
    Remainders: |κ₃(α')| ≤ span·Var(α') and q_α'/q_α_k ≤ e^{|δ|·span} (span = max ℓ − min ℓ), so
    the step is taken only where |δ|·span ≤ STEP_REACH: then the remainder of E is below
    e^{0.01}·0.01/2 < 0.51% of the step's first-order change |δ|·Var_k, and that of log Z below
    |δ|/3 of it. Else α = α_k and everything is exact there (peaked rows, issue 17: a step that
    moved q between tokens moved log Z by thousands of nats).
    KL(q‖π_θ) = (1−α)·E − log Z, KL(q‖π_t) = −α·E − log Z; ∞ where q has mass off the other support."""
    live = s0 > 0.0  # s0 = 0 (no q_α: a fixed α on disjoint supports, an INVALID row): NaN, −∞ log, no 0/0
    s0_safe = tl.where(live, s0, 1.0)
    e_k = tl.where(live, (p - n) / s0_safe, float("nan"))
    var_k = tl.where(live, (p2 + n2) / s0_safe - e_k * e_k, float("nan"))
    log_s0 = tl.where(live, tl.log(s0_safe), tl.where(s0 == 0.0, float("-inf"), float("nan")))
    log_z_k = mx + log_s0 - alpha_k * la - (1.0 - alpha_k) * lb
    # span: −∞ on a row with no common support (nothing to extrapolate: the step is taken), +∞ or
    # NaN keeps α_k; no ∞·0 on discarded lanes
    bounded = span < float("inf")
    span = tl.where(bounded, tl.maximum(span, 0.0), 0.0)
    alpha = tl.where(bounded & (tl.abs(alpha_n - alpha_k) * span <= STEP_REACH), alpha_n, alpha_k)
    delta = alpha - alpha_k
    log_z = log_z_k - delta * e_k + 0.5 * delta * delta * var_k
    e = e_k - delta * var_k
    kl_p = tl.where(alpha == 1.0, 0.0, tl.maximum((1.0 - alpha) * e - log_z, 0.0))
    kl_t = tl.where(alpha == 0.0, 0.0, tl.maximum(-alpha * e - log_z, 0.0))
    kl_p = tl.where((alpha == 0.0) & (n_t > 0.0), float("inf"), kl_p)
    kl_t = tl.where((alpha == 1.0) & (n_p > 0.0), float("inf"), kl_t)
    invalid = mode == INVALID
    kl_p = tl.where(invalid, float("nan"), kl_p)
    kl_t = tl.where(invalid, float("nan"), kl_t)
    return alpha, log_z + alpha * la + (1.0 - alpha) * lb, kl_p, kl_t


@triton.jit
def _race(pol_row, tgt_row, logq_row, offs, u, V, s_pv, s_tv, inv_temp, za, zb, al, be, at_one, at_zero, lse32,
          invalid, best, best_i, WRITE_LOGQ: tl.constexpr, CONTIG: tl.constexpr):
    """One tile of the draw: key = log₂(U)·e^{lse(s') − s'} = −E/(q·ln 2), E = −ln U ~ Exp(1);
    the largest key is the first arrival of the exponential race, the token v with probability q_v
    (as Gumbel-max argmax s' − ln E, with one logarithm; q < 1e-38 gives e^{…} = ∞, key −∞).
    Keeps the lane's best key and its first index; writes log q = s' − lse(s') with WRITE_LOGQ."""
    a, b = _load_pair(pol_row, tgt_row, offs, V, s_pv, s_tv, tl.float32, CONTIG)
    s, both = _q_logits((a - za) * inv_temp, (b - zb) * inv_temp, al, be, at_one, at_zero)
    log_q = s - lse32
    key = tl.log2(u) * tl.exp(-log_q)
    take = key > best
    if WRITE_LOGQ:
        tl.store(logq_row + offs, tl.where(invalid, float("nan"), log_q), mask=offs < V)
    return tl.where(take, key, best), tl.where(take, offs, best_i)


@triton.jit(do_not_specialize=["V", "nseg", "seg", "s_pr", "s_pv", "s_tr", "s_tv", "s_qr"])
def sampling_draw_kernel(pol_ptr, tgt_ptr, prev_ptr, rec_ptr, state_in_ptr, state_out_ptr, seed_ptr, logq_ptr,
                         V, nseg, seg, s_pr, s_pv, s_tr, s_tv, s_qr, inv_temp,
                         WRITE_LOGQ: tl.constexpr, PREV_FP64: tl.constexpr, REC_W: tl.constexpr, G: tl.constexpr,
                         BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CONTIG: tl.constexpr):
    """The last Newton step (where ``_final`` bounds its Taylor remainder), lse(s') and the KLs at
    the final α (segment 0 stores them), then one sampling pass: argmax_v log₂(U_v)/q_v (``_race``, the Gumbel-max draw with one logarithm), the
    uniforms U from Philox(seed, counter): one counter gives the 4 uniforms of 4 neighbours.
    Records the segment's best (key, index); writes log q = s' − lse(s') (fp32) with WRITE_LOGQ."""
    pid = tl.program_id(0)
    row, j, e0, e1 = _segment(pid, nseg, seg, V, CONTIG)
    V = _hint(V, CONTIG)
    (alpha_k, lo, hi, mode, bound, za, zb, zr, la, lb, lr, lmin, lmax, best_a, best_v, n_p, n_t) = _load_state(
        state_in_ptr + row * Z_W)
    alpha, lo, hi, mode, bound, best_a, best_v, mx, s0, p, n, p2, n2 = _advance(
        prev_ptr + row * nseg * REC_W, nseg, alpha_k, lo, hi, mode, bound, best_a, best_v,
        0, False, PREV_FP64, REC_W, G, BLOCK_C)
    alpha, lse_s, kl_p, kl_t = _final(alpha_k, alpha, lmax - lmin, mode, la, lb, n_p, n_t, mx, s0, p, n, p2, n2)
    if j == 0:
        st = state_out_ptr + row * Z_W
        _store_state(st, alpha, lo, hi, mode, bound, za, zb, zr, la, lb, lr, lmin, lmax, best_a, best_v, n_p, n_t)
        tl.store(st + Z_LSE_S, lse_s)
        tl.store(st + Z_KL_P, kl_p)
        tl.store(st + Z_KL_T, kl_t)
    pol_row = pol_ptr + _hint(row * s_pr, CONTIG)
    tgt_row = tgt_ptr + _hint(row * s_tr, CONTIG)
    at_one = alpha == 1.0
    at_zero = alpha == 0.0
    al = alpha.to(tl.float32)
    be = (1.0 - alpha).to(tl.float32)
    za = za.to(tl.float32)
    zb = zb.to(tl.float32)
    lse32 = lse_s.to(tl.float32)
    invalid = mode == INVALID
    seed = tl.load(seed_ptr)
    Q: tl.constexpr = BLOCK // 4
    quad = tl.arange(0, Q)
    lanes = 4 * quad[:, None] + tl.arange(0, 4)[None, :]  # [Q, 4]: element t0 + 4i + k
    ctr_row = row * (tl.cdiv(V, BLOCK) * Q)  # Philox counters: one per 4 elements (its 4 uniforms)
    logq_row = logq_ptr + _hint(row * s_qr, CONTIG)
    best = tl.full([Q, 4], float("-inf"), tl.float32)
    best_i = tl.zeros([Q, 4], tl.int32)
    for t0 in range(e0, e1, BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, ctr_row + t0 // 4 + quad)
        u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [Q, 4])
        best, best_i = _race(pol_row, tgt_row, logq_row, t0 + lanes, u, V, s_pv, s_tv, inv_temp, za, zb, al, be,
                             at_one, at_zero, lse32, invalid, best, best_i, WRITE_LOGQ, CONTIG)
    best = tl.reshape(best, [BLOCK])
    best_i = tl.reshape(best_i, [BLOCK])
    top = tl.max(best, 0)
    out = rec_ptr + pid.to(tl.int64) * REC_W
    tl.store(out + DR_SCORE, top.to(tl.float64))
    tl.store(out + DR_IDX, tl.min(tl.where(best == top, best_i, 2147483647), 0).to(tl.float64))


@triton.jit(do_not_specialize=["N", "V", "nseg", "s_pr", "s_pv", "s_tr", "s_tv"])
def sampling_finalize_kernel(pol_ptr, tgt_ptr, rec_ptr, state_ptr, tokens_ptr, alpha_ptr, logq_ptr,
                             lp_pol_ptr, lp_tgt_ptr, kl_p_ptr, kl_t_ptr, bound_ptr,
                             N, V, nseg, s_pr, s_pv, s_tr, s_tv, inv_temp, inv_temp_lo,
                             REC_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row: the token (best score over the segments, first index on ties; −1 for an invalid
    row), log π_θ, log π_t and log q at the token (fp64 math, fp32 outputs), α, the KLs and
    alpha_at_bound from the final state."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < N
    rows64 = rows.to(tl.int64)
    jl = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float64)
    best_i = tl.zeros([BLOCK_R, BLOCK_C], tl.float64)
    for j0 in range(0, nseg, BLOCK_C):
        jj = j0 + jl
        ok = rm[:, None] & (jj < nseg)[None, :]
        base = rec_ptr + (rows64[:, None] * nseg + jj[None, :]) * REC_W
        score = tl.load(base + DR_SCORE, mask=ok, other=float("-inf"))
        idx = tl.load(base + DR_IDX, mask=ok, other=0.0)
        take = score > best
        best = tl.where(take, score, best)
        best_i = tl.where(take, idx, best_i)
    top = tl.max(best, 1)
    idx = tl.min(tl.where(best == top[:, None], best_i, 1e18), 1)
    st = state_ptr + rows64 * Z_W
    alpha = tl.load(st + Z_ALPHA, mask=rm, other=0.0)
    mode = tl.load(st + Z_MODE, mask=rm, other=0.0)
    invalid = mode == INVALID
    drawn = rm & ~invalid & (top > float("-inf"))
    tok = tl.where(drawn, idx, -1.0).to(tl.int64)
    inv_t = _inv_temp(inv_temp, inv_temp_lo, tl.float64)
    za = tl.load(pol_ptr + rows64 * s_pr + tok * s_pv, mask=drawn, other=0.0).to(tl.float64)
    zb = tl.load(tgt_ptr + rows64 * s_tr + tok * s_tv, mask=drawn, other=0.0).to(tl.float64)
    a = (za - tl.load(st + Z_ZA, mask=rm, other=0.0)) * inv_t
    b = (zb - tl.load(st + Z_ZB, mask=rm, other=0.0)) * inv_t
    mixed = alpha * tl.where(a > float("-inf"), a, 0.0) + (1.0 - alpha) * tl.where(b > float("-inf"), b, 0.0)
    s = tl.where(alpha == 1.0, a, tl.where(alpha == 0.0, b, mixed))  # α ∈ (0, 1): a drawn token is on S
    lq = s - tl.load(st + Z_LSE_S, mask=rm, other=0.0)
    lp_pol = a - tl.load(st + Z_LA, mask=rm, other=0.0)
    lp_tgt = b - tl.load(st + Z_LB, mask=rm, other=0.0)
    nan = float("nan")
    tl.store(tokens_ptr + rows, tok, mask=rm)
    tl.store(alpha_ptr + rows, alpha.to(tl.float32), mask=rm)
    tl.store(logq_ptr + rows, tl.where(drawn, lq, nan).to(tl.float32), mask=rm)
    tl.store(lp_pol_ptr + rows, tl.where(drawn, lp_pol, nan).to(tl.float32), mask=rm)
    tl.store(lp_tgt_ptr + rows, tl.where(drawn, lp_tgt, nan).to(tl.float32), mask=rm)
    tl.store(kl_p_ptr + rows, tl.load(st + Z_KL_P, mask=rm, other=0.0).to(tl.float32), mask=rm)
    tl.store(kl_t_ptr + rows, tl.load(st + Z_KL_T, mask=rm, other=0.0).to(tl.float32), mask=rm)
    tl.store(bound_ptr + rows, tl.load(st + Z_BOUND, mask=rm, other=0.0) != 0.0, mask=rm)
