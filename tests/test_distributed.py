"""process_group=: every rank uses the γ of the concatenated global batch.

Spawns 2 and 4 CPU processes (gloo), each holding an uneven slice of one global
batch (one rank only masked tokens), runs the fused op (interpreter) with
dp_size / global_token_count, and checks against the single-process op on the
whole batch: γ (and PSIS's k̂) bit-identical on all ranks and within 1e-6 of the
single-process value; the mean of the rank losses equals the single-process loss and each
rank's gradient is dp_size × the single-process gradient of its rows (what DDP's
gradient averaging turns back into the single-process gradient).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [("is_reshape", {}), ("is_reshape_sign", {"gamma": "ess_exact"}),
           ("is_reshape_var", {"gamma": "ess_exact"}), ("vespo", {}),
           ("is_reshape", {"gamma": "psis", "rho_min": 0.6}), ("is_reshape_sign", {"gamma": "psis"})]
GAMMA_KEYS = {"is_reshape": ("gamma",), "is_reshape_sign": ("gamma_pos", "gamma_neg"),
              "is_reshape_var": ("gamma_base",), "vespo": ()}


def _global_batch():
    g = torch.Generator().manual_seed(5)
    B, T = 9, 23
    lp = -torch.rand(B, T, generator=g) * 2
    olp = lp + 0.6 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2:4] = False  # the rows of rank 1: only masked tokens
    return lp, olp, adv, mask


def _key(loss_type, opts):
    return loss_type + str(sorted(opts.items()))


def _splits(world):
    return {2: [(0, 2), (2, 9)], 4: [(0, 2), (2, 4), (4, 5), (5, 9)]}[world]


def _worker(rank, world, init_file, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    import isreshape_triton as irt

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lp, olp, adv, mask = _global_batch()
    lo, hi = _splits(world)[rank]
    n_total = float(mask.sum())
    results = {}
    for loss_type, opts in CONFIGS:
        x = lp[lo:hi].clone().requires_grad_()
        loss, metrics = irt.policy_loss(x, olp[lo:hi], adv[lo:hi], mask[lo:hi], loss_type, "token-mean",
                                        process_group=dist.group.WORLD, dp_size=world,
                                        global_token_count=n_total, **opts)
        loss.backward()
        results[_key(loss_type, opts)] = (loss.detach(), {k: v.clone() for k, v in metrics.items()}, x.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_global_gamma_across_ranks(world):
    import isreshape_triton as irt

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world,
                           join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    lp, olp, adv, mask = _global_batch()
    for loss_type, opts in CONFIGS:
        x = lp.clone().requires_grad_()
        loss, metrics = irt.policy_loss(x, olp, adv, mask, loss_type, "token-mean", **opts)
        loss.backward()
        name = _key(loss_type, opts)
        keys = GAMMA_KEYS[loss_type] + (("psis_k",) if opts.get("gamma") == "psis" else ())
        for key in keys:
            values = [r[name][1][key] for r in ranks]
            assert all(torch.equal(v, values[0]) for v in values), (loss_type, key, values)
            assert abs(values[0].item() - metrics[key].item()) < 1e-6, (loss_type, key)
        mean_loss = sum(r[name][0] for r in ranks) / world
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        for r, (lo, hi) in zip(ranks, _splits(world)):
            torch.testing.assert_close(r[name][2], world * x.grad[lo:hi], rtol=1e-5, atol=1e-7)
