"""The P×K sampler: every global batch holds K images of each of P identities, the ranks split it
without overlap, the same on every rank, decoded by DALI like the default pipeline, and a resume
continues with exactly the batches that would have followed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from data_pipeline.dali import DaliConfig, prepare_dali_index
from data_pipeline.dataset import open_dataset
from data_pipeline.pk_sampler import PKFaceIterator, PKSchedule
from tests.test_dali import NUM_CLASSES, SIZE, reference_chw, samples

K = 4


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.pack import write_insightface_dataset

    out = write_insightface_dataset(tmp_path_factory.mktemp("pk"), samples(seed=3), NUM_CLASSES, (SIZE, SIZE))
    prepare_dali_index(out)
    return out


def _config(batch: int, flip: bool = True) -> DaliConfig:
    return DaliConfig(batch_size=batch, last_batch="drop", num_threads=1, seed=11, flip=flip)


def test_schedule_draws_p_identities_with_k_images_each_and_every_identity_once_per_epoch() -> None:
    labels = np.repeat(np.arange(10), [5, 3, 6, 4, 4, 7, 2, 5, 4, 4])  # identity 6 has fewer than K images
    schedule = PKSchedule(labels, p=3, k=K, seed=5)
    assert schedule.batches_per_epoch == 3
    for epoch in range(2):
        seen: list[int] = []
        for b in range(schedule.batches_per_epoch):
            indices, mirror = schedule.global_batch(epoch, b)
            ids = labels[indices].reshape(3, K)
            assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 3  # P identities, K contiguous images each
            for row in indices.reshape(3, K):
                if len(np.flatnonzero(labels == labels[row[0]])) >= K:
                    assert len(set(row.tolist())) == K  # distinct images where the identity has K
            assert set(mirror.tolist()) <= {0, 1}
            seen.extend(ids[:, 0].tolist())
        assert len(seen) == len(set(seen))  # no identity twice in an epoch
    again = PKSchedule(labels, p=3, k=K, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(schedule.global_batch(1, 2), again.global_batch(1, 2), strict=True))
    assert not np.array_equal(schedule.global_batch(0, 0)[0], schedule.global_batch(1, 0)[0])


def test_ranks_split_the_global_batch_and_dali_decodes_the_scheduled_records(dataset_dir: Path) -> None:
    its = [PKFaceIterator(dataset_dir, _config(8, flip=False), k=K, rank=r, world_size=2) for r in range(2)]
    ds = open_dataset(dataset_dir)
    schedule = its[0].schedule
    assert len(its[0]) == len(its[1]) == NUM_CLASSES // (16 // K)
    for b, (b0, b1) in enumerate(zip(its[0], its[1], strict=True)):
        keys = torch.cat([b0.keys, b1.keys]).numpy()
        indices, _ = schedule.global_batch(0, b)
        assert np.array_equal(keys, its[0].index.keys[indices])  # rank 0 then rank 1: the global batch
        labels = torch.cat([b0.labels, b1.labels]).numpy()
        assert np.array_equal(labels, [ds.label(int(k)) for k in keys])
        assert np.bincount(labels).max() == K and len(set(labels.tolist())) == 16 // K
        for i, key in enumerate(b0.keys.tolist()[:2]):
            expected = reference_chw(ds.read_image(int(key))[1])
            assert np.abs(b0.images[i].double().numpy() - expected).max() < 0.05  # JPEG decoder differences only


def test_a_resumed_iterator_continues_exactly_even_on_another_world_size(dataset_dir: Path) -> None:
    straight = PKFaceIterator(dataset_dir, _config(16), k=K, rank=0, world_size=1)
    first = [next(iter(straight)) for _ in range(2)]
    state = straight.state_dict()
    rest = [b.images.clone() for b in straight] + [b.images.clone() for b in straight]  # to the end, and epoch 1
    halves = [PKFaceIterator(dataset_dir, _config(8), k=K, rank=r, world_size=2) for r in range(2)]
    for it in halves:
        it.load_state_dict(state)
    resumed = [torch.cat([b0.images, b1.images]) for b0, b1 in zip(halves[0], halves[1], strict=True)]
    resumed += [torch.cat([b0.images, b1.images]) for b0, b1 in zip(halves[0], halves[1], strict=True)]
    assert len(first) == 2 and len(resumed) == len(rest) == 2 * len(straight) - 2
    for a, b in zip(resumed, rest, strict=True):
        assert torch.equal(a, b)  # the same images, flips included


def test_k_must_divide_the_global_batch(dataset_dir: Path) -> None:
    with pytest.raises(ValueError, match="pk_images_per_identity=3 must divide the global batch 16"):
        PKFaceIterator(dataset_dir, _config(8), k=3, rank=0, world_size=2)
