"""Tests of utils.py: the identity sampler's batch structure, seeding and RNG state round trips,
atomic checkpoint writes and the weights-only checkpoint loader."""
import os
import random

import numpy as np
import pytest
import torch

from utils import (IdentitySampler, UserError, epoch_seed, load_checkpoint, rng_state,
                   save_checkpoint, set_rng_state, user_message)


def labels_with_counts(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_sampler_batches_pair_identities_in_both_modalities():
    visible = labels_with_counts([5, 3, 7, 2, 4, 6])
    infrared = labels_with_counts([2, 6, 3, 5, 3, 1])
    sampler = IdentitySampler(visible, infrared, num_ids=3, num_pos=2, seed=1)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == sampler.steps * 6
    assert sampler.steps == -(-len(visible) // 6)
    for start in range(0, len(pairs), 6):
        batch = pairs[start:start + 6]
        vis_ids = [visible[v] for v, _, _ in batch]
        ir_ids = [infrared[i] for _, i, _ in batch]
        assert vis_ids == ir_ids                       # pair j has one identity in both modalities
        assert len(set(vis_ids)) == 3                  # P distinct identities per batch
        assert all(vis_ids.count(pid) == 2 for pid in set(vis_ids))  # K images each
        assert vis_ids[0::2] == vis_ids[1::2]          # identities grouped, same order


def test_sampler_is_a_function_of_seed_and_epoch_and_can_skip_batches():
    visible, infrared = labels_with_counts([4] * 8), labels_with_counts([3] * 8)
    sampler = IdentitySampler(visible, infrared, num_ids=2, num_pos=2, seed=5)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) != first
    sampler.set_epoch(3)
    assert list(sampler) == first
    sampler.set_epoch(3, start=2)
    assert list(sampler) == first[2 * 4:]


def test_processes_take_interleaved_batches_of_one_plan_whatever_their_count():
    """Rank r of W takes global batch s*W + r at step s: the same batches, with the same images
    and seeds, as one process draws; the last step runs past the B planned batches so that
    every process has one."""
    visible, infrared = labels_with_counts([3] * 12), labels_with_counts([2] * 12)
    single = IdentitySampler(visible, infrared, num_ids=2, num_pos=2, seed=0)
    assert single.batches == 9 and single.steps == 9  # ceil(36 / 4)
    batches = list(single)
    ranks = [IdentitySampler(visible, infrared, num_ids=2, num_pos=2, seed=0, world_size=3, rank=r)
             for r in range(3)]
    assert all(s.batches == 9 and s.steps == 3 for s in ranks)
    for rank, sampler in enumerate(ranks):
        stream = list(sampler)
        assert list(sampler.rank_batches()) == [rank, rank + 3, rank + 6]
        assert stream == [sample for b in (rank, rank + 3, rank + 6)
                          for sample in batches[b * 4:(b + 1) * 4]]
    two = [IdentitySampler(visible, infrared, num_ids=2, num_pos=2, seed=0, world_size=2, rank=r)
           for r in range(2)]
    assert [list(s.rank_batches()) for s in two] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    # batch 9 is past the plan: the next batch of the same stream, P distinct identities
    assert (two[1].batch_plan(10)[:9] == single.batch_plan()).all()
    assert len({visible[v] for v, _, _ in list(two[1])[-4:]}) == 2


def test_sampler_refuses_more_identities_than_exist():
    with pytest.raises(UserError, match='identities'):
        IdentitySampler(labels_with_counts([2, 2]), labels_with_counts([2, 2]), num_ids=3, num_pos=2)


def test_epoch_seed_differs_by_epoch_and_rank():
    assert len({epoch_seed(0, e, r) for e in range(5) for r in range(3)}) == 15


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_checkpoint({'rng': rng_state()}, tmp_path / 'rng.pth')
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(str(tmp_path / 'rng.pth'))['rng'])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_checkpoint_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    save_checkpoint({'epoch': 1}, path)

    def broken_save(obj, handle):
        handle.write(b'partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(UserError, match='previous file is unchanged'):
        save_checkpoint({'epoch': 2}, path)
    assert load_checkpoint(str(path)) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['last.pth']  # no temporary file left behind


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_checkpoint_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / 'executed'
    path = tmp_path / 'evil.pth'
    torch.save({'net': {}, 'x': RunsCode(marker)}, path)
    with pytest.raises(UserError, match='arbitrary code'):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_released_checkpoint_with_numpy_metrics_loads(tmp_path):
    path = tmp_path / 'released.t'
    torch.save({'net': {'w': torch.ones(2)}, 'cmc': np.linspace(0, 1, 20), 'mAP': np.float64(0.5),
                'epoch': 7}, path)
    state = load_checkpoint(str(path))
    assert state['epoch'] == 7 and float(state['mAP']) == 0.5
    assert torch.equal(state['net']['w'], torch.ones(2))


def test_released_checkpoint_from_numpy_1_loads(tmp_path):
    """numpy 1.x pickled its arrays under numpy.core.multiarray; those names are allowed too."""
    path = tmp_path / 'old.t'
    torch.save({'mAP': np.float64(0.25), 'cmc': np.arange(3.0)}, path,
               _use_new_zipfile_serialization=False, pickle_protocol=2)
    data = path.read_bytes().replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    path.write_bytes(data)
    state = load_checkpoint(str(path))
    assert float(state['mAP']) == 0.25 and list(state['cmc']) == [0.0, 1.0, 2.0]


def test_truncated_and_missing_checkpoints_get_one_sentence(tmp_path):
    path = tmp_path / 'cut.pth'
    save_checkpoint({'model': {'w': torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match='truncated or corrupt'):
        load_checkpoint(str(path))
    with pytest.raises(UserError, match='does not exist'):
        load_checkpoint(str(tmp_path / 'none.pth'))


def test_user_message_unwraps_dataloader_worker_errors():
    wrapped = UserError('Caught UserError in DataLoader worker process 0.\nOriginal Traceback '
                        '(most recent call last):\n  File "x.py"\nutils.UserError: image a.jpg '
                        'cannot be read.')
    assert user_message(wrapped) == 'image a.jpg cannot be read.'
    assert user_message(UserError('plain sentence.')) == 'plain sentence.'
