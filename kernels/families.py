"""Per-token gradient weight φ(w, A) and objective F of every loss family (SPEC §4).

Every family is one ``@triton.jit`` function with the same signature

    (ell, w, A, ctx, params, OPT) -> (phi, F, gamma_t, extras)

ell = clamped log-ratio, w = exp(ell), A = advantage. ``ctx`` = (c0, c1) is the
family's context resolved by the kernel from batch or row statistics (γ values,
VESPO's sequence weight); ``params`` is the family's tuple of runtime floats in the
order of the Python family table (``isreshape_triton/families.py``), unpacked by
name here; OPT is the family's structural option. The loss is −F;
dF/dlog_prob = φ. gamma_t is the token's effective IS exponent (metrics:
ω = w^gamma_t); ``extras`` are five per-token terms of the family's extra metrics.
``family_token`` dispatches on the FAMILY constexpr; adding a family means one
function here, one reference function and one table row.
"""
import triton
import triton.language as tl

from .common import clamp_nan, expm1, expm1_over, fast_div, log1p, max_nan, sech2_half, sigmoid, tanh

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
def _no_extras(ell):
    zero = tl.zeros_like(ell)
    return zero, zero, zero, zero, zero


@triton.jit
def _mm_weight_and_integral(w, tau):
    """b = (1+τ)w/(τ+w) and ∫₁^w b(u)/u du = (1+τ)·ln((τ+w)/(τ+1))."""
    return (1.0 + tau) * fast_div(w, tau + w), (1.0 + tau) * log1p((w - 1.0) * (1.0 / (tau + 1.0)))


@triton.jit
def is_reshape_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ; ctx = (γ, ·)."""
    gamma, _ = ctx
    g = gamma + tl.zeros_like(ell)
    return A * tl.exp(g * ell), A * expm1_over(ell, g), g, _no_extras(ell)


@triton.jit
def is_reshape_sign_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """A>0: w^{γ+}·A (or Michaelis-Menten); A<0: b(w)·A; A=0: 0; ctx = (γ+, γ−).

    F = A·∫₁^w φ/(A·u) du in closed form; the soft saturation is a surrogate φ·ℓ.
    Extras: γ+ on A>0 tokens, γ− on A<0 tokens (per-row γ metrics).
    """
    lam, w_th, trunc_max, mm_tau = params
    gamma_pos, gamma_neg = ctx
    zero = tl.zeros_like(ell)
    g_pos = gamma_pos + zero
    g_neg = gamma_neg + zero
    if OPT // 4 == 1:  # pos_weight = michaelis_menten
        b_pos, f_pos = _mm_weight_and_integral(w, mm_tau)
    else:
        b_pos = tl.exp(g_pos * ell)
        f_pos = expm1_over(ell, g_pos)
    w_neg = tl.exp(g_neg * ell)
    if OPT % 4 == SAT_NONE:
        b_neg = w_neg
        f_neg = expm1_over(ell, g_neg)
    elif OPT % 4 == SAT_SOFT:
        beta = sigmoid(-lam * (w - w_th))
        b_neg = beta * w_neg + (1.0 - beta) * w
        f_neg = b_neg * ell
    elif OPT % 4 == SAT_TRUNCATE:
        b_neg = tl.where(w_neg > trunc_max, trunc_max, w_neg)
        f_sat = (trunc_max - 1.0) / g_neg + trunc_max * (ell - tl.log(trunc_max) / g_neg)
        f_neg = tl.where(w_neg > trunc_max, f_sat, expm1_over(ell, g_neg))
    else:
        b_neg, f_neg = _mm_weight_and_integral(w, mm_tau)
    pos = A > 0.0
    neg = A < 0.0
    phi = tl.where(pos, A * b_pos, tl.where(neg, A * b_neg, A * 0.0))
    F = tl.where(pos, A * f_pos, tl.where(neg, A * f_neg, A * 0.0))
    g_t = tl.where(A >= 0.0, g_pos, g_neg)  # γ+ where A ≥ 0, γ− where A < 0 (and NaN A)
    return phi, F, g_t, (tl.where(pos, g_pos, 0.0), tl.where(neg, g_neg, 0.0), zero, zero, zero)


@triton.jit
def is_reshape_tr_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c);
    φ = [(1−γ_t) + γ_t·w·sech²(τ_h(w−1)/2)]·A, F = A·[(1−γ_t)ℓ + γ_t·(2/τ_h)·tanh(τ_h(w−1)/2)]
    with w − 1 = expm1(ℓ) (accurate near ℓ = 0)."""
    tau_h, tau_c, gamma_base, gamma_max = params
    g = gamma_base + (gamma_max - gamma_base) * sigmoid(-A * ell * (1.0 / tau_c))
    x = tau_h * expm1(ell)
    phi = A * ((1.0 - g) + g * w * sech2_half(x))
    F = A * ((1.0 - g) * ell + g * (2.0 / tau_h) * tanh(0.5 * x))
    return phi, F, g, _no_extras(ell)


@triton.jit
def is_reshape_var_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """Soft four-case γ*(w, A): γ_t = clip(γ_base·(p2+p3) + p4, 0, 1) with p_hi = σ(Tℓ),
    p_pos = σ(T·A); φ = w^{γ_t}·A, F = A·expm1(γ_tℓ)/γ_t; ctx = (γ_base, ·).
    Extras: the case probabilities p1..p4 and γ_base."""
    (temperature,) = params
    gamma_base, _ = ctx
    p_hi = sigmoid(temperature * ell)
    p_lo = sigmoid(-temperature * ell)
    p_pos = sigmoid(temperature * A)
    p_neg = sigmoid(-temperature * A)
    q1 = p_hi * p_pos
    q2 = p_hi * p_neg
    q3 = p_lo * p_pos
    q4 = p_lo * p_neg
    g = clamp_nan(gamma_base * (q2 + q3) + q4, 0.0, 1.0)
    return A * tl.exp(g * ell), A * expm1_over(ell, g), g, (q1, q2, q3, q4, gamma_base + tl.zeros_like(ell))


