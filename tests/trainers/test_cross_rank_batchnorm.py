"""CrossRankBatchNorm: two gloo ranks reproduce nn.BatchNorm*d on the full batch; one process is BatchNorm itself."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.ui import free_port
from trainers.cross_rank_batchnorm import CrossRankBatchNorm, convert_cross_rank_batchnorm

WORLD = 2
STEPS = 2
# name -> (input shape without N, rows per rank, module kwargs); float64 throughout
CASES: dict[str, tuple[tuple[int, ...], tuple[int, int], dict]] = {
    "equal": ((3, 5, 5), (4, 4), {}),
    "unequal": ((3, 5, 5), (3, 5), {}),
    "unequal_cumulative": ((3, 5, 5), (5, 3), {"momentum": None}),
    "no_affine_no_stats": ((3, 5, 5), (3, 5), {"affine": False, "track_running_stats": False}),
    "no_bias": ((3, 5, 5), (4, 4), {"bias": False}),
    "2d_input": ((3,), (3, 5), {}),
    "3d_input": ((3, 4), (3, 5), {}),
}
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d}  # len(input shape without N) -> reference


def _make(case: str, cross_rank: bool) -> nn.Module:
    """The layer for ``case`` with the same seeded affine parameters, cross-rank or plain."""
    feature_shape, _, kwargs = CASES[case]
    cls = CrossRankBatchNorm if cross_rank else PLAIN[len(feature_shape)]
    module = cls(feature_shape[0], dtype=torch.float64, **kwargs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def _global_data(case: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: the global batch ``x`` (N, C, *) (offset so mean >> std is exercised) and loss weights."""
    feature_shape, rows, _ = CASES[case]
    g = torch.Generator().manual_seed(17)
    shape = (sum(rows), *feature_shape)
    data = []
    for _ in range(STEPS):
        x = 3.0 + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
        data.append((x, torch.randn(shape, generator=g, dtype=torch.float64)))
    return data


