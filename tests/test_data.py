"""The three --data formats, their errors, the leave-one-domain-out split and the batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from qtool.data import load_domains, normalize, split_domains
from qtool.data.batches import DigitAugment, DomainBatchSampler
from qtool.errors import QtoolError


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_rotated_digits_has_six_rotation_domains():
    data = load_domains("rotated-digits")
    assert data.names == ["0", "15", "30", "45", "60", "75"]
    assert sum(len(d) for d in data.domains.values()) == 1797
    assert data.num_classes == 10 and data.channels == 1 and data.image_size == 28
    zero, rotated = data.domains["0"], data.domains["45"]
    assert zero.images.dtype == torch.uint8 and zero.images.shape[1:] == (1, 28, 28)
    assert not torch.equal(zero.images[:100].float().mean(0), rotated.images[:100].float().mean(0))


def test_npz_domains_and_image_size(tmp_path):
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path / "d.npz",
                     a_x=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), a_y=rng.integers(0, 5, 20),
                     b_x=rng.integers(0, 255, (10, 32, 32, 1), dtype=np.uint8), b_y=np.arange(10) % 7,
                     extra=np.zeros(3))
    data = load_domains(path)
    assert data.names == ["a", "b"] and data.num_classes == 7 and data.channels == 3
    assert data.domains["b"].images.shape == (10, 3, 32, 32)  # grey repeated to RGB
    assert torch.equal(data.domains["b"].images[:, 0], data.domains["b"].images[:, 2])
    assert load_domains(path, image_size=28).domains["a"].images.shape == (20, 3, 28, 28)


def test_real_digits_dg(digits_dg):
    data = load_domains(digits_dg)
    assert data.names == ["mnist", "mnist_m", "syn"]
    assert [len(d) for d in data.domains.values()] == [8000, 8000, 10000]
    assert data.num_classes == 10 and data.image_size == 32


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for domain in ("photo", "sketch"):
        for cls in ("cat", "dog"):
            folder = tmp_path / domain / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "photo" / "cat" / "notes.txt").write_text("ignored")
    data = load_domains(str(tmp_path), image_size=32)
    assert data.names == ["photo", "sketch"] and data.num_classes == 2
    assert data.domains["sketch"].images.shape == (6, 3, 32, 32)
    assert data.domains["photo"].labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("arrays,message", [
    ({"a_x": np.zeros((4, 32, 32, 3), np.uint8), "a_y": np.zeros(5, np.int64)}, "4 images but 5 labels"),
    ({"a_x": np.zeros((4, 32, 32, 3), np.float32), "a_y": np.zeros(4, np.int64)}, "must be uint8"),
    ({"a_x": np.zeros((4, 32, 32, 2), np.uint8), "a_y": np.zeros(4, np.int64)}, "C = 1 or 3"),
    ({"a_x": np.zeros((4, 32, 32, 3), np.uint8), "a_y": np.zeros(4, np.float32)}, "integer array"),
    ({"a_x": np.zeros((4, 32, 32, 3), np.uint8), "a_y": -np.ones(4, np.int64)}, "non-negative"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8)}, "holds no domains"),
    ({"a_x": np.zeros((4, 8, 8, 3), np.uint8), "a_y": np.zeros(4, np.int64)}, "at least 28x28"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(QtoolError, match=message):
        load_domains(path)


def test_bad_paths(tmp_path):
    with pytest.raises(QtoolError, match="data not found"):
        load_domains(str(tmp_path / "missing.npz"))
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(QtoolError, match="not a valid .npz"):
        load_domains(str(tmp_path / "x.npz"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(QtoolError, match="unsupported data file"):
        load_domains(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QtoolError, match="no domain folders"):
        load_domains(str(tmp_path / "empty"))


def test_undecodable_image_names_the_file(tmp_path):
    folder = tmp_path / "d" / "c"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(QtoolError, match="broken.png"):
        load_domains(str(tmp_path))


def test_split_is_disjoint_deterministic_and_leaves_the_target_out():
    data = load_domains("rotated-digits")
    split = split_domains(data, "45", holdout=0.2, seed=3)
    assert split.source_names == ["0", "15", "30", "60", "75"] and split.target.name == "45"
    for name in split.source_names:
        assert len(split.train[name]) + len(split.val[name]) == len(data.domains[name])
        assert len(split.val[name]) == round(0.2 * len(data.domains[name]))
    again = split_domains(data, "45", holdout=0.2, seed=3)
    assert torch.equal(split.val["0"].labels, again.val["0"].labels)
    assert not torch.equal(split.val["0"].images, split_domains(data, "45", seed=4).val["0"].images)
    with pytest.raises(QtoolError, match="unknown domain 'rot90'"):
        split_domains(data, "rot90")
    assert split_domains(data, None).target is None


def test_sampler_is_balanced_resumable_and_shards_the_global_batch():
    data = load_domains("rotated-digits")
    split = split_domains(data, "0", seed=0)
    sampler = DomainBatchSampler(split.train, batch_size=50, seed=1)
    assert sampler.per_domain == 10
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(40)]  # crosses a reshuffle of each domain
    sampler.load_state_dict(state)
    for images, labels in expected:
        again_images, again_labels = sampler.next_batch()
        assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    # two ranks together see exactly the single-process global batch
    whole = DomainBatchSampler(split.train, 50, seed=2).next_batch()[1]
    ranks = [DomainBatchSampler(split.train, 50, seed=2, rank=r, world_size=2).next_batch()[1] for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(whole.tolist())


def test_augmentation_is_seeded_and_keeps_range():
    images = normalize(load_domains("rotated-digits").domains["0"].images[:16])
    a, b = DigitAugment(seed=5)(images), DigitAugment(seed=5)(images)
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5