@triton.jit
def ppo_clip_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """loss = max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)); for A<0 with the dual clip
    (OPT = 1) min(that, −A·c). φ = A·w where the unclipped branch is active.
    Extras: clipped, clipped by the dual clip."""
    eps_low, eps_high, dual_c = params
    zero = tl.zeros_like(ell)
    l1 = -A * w
    l2 = -A * clamp_nan(w, 1.0 - eps_low, 1.0 + eps_high)
    loss = max_nan(l1, l2)
    active = (l1 >= l2) | (loss != loss)  # a NaN token keeps its (NaN) gradient
    dual = zero
    if OPT == 1:
        l3 = -A * dual_c
        dual_on = (A < 0.0) & (loss > l3)
        loss = tl.where(dual_on, l3, loss)
        active = active & (~dual_on)
        dual = tl.where(dual_on, 1.0, 0.0).to(ell.dtype)
    phi = tl.where(active, A * w, 0.0)
    clipped = tl.where(l2 > l1, 1.0, 0.0).to(ell.dtype)
    return phi, -loss, 1.0 + zero, (clipped, dual, zero, zero, zero)


@triton.jit
def sapo_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """τ = τ_pos if A > 0 else τ_neg; φ = A·w·sech²(τ(w−1)/2), F = A·(4/τ)·σ(τ(w−1))
    with w − 1 = expm1(ℓ)."""
    tau_pos, tau_neg = params
    tau = tl.where(A > 0.0, tau_pos, tau_neg)
    x = tau * expm1(ell)
    return A * w * sech2_half(x), A * (4.0 / tau) * sigmoid(x), 1.0 + tl.zeros_like(ell), _no_extras(ell)


@triton.jit
def vespo_token(ell, w, A, ctx, params, OPT: tl.constexpr):
    """φ = φ(W_b)·A with the row's sequence weight ctx = (φ(W_b), ·); surrogate F = φ·ℓ."""
    seq_weight, _ = ctx
    phi = seq_weight * A
    return phi, phi * ell, 1.0 + tl.zeros_like(ell), _no_extras(ell)


@triton.jit
def vespo_sequence_weight(log_w_sum, a_first, clamp, params):
    """φ(W) = W^k·exp(λ(1−W)), log W = clamp(Σ m·ℓ, ±clamp); (k, λ) = (k_pos, λ_pos) if the
    row's first counted advantage is ≥ 0 else (k_neg, λ_neg); NaN if that advantage is not
    finite (its sign is unknown: SPEC §11)."""
    k_pos, lambda_pos, k_neg, lambda_neg = params
    log_w = clamp_nan(log_w_sum, -clamp, clamp)
    k = tl.where(a_first >= 0.0, k_pos, k_neg)
    lam = tl.where(a_first >= 0.0, lambda_pos, lambda_neg)
    phi = tl.exp(k * log_w + lam * (1.0 - tl.exp(log_w)))
    return tl.where(tl.abs(a_first) < float("inf"), phi, float("nan"))


KL_NONE = tl.constexpr(0)
KL_K1 = tl.constexpr(1)  # "kl" / "k1"
KL_ABS = tl.constexpr(2)  # "abs"
KL_K2 = tl.constexpr(3)  # "mse" / "k2"
KL_K3 = tl.constexpr(4)  # "low_var_kl" / "k3"


@triton.jit
def kl_penalty(x, KL_TYPE: tl.constexpr):
    """verl's kl_penalty k(x) of x = log π − log π_ref and dk/dx as torch autograd gives it:
    k1 = x; abs = |x|; k2 = x²/2; k3 = e^{κ} − κ − 1 with κ = clamp(−x, ±20), then clamped
    to [−10, 10] (zero derivative where a clamp is active)."""
    if KL_TYPE == KL_K1:
        k = x
        dk = tl.zeros_like(x) + 1.0
    elif KL_TYPE == KL_ABS:
        k = tl.abs(x)
        dk = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0 * x))
    elif KL_TYPE == KL_K2:
        k = 0.5 * x * x
        dk = x
    else:
        kappa = clamp_nan(-x, -20.0, 20.0)
        e = tl.exp(kappa)
        k3 = e - kappa - 1.0
        k = clamp_nan(k3, -10.0, 10.0)
        dk = tl.where((tl.abs(x) > 20.0) | (k3 > 10.0) | (k3 < -10.0), 0.0 * x, 1.0 - e)
    return k, dk


@triton.jit
def family_token(ell, w, A, ctx, params, FAMILY: tl.constexpr, OPT: tl.constexpr):
    """Dispatch to the family's per-token function (resolved at compile time)."""
    if FAMILY == IS_RESHAPE:
        out = is_reshape_token(ell, w, A, ctx, params, OPT)
    elif FAMILY == IS_RESHAPE_SIGN:
        out = is_reshape_sign_token(ell, w, A, ctx, params, OPT)
    elif FAMILY == IS_RESHAPE_TR:
        out = is_reshape_tr_token(ell, w, A, ctx, params, OPT)
    elif FAMILY == IS_RESHAPE_VAR:
        out = is_reshape_var_token(ell, w, A, ctx, params, OPT)
    elif FAMILY == PPO_CLIP:
        out = ppo_clip_token(ell, w, A, ctx, params, OPT)
    elif FAMILY == SAPO:
        out = sapo_token(ell, w, A, ctx, params, OPT)
    else:
        out = vespo_token(ell, w, A, ctx, params, OPT)
    return out
