"""vae/flat.py: parameters in one buffer train exactly as per-tensor AdamW does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import make_paired, tiny_model
from vae.checkpoint import load_torch_file
from vae.data import from_anndata, stratified_split
from vae.flat import FlatParameters
from vae.train import TrainArgs, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 3))


def _steps(net, opt, zero, clip, n=6):
    torch.manual_seed(1)
    norms = []
    for _ in range(n):
        zero()
        net(torch.randn(8, 5)).pow(2).sum().backward()
        norms.append(float(clip()))
        opt.step()
    return norms


def test_flat_adamw_and_clipping_match_per_tensor_adamw():
    ref = _net()
    params = list(ref.parameters())
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01, fused=True)
    n_ref = _steps(
        ref,
        opt,
        lambda: opt.zero_grad(set_to_none=True),
        lambda: torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True),
    )
    net = _net()
    fp = FlatParameters(list(net.parameters()))
    assert all(p.data_ptr() != 0 and p.grad is not None for p in net.parameters())
    # every parameter is a view of the one buffer the optimizer updates
    assert net[0].weight.untyped_storage().data_ptr() == fp.flat.untyped_storage().data_ptr()
    fopt = torch.optim.AdamW([fp.flat], lr=0.05, weight_decay=0.01, fused=True)
    n_flat = _steps(net, fopt, fp.zero_grad, lambda: fp.clip_(0.5))
    np.testing.assert_allclose(n_flat, n_ref, rtol=1e-5)
    assert max(n_ref) > 0.5  # clipping acted
    for a, b in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the saved state is AdamW's per-tensor layout: it loads into the per-tensor
    # optimizer and back into the flat one unchanged
    sd = fp.per_tensor_state(fopt.state_dict())
    ref_sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == ref_sd["param_groups"][0]["params"]
    for i, st in ref_sd["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(sd["state"][i][k], v, rtol=1e-5, atol=1e-7)
    torch.optim.AdamW(list(_net().parameters()), fused=True).load_state_dict(sd)
    back = fp.flat_state(sd)["state"][0]
    for k, v in fopt.state_dict()["state"][0].items():
        assert torch.equal(back[k], v), k


def test_flat_state_refuses_a_state_of_another_model():
    fp = FlatParameters(list(_net().parameters()))
    other = torch.optim.AdamW(list(torch.nn.Linear(2, 2).parameters()))
    with pytest.raises(ValueError, match="this model trains 4"):
        fp.flat_state(other.state_dict())
    with pytest.raises(ValueError, match="several dtypes"):
        FlatParameters(
            [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2).double())]
        )


def test_expression_only_training_resumes_bit_exactly_and_saves_per_tensor_state(tmp_path):
    d = from_anndata(make_paired(0, expression_only=30))
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    args = dict(max_epochs=4, batch_size=8, kl_warmup_epochs=1, image_every_epochs=0, seed=3)

    def fresh():
        torch.manual_seed(0)
        return tiny_model(12, "poe", 0)

    straight = fresh()
    train(straight, d, split, TrainArgs(**args), CPU, tmp_path / "full")
    part = fresh()
    train(part, d, split, TrainArgs(**args, stop_after_epochs=2), CPU, tmp_path / "res")
    ck = load_torch_file(tmp_path / "res" / "last.pt")
    # per-tensor layout: one state per trained tensor (the image branch is frozen out)
    shapes = [
        p.shape
        for n, p in fresh().named_parameters()
        if not n.startswith("image_") and n != "image_log_scale"
    ]
    st = ck["optimizer"]["state"]
    assert [st[i]["exp_avg"].shape for i in sorted(st)] == shapes
    resumed = fresh()
    train(
        resumed,
        d,
        split,
        TrainArgs(**args),
        CPU,
        tmp_path / "res",
        resume_from=tmp_path / "res" / "last.pt",
    )
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
