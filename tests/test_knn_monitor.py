"""The k-NN monitor's sharded bank: 2 gloo ranks, each keeping only its shard of the training features, give the
same top-1/top-5 as one process holding the whole bank (planted features, uneven shards and query counts)."""

import json
import os

import torch
import torch.nn.functional as F

from tests.conftest import free_port

N_TRAIN, N_VAL, DIM, CLASSES, K = 61, 23, 16, 5, 7
SPLIT_TRAIN, SPLIT_VAL = (35, 26), (14, 9)  # uneven on purpose: shards and query rounds differ by rank


def planted():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=g)
    ty = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    vy = torch.randint(0, CLASSES, (N_VAL,), generator=g)
    # noisy enough that k-NN is right on some queries only: top-1 tests the neighbours, not the planting
    tx = centres[ty] + 1.5 * torch.randn(N_TRAIN, DIM, generator=g)
    vx = centres[vy] + 1.5 * torch.randn(N_VAL, DIM, generator=g)
    return tx.half(), ty, vx.half(), vy  # fp16, as extract() returns them


def reference(tx, ty, vx, vy, k=K, t=0.07):
    """The whole bank in one process (the computation before sharding)."""
    bank, q = F.normalize(tx.float(), dim=1), F.normalize(vx.float(), dim=1)
    sim, idx = (q @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(q), CLASSES).scatter_add_(1, ty[idx], (sim / t).exp())
    top = votes.topk(5, dim=1).indices
    return (100 * (top[:, 0] == vy).sum().item() / len(vy), 100 * (top == vy[:, None]).any(1).sum().item() / len(vy))


def _rank(rank, world, port, out):
    import torch.distributed as dist

    from megadigpt.train.probe import knn_classify

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tx, ty, vx, vy = planted()
    a, b = sum(SPLIT_TRAIN[:rank]), sum(SPLIT_TRAIN[:rank + 1])
    c, d = sum(SPLIT_VAL[:rank]), sum(SPLIT_VAL[:rank + 1])
    r = knn_classify(tx[a:b], ty[a:b], vx[c:d], vy[c:d], CLASSES, k=K, chunk=4)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(r, f)
    dist.destroy_process_group()


def test_sharded_knn_equals_whole_bank(tmp_path):
    import torch.multiprocessing as mp

    from megadigpt.train.probe import knn_classify

    tx, ty, vx, vy = planted()
    top1, top5 = reference(tx, ty, vx, vy)
    assert 20 < top1 < 100  # a test of the neighbours: neither trivial nor hopeless
    one = knn_classify(tx, ty, vx, vy, CLASSES, k=K, chunk=4)  # one process, several query rounds
    assert abs(one["top1"] - top1) < 1e-9 and abs(one["top5"] - top5) < 1e-9 and one["bank_rows"] == N_TRAIN

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert abs(r["top1"] - top1) < 1e-9 and abs(r["top5"] - top5) < 1e-9, (rank, r, top1, top5)
        assert r["bank_rows"] == SPLIT_TRAIN[rank]  # each rank held its shard only, not the gathered bank
