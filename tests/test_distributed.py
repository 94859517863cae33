"""SAM under DDP on gloo with two CPU processes, against one process and against hand computations.

The two processes run every scenario once (one spawn, module-scoped fixture) and save what they end with;
the tests compare that with the single-process step or an explicit per-shard computation done here.
"""

import copy
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sam_runner.data import BatchStream
from sam_runner.errors import ConfigError
from sam_runner.optim import SAM
from sam_runner.scale import distributed, torchrun_env
from sam_runner.scale.distributed import RankShare, World, shard
from sam_runner.steps import train_step

WORLD_SIZE = 2
RHO = 0.1
GLOBAL_BATCHES = [(0, 12), (12, 24), (24, 31)]  # rows of the data; the last batch (7) splits unevenly, 4 + 3
LOCAL_BATCHES = [(0, 12), (12, 19)]
MICRO_BATCHES = [(0, 12), (12, 20)]  # local mode with micro_batch_size=3: shards 6+6, then 4+4


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(31, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (31,), generator=g)


def _mlp(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = nn.BatchNorm1d(8) if batchnorm else nn.Tanh()
    return nn.Sequential(nn.Linear(5, 8), middle, nn.ReLU() if batchnorm else nn.Identity(), nn.Linear(8, 3)).double()


def _momentum_sam(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _plain_sam(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.2)


# ---------------------------------------------------------------------------------------------------------
# What the two processes run.

def _train(world: World, sam_mode: str, batches, make_optimizer, **options) -> dict[str, torch.Tensor]:
    x, y = _data()
    model = distributed.wrap_model(_mlp(), world)
    optimizer = make_optimizer(model)
    for start, stop in batches:
        distributed.distributed_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(), world,
                                     sam_mode=sam_mode, **options)
    return distributed.unwrap(model).state_dict()


def _batchnorm_after_one_step(world: World, sam_mode: str) -> dict[str, dict[str, torch.Tensor]]:
    x, y = _data()
    model = distributed.wrap_model(_mlp(batchnorm=True), world)
    distributed.distributed_step(model, x[:12], y[:12], _plain_sam(model), nn.CrossEntropyLoss(), world,
                                 sam_mode=sam_mode)
    own = copy.deepcopy(distributed.unwrap(model)[1].state_dict())
    distributed.broadcast_buffers(model, world)
    return {"own": own, "broadcast": distributed.unwrap(model)[1].state_dict()}


def _allreduces_per_step(world: World, make_optimizer, sam_mode: str, accumulate: int) -> int:
    """How many bucket all-reduces one step on a batch of 12 makes (a comm hook counts them)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    x, y = _data()
    model = distributed.wrap_model(_mlp(), world)
    calls = []

    def counted(state, bucket):
        calls.append(1)
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, counted)
    distributed.distributed_step(model, x[:12], y[:12], make_optimizer(model), nn.CrossEntropyLoss(), world,
                                 sam_mode=sam_mode, accumulate=accumulate)
    return len(calls)


def _momentum_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _evaluation_sums(world: World) -> torch.Tensor:
    x, y = _data()
    model = _mlp()
    stream = BatchStream(x[:13], y[:13], batch_size=5, shuffle=False, seed=0, device="cpu")  # batches 5, 5, 3
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for inputs, targets in RankShare(stream, world).epoch(0):
            logits = model(inputs.double())
            total += torch.stack([F.cross_entropy(logits, targets, reduction="sum"),
                                  (logits.argmax(1) == targets).sum().double()])
    return distributed.all_reduce_sum(total, world)


def _work(world: World) -> dict:
    return {
        "world": (world.rank, world.world_size, world.is_main),
        "global": _train(world, "global", GLOBAL_BATCHES, _momentum_sam, max_grad_norm=0.5),
        "local": _train(world, "local", LOCAL_BATCHES, _plain_sam),
        "local_micro": _train(world, "local", MICRO_BATCHES, _plain_sam, micro_batch_size=3),
        "global_accumulate": _train(world, "global", GLOBAL_BATCHES, _momentum_sam, max_grad_norm=0.5,
                                    accumulate=2),  # the last batch's shards 4 + 3: micro-batches 2+2, 2+1
        "local_accumulate": _train(world, "local", LOCAL_BATCHES, _plain_sam, accumulate=3),
        "plain_accumulate": _train(world, "global", GLOBAL_BATCHES, _momentum_sgd, accumulate=3),
        "allreduces": {(name, mode, k): _allreduces_per_step(world, make, mode, k)
                       for name, make in (("sgd", _momentum_sgd), ("sam", _plain_sam))
                       for mode in ("global", "local") for k in (1, 3)},
        "bn_global": _batchnorm_after_one_step(world, "global"),
        "bn_local": _batchnorm_after_one_step(world, "local"),
        "evaluation": _evaluation_sums(world),
    }


def _rank_main(rank: int, work: Callable[[World], dict], port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what torchrun sets for each worker
    with distributed.process_group(torch.device("cpu")) as world:
        results = work(world)
    results["group_left"] = not torch.distributed.is_initialized()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def results_of_each_rank(work: Callable[[World], dict], out_dir: Path) -> list[dict]:
    """`work` (a module-level function) in WORLD_SIZE gloo processes on the CPU, joined as under torchrun: what it
    returned on each rank (with `group_left`: whether the process group was gone afterwards)."""
    torch.multiprocessing.spawn(_rank_main, args=(work, _free_port(), str(out_dir)), nprocs=WORLD_SIZE)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return results_of_each_rank(_work, tmp_path_factory.mktemp("ddp"))


def _assert_same_weights(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------------
# (a) global: two processes equal one process running SAM on the whole global batch.

def test_global_mode_equals_single_process_sam_on_the_global_batch(ranks):
    x, y = _data()
    model = _mlp()
    optimizer = _momentum_sam(model)
    for start, stop in GLOBAL_BATCHES:
        train_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(), max_grad_norm=0.5)
    moved = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), _mlp().state_dict().values()))
    assert moved
    for rank in ranks:
        _assert_same_weights(rank["global"], model.state_dict())


def test_accumulation_under_ddp_equals_single_process_one_piece_steps(ranks):
    """Global SAM with clipping and plain SGD, each rank's shard in micro-batches: the one-process, one-piece steps."""
    x, y = _data()
    for key, make_optimizer, options in (("global_accumulate", _momentum_sam, dict(max_grad_norm=0.5)),
                                         ("plain_accumulate", _momentum_sgd, {})):
        model = _mlp()
        optimizer = make_optimizer(model)
        for start, stop in GLOBAL_BATCHES:
            train_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(), **options)
        for rank in ranks:
            _assert_same_weights(rank[key], model.state_dict())


