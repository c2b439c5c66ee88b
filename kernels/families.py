"""Per-token gradient weight φ(w, A) and objective F of every loss family (SPEC §4).

Every family is one ``@triton.jit`` function with the same signature

    (ell, w, A, c0, c1, p0..p6, OPT) -> (phi, F, gamma_t, x0, x1, x2, x3, x4)

ell = clamped log-ratio, w = exp(ell), A = advantage. c0/c1 are the family's
context resolved by the kernel from batch or row statistics (γ values, VESPO's
sequence weight); p0..p6 are the runtime float parameters packed by the Python
family table (``isreshape_triton/families.py``); OPT is the family's structural
option. The loss is −F; dF/dlog_prob = φ. gamma_t is the token's effective IS
exponent (metrics: ω = w^gamma_t); x0..x4 are per-token terms of the family's
extra metrics. ``family_token`` dispatches on the FAMILY constexpr; adding a
family means one function here, one reference function and one table row.
"""
import triton
import triton.language as tl

from .common import expm1_over, log1p, sech2_half, tanh

IS_RESHAPE = tl.constexpr(0)
IS_RESHAPE_SIGN = tl.constexpr(1)
IS_RESHAPE_TR = tl.constexpr(2)
IS_RESHAPE_VAR = tl.constexpr(3)
PPO_CLIP = tl.constexpr(4)
SAPO = tl.constexpr(5)
VESPO = tl.constexpr(6)

# is_reshape_sign OPT = NEG_SATURATION + 4 * POS_MICHAELIS_MENTEN
SAT_NONE = tl.constexpr(0)
SAT_SOFT = tl.constexpr(1)
SAT_TRUNCATE = tl.constexpr(2)
SAT_MICHAELIS_MENTEN = tl.constexpr(3)


@triton.jit
def _mm_weight_and_integral(w, tau):
    """b = (1+τ)w/(τ+w) and ∫₁^w b(u)/u du = (1+τ)·ln((τ+w)/(τ+1))."""
    return (1.0 + tau) * w / (tau + w), (1.0 + tau) * log1p((w - 1.0) / (tau + 1.0))


@triton.jit
def is_reshape_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ (γ = c0)."""
    zero = tl.zeros_like(ell)
    g = c0 + zero
    return A * tl.exp(g * ell), A * expm1_over(ell, g), g, zero, zero, zero, zero, zero


@triton.jit
def is_reshape_sign_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """A>0: w^{γ+}·A (or Michaelis-Menten); A<0: b(w)·A; A=0: 0.  c0 = γ+, c1 = γ−.

    p3 = λ, p4 = w_th (soft), p5 = M (truncate), p6 = τ (Michaelis-Menten).
    F = A·∫₁^w φ/(A·u) du in closed form; the soft saturation is a surrogate φ·ℓ.
    """
    zero = tl.zeros_like(ell)
    g_pos = c0 + zero
    g_neg = c1 + zero
    # positive branch
    if OPT // 4 == 1:
        b_pos, f_pos = _mm_weight_and_integral(w, p6)
    else:
        b_pos = tl.exp(g_pos * ell)
        f_pos = expm1_over(ell, g_pos)
    # negative branch
    w_neg = tl.exp(g_neg * ell)
    if OPT % 4 == SAT_NONE:
        b_neg = w_neg
        f_neg = expm1_over(ell, g_neg)
    elif OPT % 4 == SAT_SOFT:
        beta = tl.sigmoid(-p3 * (w - p4))
        b_neg = beta * w_neg + (1.0 - beta) * w
        f_neg = b_neg * ell
    elif OPT % 4 == SAT_TRUNCATE:
        b_neg = tl.minimum(w_neg, p5)
        log_m = tl.log(p5)
        f_sat = (p5 - 1.0) / g_neg + p5 * (ell - log_m / g_neg)
        f_neg = tl.where(w_neg <= p5, expm1_over(ell, g_neg), f_sat)
    else:
        b_neg, f_neg = _mm_weight_and_integral(w, p6)
    pos = A > 0.0
    neg = A < 0.0
    phi = tl.where(pos, A * b_pos, tl.where(neg, A * b_neg, 0.0))
    F = tl.where(pos, A * f_pos, tl.where(neg, A * f_neg, 0.0))
    g_t = tl.where(neg, g_neg, g_pos)
    return phi, F, g_t, tl.where(pos, g_pos, 0.0), tl.where(neg, g_neg, 0.0), zero, zero, zero


@triton.jit
def is_reshape_tr_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c);
    φ = [(1−γ_t) + γ_t·w·sech²(τ_h(w−1)/2)]·A, F = A·[(1−γ_t)ℓ + γ_t·(2/τ_h)·tanh(τ_h(w−1)/2)].
    p0 = τ_h, p1 = τ_c, p2 = γ_base, p3 = γ_max."""
    zero = tl.zeros_like(ell)
    g = p2 + (p3 - p2) * tl.sigmoid(-A * ell / p1)
    x = p0 * (w - 1.0)
    phi = A * ((1.0 - g) + g * w * sech2_half(x))
    F = A * ((1.0 - g) * ell + g * (2.0 / p0) * tanh(0.5 * x))
    return phi, F, g, zero, zero, zero, zero, zero


