"""The metric stage run as if its data sat on a GPU (tests/simulated_device.py): no tensor
made on the host meets the device data, so the same code runs on CUDA."""
import warnings

import pytest
import torch

from harness.study import results
from harness.cknna import knn as knn_module
from harness.cknna.knn import knn, knn_among
from tests.simulated_device import on_device, simulated_device, to_device

N = 96


@pytest.fixture(autouse=True)
def device_tensors_take_the_device_top_k(monkeypatch):
    """The search picks its compiled CPU top-k by `x.device.type`, which the simulation
    cannot fake (its tensors report "cpu"): simulated device tensors take the torch top-k,
    as CUDA tensors do."""
    host_choice = knn_module._top_k
    monkeypatch.setattr(knn_module, "_top_k", lambda x, k: knn_module._BlockTopK(x, k)
                        if on_device(x) else host_choice(x, k))


def data():
    """Tie-heavy model features (small-integer rows, slightly perturbed), states, groups."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-1, 2, (N, 6), generator=g).float() + 0.01 * torch.randn(N, 6, generator=g)
    b = torch.randn(N, 3, generator=g)
    unit = torch.nn.functional.normalize
    return unit(a, dim=1), unit(b, dim=1), torch.arange(N) // 6


def test_the_simulation_catches_what_cuda_refuses_and_allows_what_it_allows():
    with simulated_device() as found:
        x = to_device(torch.arange(6.0))
        x + torch.arange(6)  # a host tensor beside a device one
        torch.gather(x.view(2, 3), 1, torch.zeros(2, 1, dtype=torch.long))
        x.numpy()
        host = torch.zeros(6)
        host[torch.arange(6)] = x  # device values put into a host tensor
        ok = x * torch.tensor(2.0) + x[torch.arange(6, device=x.device)]  # host scalar; device index
        moved = torch.randperm(6, generator=torch.Generator().manual_seed(0)).to(x.device)
        x[moved[:3]].sum().item()
        host[:] = x  # a copy between devices
        back = x.cpu()
    assert on_device(ok) and on_device(moved) and not on_device(back)
    assert [what for _, what in found.mismatches] == [
        "add: device and host tensors mixed", "gather: device and host tensors mixed",
        ".numpy() of a device tensor", "__setitem__: device values put into a host tensor"]
    assert sum(found.transfers.values()) == 2  # the moved randperm, the copy
    assert sum(found.syncs.values()) == 2  # .item(), .cpu()


@pytest.mark.parametrize("backend, strategy", [("torch", "rows"), ("torch", "symmetric"),
                                               ("faiss-flat", "auto")])
def test_knn_search_stays_on_the_device(backend, strategy):
    if backend != "torch":
        pytest.importorskip("faiss")
    a, _, groups = data()
    on_cpu = knn(a, 7, backend=backend, strategy=strategy,
                 groups=groups if backend == "torch" else None)
    with simulated_device() as found:
        x = to_device(a)
        nb = knn(x, 7, backend=backend, strategy=strategy,
                 groups=groups if backend == "torch" else None)  # host groups are moved
        subset = torch.arange(0, N, 2, device=x.device)
        among = knn_among(x, subset[:5], subset, 4, groups.to(x.device))
    assert found.mismatch_sites() == []
    assert on_device(nb.indices) and on_device(nb.values) and on_device(among.indices)
    assert torch.equal(nb.indices, on_cpu.indices) and torch.equal(nb.values, on_cpu.values)


@pytest.mark.parametrize("ties, exclude", [("shared", True), ("index", False)])
def test_the_whole_metric_stage_stays_on_the_device(ties, exclude):
    """Every option of `results.compute` (what `harness cknna` runs) with --device set:
    the searches stay on the device; lists and features go to the host explicitly
    (`.cpu()`) for the graph kernels."""
    a, b, groups = data()
    models = {"m1": ("m1.pt", a), "m2": ("m2.pt", a.flip(1))}
    settings = results.Settings(ks=[3, 8], permutations=12, subsample_draws=6, seed=1,
                                pairwise=True, cka=True, ties=ties, groups=groups,
                                groups_source="g.json", exclude_same_group=exclude,
                                side_by_side=True, compare=True, device=torch.device("cpu"))
    layers = {"m1": {"layer_0": a[:, :4], "layer_1": a}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = results.compute(models, b, "b.pt", settings, {}, layers=layers)
        with simulated_device() as found:
            got = results.compute(models, b, "b.pt", settings, {}, layers=layers)
    assert found.mismatch_sites() == []
    assert sum(found.syncs.values()) > 0  # the device data did reach the metrics
    for label in models:
        for k in settings.ks:
            assert got["models"][label][f"cknna_k{k}"] == expected["models"][label][f"cknna_k{k}"]
    assert got["pairwise"] == expected["pairwise"] and got["layers"] == expected["layers"]