def test_accumulation_all_reduces_once_per_pass_not_per_micro_batch(ranks):
    counts = ranks[0]["allreduces"]
    for name in ("sgd", "sam"):
        for mode in ("global", "local"):
            assert counts[(name, mode, 3)] == counts[(name, mode, 1)] > 0, (name, mode)
    assert counts[("sam", "global", 1)] == 2 * counts[("sgd", "global", 1)]  # SAM: the clean and perturbed pass
    assert counts[("sam", "local", 1)] == counts[("sgd", "global", 1)]  # local: the clean pass stays on the rank


def test_processes_join_as_torchrun_describes_and_leave(ranks):
    assert [r["world"] for r in ranks] == [(0, 2, True), (1, 2, False)]
    assert all(r["group_left"] for r in ranks)


# ---------------------------------------------------------------------------------------------------------
# (b) local: each shard's own ε, perturbed gradients averaged — written out here with plain autograd.

def _explicit_local_sam(batches_of_chunks: list[list[tuple[int, int]]], lr: float = 0.2) -> dict:
    """w ← w − lr · Σ_c (n_c / n) ∇L_c(w + ε_c), ε_c = ρ ∇L_c(w) / ‖∇L_c(w)‖, for each batch's chunks."""
    x, y = _data()
    model = _mlp()
    params = list(model.parameters())

    def gradient(rows: slice) -> list[torch.Tensor]:
        return list(torch.autograd.grad(F.cross_entropy(model(x[rows]), y[rows]), params))

    for chunks in batches_of_chunks:
        n = chunks[-1][1] - chunks[0][0]
        update = [torch.zeros_like(p) for p in params]
        for start, stop in chunks:
            g = gradient(slice(start, stop))
            scale = RHO / (math.sqrt(sum(float((t ** 2).sum()) for t in g)) + 1e-12)
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(scale * t)
            g_perturbed = gradient(slice(start, stop))
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.sub_(scale * t)
                for u, t in zip(update, g_perturbed):
                    u.add_((stop - start) / n * t)
        with torch.no_grad():
            for p, u in zip(params, update):
                p.sub_(lr * u)
    return model.state_dict()