@triton.jit
def is_reshape_var_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """Soft four-case γ*(w, A): γ_t = clip(γ_base·(p2+p3) + p4, 0, 1) with
    p_hi = σ(Tℓ), p_pos = σ(T·A); φ = w^{γ_t}·A, F = A·expm1(γ_tℓ)/γ_t.
    c0 = γ_base, p4 = T. Extras: the case probabilities p1..p4 and γ_base."""
    p_hi = tl.sigmoid(p4 * ell)
    p_lo = tl.sigmoid(-p4 * ell)
    p_pos = tl.sigmoid(p4 * A)
    p_neg = tl.sigmoid(-p4 * A)
    q1 = p_hi * p_pos
    q2 = p_hi * p_neg
    q3 = p_lo * p_pos
    q4 = p_lo * p_neg
    g = tl.minimum(tl.maximum(c0 * (q2 + q3) + q4, 0.0), 1.0)
    return A * tl.exp(g * ell), A * expm1_over(ell, g), g, q1, q2, q3, q4, c0 + tl.zeros_like(ell)


@triton.jit
def ppo_clip_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """loss = max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)); for A<0 with the dual clip
    (OPT = 1) min(that, −A·c). φ = A·w where the unclipped branch is active.
    p0 = ε_low, p1 = ε_high, p2 = c. Extras: clipped, clipped by the dual clip."""
    zero = tl.zeros_like(ell)
    l1 = -A * w
    l2 = -A * tl.minimum(tl.maximum(w, 1.0 - p0), 1.0 + p1)
    loss = tl.maximum(l1, l2)
    active = l1 >= l2
    dual = zero
    if OPT == 1:
        l3 = -A * p2
        dual_on = (A < 0.0) & (loss > l3)
        loss = tl.where(dual_on, l3, loss)
        active = active & (~dual_on)
        dual = tl.where(dual_on, 1.0, 0.0).to(ell.dtype)
    phi = tl.where(active, A * w, 0.0)
    clipped = tl.where(l2 > l1, 1.0, 0.0).to(ell.dtype)
    return phi, -loss, 1.0 + zero, clipped, dual, zero, zero, zero


@triton.jit
def sapo_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """τ = τ_pos (p0) if A > 0 else τ_neg (p1); φ = A·w·sech²(τ(w−1)/2), F = A·(4/τ)·σ(τ(w−1))."""
    zero = tl.zeros_like(ell)
    tau = tl.where(A > 0.0, p0, p1)
    x = tau * (w - 1.0)
    return A * w * sech2_half(x), A * (4.0 / tau) * tl.sigmoid(x), 1.0 + zero, zero, zero, zero, zero, zero


@triton.jit
def vespo_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT: tl.constexpr):
    """φ = φ(W_b)·A with the row's sequence weight c0 = φ(W_b); surrogate F = φ·ℓ."""
    zero = tl.zeros_like(ell)
    phi = c0 * A
    return phi, phi * ell, 1.0 + zero, zero, zero, zero, zero, zero


@triton.jit
def vespo_sequence_weight(log_w_sum, a_first, clamp, p0, p1, p2, p3):
    """φ(W) = W^k·exp(λ(1−W)), log W = clamp(Σ m·ℓ, ±clamp); (k, λ) = (p0, p1) if the
    row's first counted advantage is ≥ 0 else (p2, p3)."""
    log_w = tl.minimum(tl.maximum(log_w_sum, -clamp), clamp)
    k = tl.where(a_first >= 0.0, p0, p2)
    lam = tl.where(a_first >= 0.0, p1, p3)
    return tl.exp(k * log_w + lam * (1.0 - tl.exp(log_w)))


@triton.jit
def family_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6,
                 FAMILY: tl.constexpr, OPT: tl.constexpr):
    """Dispatch to the family's per-token function (resolved at compile time)."""
    if FAMILY == IS_RESHAPE:
        out = is_reshape_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    elif FAMILY == IS_RESHAPE_SIGN:
        out = is_reshape_sign_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    elif FAMILY == IS_RESHAPE_TR:
        out = is_reshape_tr_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    elif FAMILY == IS_RESHAPE_VAR:
        out = is_reshape_var_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    elif FAMILY == PPO_CLIP:
        out = ppo_clip_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    elif FAMILY == SAPO:
        out = sapo_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    else:
        out = vespo_token(ell, w, A, c0, c1, p0, p1, p2, p3, p4, p5, p6, OPT)
    return out
