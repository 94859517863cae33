"""Data: CIFAR through torchvision's real reader on files written here, MNIST-1D, plug-ins, BatchStream, dataset YAMLs."""
from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_json, run_in_process
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from sam_runner import data
from sam_runner.errors import ConfigError, DataError

DATASET_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"

# ----------------------------------------------------------------------------------------------- CIFAR

CIFAR = {  # builder -> (folder, train files, test files, label key, meta file, meta key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names", 100),
}


def write_cifar(root: Path, name: str, per_file: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny CIFAR in torchvision's on-disk format: pickled dicts, data uint8 (N, 3072) as R, G, B planes."""
    folder, train_files, test_files, label_key, meta_file, meta_key, classes = CIFAR[name]
    directory = root / folder
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, files in (("train", train_files), ("test", test_files)):
        pixels, labels = [], []
        for file in files:
            batch = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
            batch[0, :3] = (0, 255, 128)  # the extremes must come back as exactly 0 and 1
            batch_labels = rng.integers(0, classes, size=per_file).tolist()
            entry = {"data": batch, label_key: batch_labels}
            if name == "cifar100":
                entry["coarse_labels"] = [label // 5 for label in batch_labels]
            (directory / file).write_bytes(pickle.dumps(entry))
            pixels.append(batch)
            labels += batch_labels
        written[split] = (np.concatenate(pixels), labels)
    (directory / meta_file).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]}))
    return written


@pytest.fixture
def skip_md5(monkeypatch):
    """Our files cannot match the real md5 sums; keep torchvision's existence checks, skip only the hash."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_loads_pixels_and_labels_exactly(tmp_path, skip_md5, name):
    written = write_cifar(tmp_path, name)
    train, test = getattr(data, name)(str(tmp_path), download=False)
    for dataset, (pixels, labels) in ((train, written["train"]), (test, written["test"])):
        inputs, targets = data.materialize(dataset)
        assert inputs.shape == (len(labels), 3, 32, 32) and inputs.dtype == torch.float32
        expected = torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float() / 255
        assert torch.equal(inputs, expected)
        assert inputs.min() == 0 and inputs.max() == 1
        assert targets.tolist() == labels
        x, y = dataset[0]
        assert isinstance(y, int) and x.shape == (3, 32, 32)
    assert len(train) == 3 * len(CIFAR[name][1])


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_missing_without_download_says_where_and_how(tmp_path, name):
    with pytest.raises(DataError) as error:
        getattr(data, name)(str(tmp_path), download=False)
    message = str(error.value)
    folder = CIFAR[name][0]
    assert str(tmp_path) in message and folder in message and "data_dir=" in message
    assert "download=true" in message and "\n" not in message


def test_cifar_failed_download_is_a_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not be downloaded .*name resolution.*cifar-10-python.tar.gz"):
        data.cifar10(str(tmp_path), download=True)


# ----------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_shapes_split_and_determinism():
    train, test = data.mnist1d(num_samples=500)
    (x, y), (xt, _) = data.materialize(train), data.materialize(test)
    assert x.shape == (400, 1, 40) and xt.shape == (100, 1, 40)
    assert data.infer_num_classes(y) == 10 and set(y.tolist()) == set(range(10))
    again = data.mnist1d(num_samples=500)[0].tensors
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, data.mnist1d(num_samples=500, seed=7)[0].tensors[0])


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(3)
    random.seed(3)
    expected = (np.random.rand(), random.random())
    np.random.seed(3)
    random.seed(3)
    data.mnist1d(num_samples=100)
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_cache_round_trip(tmp_path, monkeypatch):
    first = data.mnist1d(num_samples=200, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".pt")  # no temporary file left behind

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr("mnist1d.data.make_dataset", no_generation)
    second = data.mnist1d(num_samples=200, cache_dir=str(tmp_path))
    for a, b in zip(first, second):
        assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("content", [b"not a torch file", b""])
def test_a_corrupt_mnist1d_cache_is_regenerated_with_a_warning(tmp_path, content):
    first = data.mnist1d(num_samples=200, cache_dir=str(tmp_path))
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="unreadable.*generating the data again"):
        again = data.mnist1d(num_samples=200, cache_dir=str(tmp_path))
    for a, b in zip(first, again):
        assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))
    assert data.mnist1d(num_samples=200, cache_dir=str(tmp_path))  # the rewritten cache reads cleanly


def test_mnist1d_rejects_a_bad_split():
    with pytest.raises(DataError, match="train_split"):
        data.mnist1d(num_samples=100, train_split=1.0)


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    train, test = data.synthetic(num_train=200, num_test=100, input_shape=(1, 40), num_classes=4, seed=5)
    x, y = data.materialize(train)
    assert x.shape == (200, 1, 40) and data.infer_num_classes(y) == 4
    assert torch.equal(x, data.synthetic(num_train=200, num_test=100, num_classes=4, seed=5)[0].tensors[0])
    means = torch.stack([x[y == k].mean(0) for k in range(4)]).flatten(1)  # nearest class mean
    xt, yt = data.materialize(test)
    predicted = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (predicted == yt).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------- plug-ins


class ListDataset(Dataset):
    """A user's Dataset: plain Python items, nothing of ours."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_materialize_stacks_a_plugin_dataset():
    items = [(torch.full((2, 3), float(i)), i % 3) for i in range(10)]
    inputs, targets = data.materialize(ListDataset(items))
    assert inputs.shape == (10, 2, 3) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
    assert torch.equal(inputs[:, 0, 0], torch.arange(10.0)) and targets.tolist() == [i % 3 for i in range(10)]
    tensor_labels = [(x, torch.tensor(y)) for x, y in items]
    assert torch.equal(data.materialize(ListDataset(tensor_labels))[1], targets)


