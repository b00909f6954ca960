"""Searching on the GPU: the sub-indexes of a version placed on the GPUs (FAISS GPU clones),
or, for a Flat index, one exact two-stage search in torch."""

from __future__ import annotations

import logging

import numpy as np

from msc_dist.index.versions import IndexManifest

log = logging.getLogger(__name__)


def _cpu_shards(d: int, subs: list):
    import faiss

    shards = faiss.IndexShards(d, True, True)  # threaded, successive ids
    for s in subs:
        shards.add_shard(s)
    return shards


def clone_subs(d: int, subs: list, clone) -> tuple[object, list]:
    """An ``IndexShards`` over ``clone(i, sub)`` of every sub-index (the clone of each sub-index,
    never of a wrapper: FAISS has no GPU clone of ``IndexShards``). A sub-index that ``clone``
    cannot place (a type with no GPU version) stays as it is, with a warning."""
    placed = []
    for i, s in enumerate(subs):
        try:
            placed.append(clone(i, s))
        except RuntimeError as e:
            log.warning("index shard %d (%s) stays on the CPU: %s", i, type(s).__name__, str(e).splitlines()[0])
            placed.append(s)
    return _cpu_shards(d, placed), placed


def place_subs(man: IndexManifest, subs: list, use_gpu: bool) -> tuple[object, object]:
    """(searchable index, objects to keep alive with it). On the CPU: ``IndexShards`` over the
    sub-indexes. With ``use_gpu`` and CUDA: a Flat index becomes one ``ExactTwoStage`` over all
    its vectors (exact, float32 results, needs only torch); other factories are cloned to the
    GPUs sub-index by sub-index when a FAISS GPU build is installed (else they stay on the CPU)."""
    if not use_gpu:
        return _cpu_shards(man.dimension, subs), None
    import torch

    if man.factory == "Flat" and torch.cuda.is_available():
        z = np.concatenate([s.reconstruct_n(0, s.ntotal) for s in subs])
        return ExactTwoStage(z, device="cuda"), None
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        log.warning("use_gpu: no FAISS GPU build or no GPU visible (install the 'gpu' extra); searching on the CPU")
        return _cpu_shards(man.dimension, subs), None
    ngpu = faiss.get_num_gpus()
    res = [faiss.StandardGpuResources() for _ in range(ngpu)]
    index, placed = clone_subs(man.dimension, subs, lambda i, s: faiss.index_cpu_to_gpu(res[i % ngpu], i % ngpu, s))
    return index, (res, placed)


def _low_precision_error(dtype, d: int) -> float:
    """A bound on |approximate - exact| inner product of two vectors of norm <= 1, when both are
    rounded to ``dtype`` (unit roundoff u), multiplied with float32 accumulation and the result
    rounded to ``dtype``: 2u + u^2 for the inputs, u for the output, d * 2^-24 for the sum; times
    2 for safety (accumulation order and fused steps differ between kernels)."""
    import torch

    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    return 2.0 * (3 * u + 2 * u * u + d * 2.0 ** -24)


class ExactTwoStage:
    """Exact top-k by inner product with a low-precision first pass, for unit vectors.

    1. A float16 (bfloat16 on the CPU) matmul of the queries with the whole bank and a top-(c+1):
       c candidates per query and b, the best approximate score left out.
    2. An exact float32 re-rank of the c candidates (products summed elementwise in float32, no
       TF32) and their top-k.
    3. Certification: every approximate score is within ``eps`` of the exact one
       (``_low_precision_error``), so a vector left out has an exact score <= b + eps. Where the
       k-th exact score among the candidates is above b + eps the answer is exact; every other
       query is searched again exactly in float32 over the whole bank.

    ``search`` has the FAISS signature: (sims float32, rows int64) as NumPy arrays, best first.
    ``stats`` counts queries and the ones that took the float32 path."""

    def __init__(self, vectors: np.ndarray, device: str = "cuda", dtype=None, candidates: int = 32,
                 max_scores_bytes: int = 4 << 30):
        import torch

        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.bfloat16)
        if self.device.type == "cuda":  # the error bound assumes float32 accumulation in the low-precision matmul
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        self.ntotal, self.d = int(x.shape[0]), int(x.shape[1])
        self.max_norm = float(x.norm(dim=1).max()) if self.ntotal else 0.0
        self.x32 = x
        self.xlo = x.to(self.dtype)
        self.candidates = candidates
        self.max_scores_bytes = max_scores_bytes
        self.stats = {"queries": 0, "exact_fallback": 0}

    def _exact_full(self, q):
        import torch

        old = torch.get_float32_matmul_precision()
        if old == "highest":
            return q @ self.x32.T
        torch.set_float32_matmul_precision("highest")  # no TF32
        try:
            return q @ self.x32.T
        finally:
            torch.set_float32_matmul_precision(old)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = np.ascontiguousarray(q, dtype=np.float32)
        m = q.shape[0]
        sims = np.full((m, k), -np.inf, np.float32)
        rows = np.full((m, k), -1, np.int64)
        if m == 0 or self.ntotal == 0:
            return sims, rows
        kk = min(k, self.ntotal)
        c = min(max(self.candidates, kk), self.ntotal)
        chunk = max(1, min(4096, self.max_scores_bytes // max(1, 2 * self.ntotal)))  # (chunk, N) low-precision scores
        with torch.no_grad():
            for s in range(0, m, chunk):
                qt = torch.from_numpy(q[s:s + chunk]).to(self.device)
                if c == self.ntotal:  # the bank is no larger than the candidate list: all exact
                    top, idx = torch.topk(self._exact_full(qt), kk, dim=1)
                    sims[s:s + len(qt), :kk], rows[s:s + len(qt), :kk] = top.cpu().numpy(), idx.cpu().numpy()
                    continue
                approx = qt.to(self.dtype) @ self.xlo.T  # (B, N) low precision
                av, ai = torch.topk(approx, c + 1, dim=1)
                b = av[:, c].float()  # the best approximate score left out
                cand = ai[:, :c]
                exact = (self.x32[cand] * qt[:, None, :]).sum(dim=2)  # (B, c) float32
                top, pos = torch.topk(exact, kk, dim=1)
                idx = torch.gather(cand, 1, pos)
                eps = _low_precision_error(self.dtype, self.d) * self.max_norm * qt.norm(dim=1)
                bad = ~(top[:, kk - 1] > b + eps)
                nbad = int(bad.sum())
                if nbad:
                    ftop, fidx = torch.topk(self._exact_full(qt[bad]), kk, dim=1)
                    top[bad], idx[bad] = ftop, fidx
                self.stats["queries"] += len(qt)
                self.stats["exact_fallback"] += nbad
                sims[s:s + len(qt), :kk], rows[s:s + len(qt), :kk] = top.cpu().numpy(), idx.cpu().numpy()
        return sims, rows
