"""16-bit kernel outputs against float64: rounded once, to nearest even, as on a GPU."""
import torch


def midpoint_distance(x, dtype):
    """Distance from float64 ``x`` to the nearest midpoint of two consecutive ``dtype``
    values (where rounding to ``dtype`` flips); subnormals included."""
    fi = torch.finfo(dtype)
    ulp = torch.ldexp(torch.full_like(x, fi.eps), torch.frexp(x.abs().clamp_min(fi.tiny))[1] - 1)
    return ((x.abs() / ulp).frac() - 0.5).abs() * ulp


def assert_rounded_once(out, fp32, ref64, max_near):
    """``out`` (bf16 / fp16) is the kernel's fp32 result ``fp32`` (same inputs, fp32 output)
    rounded once to nearest even, bit for bit; so it is the float64 result ``ref64`` rounded
    once except where a rounding midpoint lies within fp32's error |fp32 − ref64| of ``ref64``:
    those elements (at most a fraction ``max_near`` of all) may be the other neighbour."""
    assert out.dtype in (torch.bfloat16, torch.float16) and fp32.dtype == torch.float32
    assert torch.equal(out.view(torch.int16), fp32.to(out.dtype).view(torch.int16))
    err = (fp32.double() - ref64).abs()  # 0: the same value, rounded the same way (a midpoint included)
    near = (err > 0) & (midpoint_distance(ref64, out.dtype) <= err)
    differ = out != ref64.to(out.dtype)
    assert not (differ & ~near).any(), (out[differ & ~near], ref64[differ & ~near])
    assert near.sum() <= max_near * out.numel(), (int(near.sum()), out.numel())