def _run(module: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Two training steps (loss = sum(out * w)), then one eval forward on the last input."""
    result: dict[str, torch.Tensor] = {}
    module.train()
    for step, (x, w) in enumerate(data):
        module.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        out = module(x)
        (out * w).sum().backward()
        result[f"out{step}"], result[f"xgrad{step}"] = out.detach(), x.grad.clone()
        for name, p in module.named_parameters():
            result[f"{name}_grad{step}"] = p.grad.clone()
    for name, buffer in module.named_buffers():
        result[name] = buffer.clone()
    module.eval()
    with torch.no_grad():
        result["eval"] = module(data[-1][0])
    return result


def _local(tensors: list[tuple[torch.Tensor, torch.Tensor]], rows: tuple[int, int], rank: int):
    start = sum(rows[:rank])
    return [(x[start : start + rows[rank]], w[start : start + rows[rank]]) for x, w in tensors]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {case: _run(_make(case, True), _local(_global_data(case), CASES[case][1], rank)) for case in CASES}
        # a group of one rank (every rank creates every group): the plain local path, per-rank statistics
        groups = [dist.new_group([r]) for r in range(WORLD)]
        module = _make("unequal", True)
        module.process_group = groups[rank]
        results["own_group"] = _run(module, _local(_global_data("unequal"), CASES["unequal"][1], rank))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (what, (got - want).abs().max())


def test_two_ranks_match_batchnorm_on_the_full_batch(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for case, (_, rows, kwargs) in CASES.items():
        ref = _run(_make(case, False), _global_data(case))
        for rank in range(WORLD):
            start, stop = sum(rows[:rank]), sum(rows[: rank + 1])
            if kwargs.get("track_running_stats", True) is False:
                # no running statistics: eval normalises with batch statistics, which (as in SyncBatchNorm)
                # are not pooled outside training, so eval is plain BatchNorm on the rank's own rows
                local_ref = _run(_make(case, False), _local(_global_data(case), rows, rank))
                _assert_close(got[rank][case]["eval"], local_ref["eval"], (case, rank, "eval"))
                assert not torch.allclose(local_ref["eval"], ref["eval"][start:stop])
            for key in ref:
                if key == "eval" and kwargs.get("track_running_stats", True) is False:
                    continue
                if key.startswith(("out", "xgrad", "eval")):  # per-row: this rank's slice of the full batch
                    _assert_close(got[rank][case][key], ref[key][start:stop], (case, rank, key))
                elif "_grad" in key:  # parameter gradients: rank contributions sum to the full-batch gradient
                    _assert_close(got[0][case][key] + got[1][case][key], ref[key], (case, key))
                else:  # running_mean / running_var / num_batches_tracked, identical on every rank
                    assert torch.allclose(got[rank][case][key], ref[key], rtol=1e-12, atol=0), (case, rank, key)
        assert got[0][case].keys() == ref.keys(), case
    assert "num_batches_tracked" in got[0]["unequal_cumulative"] and "running_var" not in got[0]["no_affine_no_stats"]
    # a one-rank group normalises with local statistics only: plain BatchNorm2d on the rank's own rows
    for rank in range(WORLD):
        ref = _run(_make("unequal", False), _local(_global_data("unequal"), CASES["unequal"][1], rank))
        for key in ref:
            _assert_close(got[rank]["own_group"][key], ref[key], ("own_group", rank, key))


@pytest.mark.parametrize("case", list(CASES))
def test_single_process_is_plain_batchnorm(case: str) -> None:
    assert not dist.is_initialized()
    got, ref = _run(_make(case, True), _global_data(case)), _run(_make(case, False), _global_data(case))
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_too_few_values_per_channel_raises_like_batchnorm() -> None:
    with pytest.raises(ValueError):
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError):
        CrossRankBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError):
        CrossRankBatchNorm(3)(torch.randn(3))


def _model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.ModuleDict(
        {
            "stem": nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU()),
            "head": nn.Sequential(
                nn.BatchNorm2d(3, affine=False, momentum=None),
                nn.Sequential(nn.BatchNorm2d(3, bias=False), nn.BatchNorm2d(3, track_running_stats=False)),
            ),
            "flat": nn.BatchNorm1d(4),
            "vol": nn.BatchNorm3d(2),
        }
    )
    for m in model.modules():  # non-trivial parameters and running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in [*m.parameters(), *(b for b in (m.running_mean, m.running_var) if b is not None)]:
                with torch.no_grad():
                    t.copy_(torch.rand(t.shape) + 0.5)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(7)
    model["head"][1].eval()
    return model


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model["head"](model["stem"](x))
    return torch.cat([h.flatten(), model["flat"](x.flatten(1)[:, :4]).flatten(), model["vol"](x[:, :, None]).flatten()])


def test_conversion_shares_parameters_and_keeps_state_dict_keys() -> None:
    model = _model()
    plain = copy.deepcopy(model)
    old = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    keys, state = list(model.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}

    converted = convert_cross_rank_batchnorm(model)

    assert converted is model  # containers are converted in place
    assert list(converted.state_dict()) == keys
    assert all(torch.equal(v, state[k]) for k, v in converted.state_dict().items())
    new = dict(converted.named_modules())
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, CrossRankBatchNorm) for m in new.values()
    )
    assert len(old) == 6
    for name, bn in old.items():
        cr = new[name]
        assert type(cr) is CrossRankBatchNorm and cr is not bn
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(cr, attr) == getattr(bn, attr), (name, attr)
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(cr, attr) is getattr(bn, attr), (name, attr)  # shared, not copied
    assert new["head.1"].training is False and new["head.1.0"].training is False and new["stem.1"].training

    # same outputs and gradients as the unconverted model (train mode, no process group)
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(_forward(converted, x), _forward(plain, x), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), plain.state_dict().values()))

    # already converted layers are left alone
    again = convert_cross_rank_batchnorm(converted)
    assert again is converted and all(new[n] is m for n, m in again.named_modules())


def test_bare_batchnorm_is_converted_itself_and_state_dicts_round_trip() -> None:
    bn = nn.BatchNorm2d(3, momentum=0.3)
    bn(torch.randn(6, 3, 4, 4))
    bn.eval()
    cr = convert_cross_rank_batchnorm(bn)
    assert type(cr) is CrossRankBatchNorm and cr is not bn and not cr.training
    assert cr.weight is bn.weight and cr.running_var is bn.running_var and cr.momentum == 0.3
    assert list(cr.state_dict()) == list(bn.state_dict())

    x = torch.randn(2, 3, 4, 4)
    cr.train()
    cr(torch.randn(5, 3, 4, 4) * 4 + 1)  # make its statistics differ from any fresh layer
    cr.eval()
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(cr.state_dict())  # converted -> plain (strict)
    assert torch.equal(plain(x), cr(x))
    fresh = CrossRankBatchNorm(3).eval()
    fresh.load_state_dict(plain.state_dict())  # plain -> converted (strict)
    assert torch.equal(fresh(x), plain(x))
    assert int(fresh.num_batches_tracked) == 2