@pytest.mark.parametrize("item, problem", [
    (torch.zeros(3), "item of type Tensor"),
    ((np.zeros(3, dtype=np.float32), 1), "float tensor"),
    ((torch.zeros(3, dtype=torch.uint8), 1), "float tensor"),
    ((torch.zeros(3), 0.5), "class index"),
])
def test_materialize_rejects_items_that_break_the_contract(item, problem):
    with pytest.raises(DataError, match=rf"\(float tensor, int label\).*{problem}"):
        data.materialize(ListDataset([item, item]))


def test_materialize_rejects_ragged_inputs():
    with pytest.raises(DataError, match="same input shape"):
        data.materialize(ListDataset([(torch.zeros(3), 0), (torch.zeros(4), 1)]))


def test_infer_num_classes_rejects_negative_labels():
    assert data.infer_num_classes(torch.tensor([0, 4, 2])) == 5
    with pytest.raises(DataError):
        data.infer_num_classes(torch.tensor([-1, 0]))


def test_plugin_dataset_and_model_through_target(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plug-in is a module on the path, named for this test alone: no other test imports it from sys.modules."""
    plugin = f"plugin_{uuid.uuid4().hex}"
    (workdir / f"{plugin}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        class Pairs(TensorDataset):
            def __getitem__(self, index):
                x, y = super().__getitem__(index)
                return x, int(y)

        def make_data(size=96):
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(size, 6, generator=generator)
            y = (x[:, 0] > 0).long()
            return Pairs(x[:64], y[:64]), Pairs(x[64:], y[64:])

        class Net(nn.Module):
            def __init__(self, num_classes, input_shape, hidden=8):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

            def forward(self, x):
                return self.body(x)
    """))
    monkeypatch.syspath_prepend(workdir)
    run_dir = run_in_process(workdir, monkeypatch, "dataset=custom", f"dataset.source._target_={plugin}.make_data",
                             "model=custom", f"model._target_={plugin}.Net", "+model.hidden=4", "epochs=1",
                             "batch_size=16", "sharpness.measures=[]")
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["model"] == "custom"


# ----------------------------------------------------------------------------------------------- BatchStream

AUGMENT = {"crop_padding": 2, "horizontal_flip": True}
NORMALIZE = {"mean": [0.1, 0.5, 0.9], "std": [0.5, 0.25, 2.0]}


def stream(n: int = 103, batch_size: int = 10, **options) -> data.BatchStream:
    """Random 3x8x8 images whose target is the sample id, so the targets show which samples were served."""
    inputs = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(batch_size=batch_size, shuffle=True, seed=11, device="cpu") | options
    return data.BatchStream(inputs, torch.arange(n), **settings)


@pytest.mark.parametrize("drop_last, batches, served", [(False, 11, 103), (True, 10, 100)])
def test_every_sample_at_most_once_per_epoch(drop_last, batches, served):
    s = stream(drop_last=drop_last, augment=AUGMENT)
    assert len(s) == batches
    ids = torch.cat([y for _, y in s.epoch(4)])
    assert len(ids) == served and len(set(ids.tolist())) == served
    if not drop_last:
        assert sorted(ids.tolist()) == list(range(103))