def test_local_mode_equals_the_explicit_per_shard_computation(ranks):
    # batch 12 → shards 6 + 6; batch 7 → 4 + 3 (weighted 4/7 and 3/7)
    expected = _explicit_local_sam([[(0, 6), (6, 12)], [(12, 16), (16, 19)]])
    for rank in ranks:
        _assert_same_weights(rank["local"], expected)


def test_local_mode_with_micro_batches_gives_each_chunk_of_each_shard_its_own_epsilon(ranks):
    # batch 12 → shards 6 + 6 → chunks of 3; batch 8 → shards 4 + 4 → chunks 3 + 1 on each rank
    expected = _explicit_local_sam([[(0, 3), (3, 6), (6, 9), (9, 12)], [(12, 15), (15, 16), (16, 19), (19, 20)]])
    for rank in ranks:
        _assert_same_weights(rank["local_micro"], expected)


def test_local_mode_with_accumulation_keeps_each_shard_s_epsilon(ranks):
    expected = _explicit_local_sam([[(0, 6), (6, 12)], [(12, 16), (16, 19)]])
    for rank in ranks:
        _assert_same_weights(rank["local_accumulate"], expected)


def test_local_and_global_modes_differ(ranks):
    global_sam = _explicit_local_sam([[(0, 12)], [(12, 19)]])  # one ε per global batch
    assert not torch.allclose(ranks[0]["local"]["0.weight"], global_sam["0.weight"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# (c) BatchNorm statistics: each rank's clean pass on its own shard, never the perturbed pass.

@pytest.mark.parametrize("mode", ["global", "local"])
def test_batchnorm_statistics_are_the_clean_pass_on_each_rank(ranks, mode):
    x, _ = _data()
    for rank, rows in zip(ranks, (slice(0, 6), slice(6, 12))):
        clean_only = _mlp(batchnorm=True).train()
        with torch.no_grad():
            clean_only(x[rows])
        expected = clean_only[1].state_dict()
        own = rank[f"bn_{mode}"]["own"]
        assert int(own["num_batches_tracked"]) == 1
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(own[name], expected[name], rtol=1e-12, atol=1e-14)
    for rank in ranks:  # before evaluation every rank takes rank 0's statistics
        for name, value in rank[f"bn_{mode}"]["broadcast"].items():
            assert torch.equal(value, ranks[0][f"bn_{mode}"]["own"][name])


def test_sharded_evaluation_sums_to_the_whole_set(ranks):
    x, y = _data()
    with torch.no_grad():
        logits = _mlp()(x[:13].float().double())  # BatchStream holds float32 inputs
    expected = torch.stack([F.cross_entropy(logits, y[:13], reduction="sum"), (logits.argmax(1) == y[:13]).sum().double()])
    for rank in ranks:
        torch.testing.assert_close(rank["evaluation"], expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# (d) Sharding, without processes.

@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [7, 12, 13, 64])
def test_shards_concatenate_to_the_global_batch(world_size, n):
    if n < world_size:
        pytest.skip("refused by check_setup")
    x, y = torch.arange(n * 2).view(n, 2), torch.arange(n)
    parts = [shard(x, y, World(rank=r, world_size=world_size)) for r in range(world_size)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    sizes = [len(p[1]) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # what DDP does with the weighted shard means (averages them over ranks) is the global batch's mean
    per_sample = torch.rand(n, dtype=torch.float64)
    weighted = [w * per_sample[t].mean() for _, t, w in parts]
    assert float(sum(weighted)) / world_size == pytest.approx(float(per_sample.mean()), rel=1e-12)
    assert all(w == 1.0 for *_, w in parts) == (n % world_size == 0)


def test_rank_share_of_a_stream_covers_every_sample_once():
    stream = BatchStream(torch.arange(11.0).view(11, 1), torch.arange(11), batch_size=4, shuffle=True, seed=3,
                         device="cpu")
    seen = [t for r in range(3) for _, targets in RankShare(stream, World(rank=r, world_size=3)).epoch(2)
            for t in targets.tolist()]
    assert sorted(seen) == list(range(11))
    assert RankShare(stream, World(rank=1, world_size=3)).num_samples == 11


def test_an_empty_shard_is_refused():
    with pytest.raises(ConfigError, match="leaves rank 2 of 3 without any"):
        shard(torch.zeros(2, 1), torch.zeros(2), World(rank=2, world_size=3))


# ---------------------------------------------------------------------------------------------------------
# One process: nothing changes.

def _torchrun_env(monkeypatch, **env: str) -> None:
    for name in torchrun_env.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_single_process_world_changes_nothing(monkeypatch):
    _torchrun_env(monkeypatch)
    with distributed.process_group(torch.device("cpu")) as world:
        assert (world.rank, world.world_size, world.is_main, world.is_distributed) == (0, 1, True, False)
        assert not torch.distributed.is_initialized()
        x, y = _data()
        models = [_mlp(batchnorm=True), _mlp(batchnorm=True)]
        assert distributed.wrap_model(models[0], world) is models[0]
        optimizers = [_momentum_sam(m) for m in models]
        for start, stop in GLOBAL_BATCHES:
            reference = train_step(models[0], x[start:stop], y[start:stop], optimizers[0], nn.CrossEntropyLoss(),
                                   micro_batch_size=5)
            result = distributed.distributed_step(models[1], x[start:stop], y[start:stop], optimizers[1],
                                                  nn.CrossEntropyLoss(), world, sam_mode="local", micro_batch_size=5)
            assert torch.equal(result.loss, reference.loss)
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            assert torch.equal(a, b)
        assert torch.equal(distributed.all_reduce_sum(torch.ones(2), world), torch.ones(2))
        assert distributed.describe_world(world, sam_mode="local", sync_batchnorm=True, is_sam=True) == \
            {"world_size": 1, "ddp_sam_mode": None, "sync_batchnorm": False}
        distributed.check_setup(world, batch_size=1, num_samples=7, sam_mode="global", micro_batch_size=3)


def test_torchrun_with_one_process_is_the_single_process_world(monkeypatch):
    _torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with distributed.process_group(torch.device("cpu")) as world:
        assert world == World()
        assert not torch.distributed.is_initialized()


def test_describe_world_records_mode_and_size():
    two = World(rank=1, world_size=2)
    assert distributed.describe_world(two, sam_mode="local", sync_batchnorm=False, is_sam=True) == \
        {"world_size": 2, "ddp_sam_mode": "local", "sync_batchnorm": False}
    assert distributed.describe_world(two, sam_mode="global", sync_batchnorm=False, is_sam=False)["ddp_sam_mode"] is None


# ---------------------------------------------------------------------------------------------------------
# Bad setups: one clear line each.

@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "2"}, "torchrun's RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not"),
    ({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "integers"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "out of range"),
])
def test_broken_torchrun_environment_is_refused(monkeypatch, env, match):
    _torchrun_env(monkeypatch, **env)
    with pytest.raises(ConfigError, match=match):
        with distributed.process_group(torch.device("cpu")):
            pass
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("options, match", [
    (dict(sam_mode="sharp"), "unknown DDP SAM mode 'sharp'"),
    (dict(batch_size=3), "batch_size=3 leaves some of the 4 processes without samples"),
    (dict(num_samples=66), "the last batch of each epoch has 2 samples"),
    (dict(micro_batch_size=4), "global SAM mode would perturb with chunks pooled"),
    (dict(sam_mode="local", micro_batch_size=4, num_samples=70), "last batch of 6 must be multiples of 4"),
    (dict(sam_mode="local", micro_batch_size=4, batch_size=30, num_samples=60), "batch_size=30"),
    (dict(sync_batchnorm=True), "sync_batchnorm needs CUDA"),
    (dict(compile=True), "compile=true is not supported over several processes"),
])
def test_setups_the_distributed_step_cannot_do_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        distributed.check_setup(World(world_size=4), **{**dict(batch_size=64, num_samples=128, sam_mode="global"),
                                                        **options})


def test_sync_batchnorm_is_refused_with_local_mode():
    cuda_world = World(world_size=2, device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="pools BatchNorm statistics"):
        distributed.check_setup(cuda_world, batch_size=8, num_samples=16, sam_mode="local", sync_batchnorm=True)


def test_uneven_shards_are_allowed_without_micro_batches():
    distributed.check_setup(World(world_size=4), batch_size=30, num_samples=70, sam_mode="local")


def test_more_processes_than_gpus_is_refused(monkeypatch):
    _torchrun_env(monkeypatch, RANK="1", WORLD_SIZE="2", LOCAL_RANK=str(torch.cuda.device_count()),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with pytest.raises(ConfigError, match=r"--nproc_per_node <= \d"):
        with distributed.process_group(torch.device("cuda")):
            pass
