"""The GPU paths against their CPU references: bf16 autocast + channels_last embeddings, the
training step on the device (kornia augmentation, DDP over NCCL), kNN scoring on the device.

CI has no GPU, so these skip there; ``infra/gpu-check.sh`` runs them on a GPU machine. Every GPU
branch they cover also has a CPU path that the rest of the suite tests."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from msc_dist import dist
from msc_dist.augment import TwoViewAugment
from msc_dist.features import to_unit
from msc_dist.backbones import build_model
from msc_dist.features import autocast
from msc_dist.train.center import global_center
from msc_dist.loss import msc_loss
from msc_dist.scoring import knn_score
from msc_dist.train.config import TrainConfig
from msc_dist.train.loop import Stepper

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, S, S) uint8: smooth random blobs plus noise, so features are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 6, 6), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.1 * torch.rand((n, 3, size, size), generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def test_embeddings_bf16_channels_last_match_cpu_float32():
    model = build_model("efficientnet_lite0").eval()
    x = _images(32, 128, 0)
    with torch.no_grad():
        ref = model(to_unit(x.clone()))  # (32, 1280) float32 on CPU
        gpu = model.cuda().to(memory_format=torch.channels_last)
        with autocast(torch.device("cuda")):
            z = gpu(to_unit(x.cuda()).contiguous(memory_format=torch.channels_last)).float().cpu()
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(32), atol=1e-3, rtol=0)
    cos = (ref * z).sum(1)
    assert cos.min() > 0.99, cos.min()
    # What the kNN score sees: pairwise similarities. (Nearest-neighbour identity is too strict a
    # check on these near-identical synthetic images: bf16 noise reorders near-ties.)
    err = ((ref @ ref.T) - (z @ z.T)).abs().max()
    print(f"bf16 vs float32: min cosine {float(cos.min()):.5f}, max similarity error {float(err):.5f}")
    assert err < 0.05, err


def test_msc_loss_under_autocast_matches_cpu():
    model = build_model("efficientnet_lite0").eval()
    views = to_unit(_images(32, 96, 1))  # (2B, 3, S, S), B = 16
    with torch.no_grad():
        z_ref = model(views)
        c = torch.nn.functional.normalize(z_ref.mean(0), dim=0)
        ref = msc_loss(z_ref[:16].double(), z_ref[16:].double(), c.double(), 0.25, 1.0)
        gpu = model.cuda()
        with autocast(torch.device("cuda")):
            z = gpu(views.cuda())
        got = msc_loss(z[:16].float(), z[16:].float(), c.cuda(), 0.25, 1.0)
    assert abs(float(got) - float(ref)) / float(ref) < 2e-2, (float(got), float(ref))


def test_augment_on_gpu():
    aug = TwoViewAugment(64).cuda()
    x = _images(8, 80, 2).cuda()
    x = torch.nn.functional.interpolate(x.float(), size=(64, 64)).to(torch.uint8)
    v = aug(x)
    assert v.shape == (16, 3, 64, 64) and v.device.type == "cuda"
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    assert (v[:8] - v[8:]).abs().mean() > 0.01  # the two views differ


def test_knn_score_on_gpu_equals_float64_cpu():
    g = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(5000, 128, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(300, 128, generator=g), dim=1)
    ref = knn_score(q.double(), bank.double(), k=2)
    got = knn_score(q.cuda(), bank.cuda(), k=2, chunk=128).cpu()
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-4, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_over_nccl_single_rank():
    """World size 1 over NCCL still runs every collective and the DDP wrapper for real."""
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.cuda.set_device(0)
    tdist.init_process_group("nccl", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", 0)
        z = torch.nn.functional.normalize(torch.randn(10, 1280), dim=1)
        c, n = global_center(z)
        assert n == 10
        torch.testing.assert_close(c, torch.nn.functional.normalize(z.double().mean(0), dim=0).float())
        assert dist.gather_varlen(torch.arange(5)).tolist() == list(range(5))

        cfg = TrainConfig(image_size=64, batch_size=8, lr=1e-3)
        model = build_model("efficientnet_lite0").to(dev).to(memory_format=torch.channels_last)
        frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
        trained = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        bn = {k: v.clone() for k, v in model.named_buffers() if "running_mean" in k}
        params = [p for p in model.parameters() if p.requires_grad]
        stepper = Stepper(cfg, model, torch.optim.SGD(params, lr=cfg.lr), c.to(dev), dev)
        assert isinstance(stepper.net, torch.nn.parallel.DistributedDataParallel)
        model.train()
        losses = [float(stepper(_images(8, 64, 10 + i).to(dev))) for i in range(3)]
        assert all(torch.isfinite(torch.tensor(losses)))
        named = dict(model.named_parameters())
        assert all(torch.equal(named[k], v) for k, v in frozen.items())  # first half frozen
        assert any(not torch.equal(named[k], v) for k, v in trained.items())  # the rest moved
        bufs = dict(model.named_buffers())
        assert all(torch.equal(bufs[k], v) for k, v in bn.items())  # BatchNorm stays in eval mode
    finally:
        tdist.destroy_process_group()


def _unit_np(rng, n, d):
    import numpy as np

    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat"])
def test_faiss_index_on_gpu_equals_cpu(tmp_path, factory):
    """load_index(use_gpu=True): Flat -> the exact two-stage search in torch; IVF -> every
    sub-index cloned to the GPUs (FAISS GPU build). Same neighbours and distances as the CPU."""
    import numpy as np

    pytest.importorskip("faiss", reason="carry the faiss_cpu (or faiss_gpu) wheel, see infra/gpu-check.sh")
    from msc_dist.index import ExactTwoStage, load_index, write_index

    rng = np.random.default_rng(0)
    x, q = _unit_np(rng, 50_000, 256), _unit_np(rng, 2_000, 256)
    write_index(str(tmp_path), x, [str(i) for i in range(len(x))], "m", num_shards=3, factory=factory, k=4)
    cpu, gpu = load_index(str(tmp_path), "m"), load_index(str(tmp_path), "m", use_gpu=True)
    if factory == "Flat":
        assert isinstance(gpu.index, ExactTwoStage) and gpu.index.device.type == "cuda"
    else:
        import faiss

        if not hasattr(faiss, "StandardGpuResources"):
            pytest.skip("faiss-cpu installed: the IVF GPU path needs the 'gpu' extra")
        assert gpu._gpu is not None and len(gpu._gpu[1]) == 3  # three sub-indexes cloned, not the wrapper
        for s in cpu._subs + gpu._gpu[1]:  # probe every list: both searches exhaustive
            space = faiss.GpuParameterSpace() if type(s).__name__.startswith("Gpu") else faiss.ParameterSpace()
            space.set_index_parameter(s, "nprobe", 64)
        assert any(type(s).__name__.startswith("Gpu") for s in gpu._gpu[1])
    dc, rc = cpu.search(q, 4)
    dg, rg = gpu.search(q, 4)
    np.testing.assert_allclose(dg, dc, atol=1e-4)
    same = (rg == rc).mean()
    print(f"{factory}: GPU == CPU neighbours {same:.5f}" + (f", fallback {gpu.index.stats}" if factory == "Flat" else ""))
    assert same > 0.999  # the rest: float ties between GPU and CPU summation orders


def test_exact_two_stage_on_gpu_equals_float64():
    import numpy as np

    from msc_dist.index import ExactTwoStage

    rng = np.random.default_rng(1)
    x, q = _unit_np(rng, 200_000, 2048), _unit_np(rng, 1_000, 2048)
    x[100_000:100_050] = x[:50] + 1e-3 * _unit_np(rng, 50, 2048)  # near-duplicates: forces the fallback
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q[:50] = x[:50]
    idx = ExactTwoStage(x, device="cuda")
    sims, rows = idx.search(q, 2)
    ref = torch.from_numpy(q).double().cuda() @ torch.from_numpy(x).double().cuda().T
    rs, rr = torch.topk(ref, 2, dim=1)
    np.testing.assert_allclose(sims, rs.cpu().numpy(), atol=1e-5)
    assert (rows == rr.cpu().numpy()).mean() > 0.999
    print("two-stage on GPU:", idx.stats)