def test_epoch_is_a_pure_function_of_seed_and_epoch():
    a, b = stream(augment=AUGMENT), stream(augment=AUGMENT)
    for (xa, ya), (xb, yb) in zip(a.epoch(2), b.epoch(2)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = torch.cat([y for _, y in a.epoch(2)])
    assert not torch.equal(order, torch.cat([y for _, y in a.epoch(3)]))
    assert not torch.equal(order, torch.cat([y for _, y in stream(seed=12).epoch(2)]))


def test_start_batch_skips_without_changing_the_rest():
    s = stream(augment=AUGMENT, normalize=NORMALIZE)
    full = list(s.epoch(5))
    resumed = list(s.epoch(5, start_batch=4))
    assert len(resumed) == len(full) - 4
    for (x, y), (xr, yr) in zip(full[4:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert list(s.epoch(5, start_batch=len(s))) == []
    with pytest.raises(ValueError):
        next(s.epoch(5, start_batch=len(s) + 1))


def test_crop_flip_and_normalize_match_a_per_sample_reference():
    pad = AUGMENT["crop_padding"]
    s = stream(augment=AUGMENT, normalize=NORMALIZE)
    plan = s.plan(1)
    assert set(plan.shifts.flatten().tolist()) == set(range(2 * pad + 1))  # the test covers every offset
    assert 0 < plan.flips.sum() < len(plan.flips)
    mean, std = (torch.tensor(NORMALIZE[k]).view(3, 1, 1) for k in ("mean", "std"))
    served = torch.cat([x for x, _ in s.epoch(1)])
    for position, sample in enumerate(plan.order.tolist()):
        dy, dx = plan.shifts[position].tolist()
        expected = F.pad(s.inputs[sample], (pad, pad, pad, pad))[:, dy:dy + 8, dx:dx + 8]
        if plan.flips[position]:
            expected = expected.flip(-1)
        assert torch.equal(served[position], (expected - mean) / std), position


def test_eval_stream_is_ordered_and_only_normalized():
    s = stream(shuffle=False, normalize=NORMALIZE)
    x, y = (torch.cat(parts) for parts in zip(*s.epoch(0)))
    mean, std = (torch.tensor(NORMALIZE[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert torch.equal(y, torch.arange(103))
    assert torch.equal(x, (s.inputs - mean) / std)


@pytest.mark.parametrize("options, problem", [
    ({"augment": {"crop": 4}}, "unknown dataset.augment"),
    ({"normalize": {"mean": [0.5], "std": [0.5]}}, "one value per channel"),
    ({"batch_size": 200, "drop_last": True}, "exceeds"),
])
def test_bad_stream_settings_are_config_errors(options, problem):
    with pytest.raises(ConfigError, match=problem):
        stream(**options)


def test_crop_on_sequences_is_a_config_error():
    with pytest.raises(ConfigError, match="needs images"):
        data.BatchStream(torch.zeros(4, 1, 40), torch.zeros(4, dtype=torch.long), batch_size=2, shuffle=True,
                         seed=0, device="cpu", augment=AUGMENT)


# ----------------------------------------------------------------------------------------------- dataset YAMLs


def load_dataset_config(name: str, tmp_path: Path):
    cfg = OmegaConf.merge({"data_dir": str(tmp_path)}, {"dataset": OmegaConf.load(DATASET_CONFIGS / f"{name}.yaml")})
    return cfg.dataset


@pytest.mark.parametrize("path", sorted(DATASET_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_yaml_is_complete_and_commented(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# ")
    cfg = load_dataset_config(path.stem, tmp_path)
    keys = {"name", "num_classes", "source", "normalize", "augment", "val_fraction", "val_seed"}
    assert set(cfg) == keys and cfg.name == path.stem
    if path.stem == "custom":
        assert OmegaConf.is_missing(cfg.source, "_target_") and cfg.num_classes is None
        return
    shape = (3, 32, 32) if cfg.augment is not None else (1, 40)  # the config nodes go in as they are, as in build.py
    batches = data.BatchStream(torch.zeros(4, *shape), torch.zeros(4, dtype=torch.long), batch_size=2, shuffle=True,
                               seed=0, device="cpu", augment=cfg.augment, normalize=cfg.normalize)
    assert len(list(batches.epoch(0))) == 2


@pytest.mark.parametrize("name, shape", [("synthetic", (1, 40)), ("mnist1d", (1, 40))])
def test_dataset_yaml_instantiates(name, shape, tmp_path):
    cfg = load_dataset_config(name, tmp_path)
    train, test = instantiate(cfg.source)
    x, y = data.materialize(train)
    assert x.shape[1:] == shape and data.infer_num_classes(y) == cfg.num_classes
    assert len(data.materialize(test)[1]) > 0


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_yaml_reads_data_dir(name, tmp_path, skip_md5):
    write_cifar(tmp_path, name, per_file=1)
    cfg = load_dataset_config(name, tmp_path)
    train, _ = instantiate(cfg.source, download=False)
    assert cfg.num_classes == CIFAR[name][-1]
    assert data.materialize(train)[0].shape[1:] == (3, 32, 32)


def test_a_cached_mnist1d_is_read_without_importing_the_generator(tmp_path):
    """mnist1d imports matplotlib and scipy (over a second of every run's start): only generating needs it."""
    data.mnist1d(num_samples=100, cache_dir=str(tmp_path))
    script = ("import sys; from sam_runner import data; "
              f"data.mnist1d(num_samples=100, cache_dir={str(tmp_path)!r}); "
              "print(sorted(m for m in ('mnist1d', 'matplotlib', 'scipy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
