"""Band-weighted sampler: shares on target, determinism, exact resume, disjoint ranks; verification."""

import json

import numpy as np

from stratos_lite.data.sampler import BandSampler, example_probabilities, total_variation, verify_sampler
from stratos_lite.data.task import DEFAULT_BANDS

TARGET = [b.target_share for b in DEFAULT_BANDS]
NAMES = [b.name for b in DEFAULT_BANDS]
# The report's training set: 16,429 / 1,359 / 345 / 246 / 123 examples per band.
BANDS = [0] * 16429 + [1] * 1359 + [2] * 345 + [3] * 246 + [4] * 123


def test_probabilities_are_share_over_count():
    p = example_probabilities(BANDS, TARGET)
    assert abs(p.sum().item() - 1) < 1e-12
    assert abs(p[-1].item() - 0.034 / 123) < 1e-15 and abs(p[0].item() - 0.75 / 16429) < 1e-15


def test_drawn_shares_match_target_after_1000_batches(tmp_path):
    sampler = BandSampler(BANDS, TARGET, seed=0)
    result = verify_sampler(sampler, NAMES, TARGET, batches=1000, batch_size=2,
                            path=tmp_path / "sampler_verification.json")
    assert result["tvd_to_target"] < 0.03
    assert result["tvd_to_raw"] > 0.1 and result["tvd_to_raw"] > 4 * result["tvd_to_target"]
    assert result["passed"]
    assert json.loads((tmp_path / "sampler_verification.json").read_text())["examples"] == 2000
    assert sampler.state_dict()["position"] == 0  # verification does not consume the training stream


def test_same_seed_same_stream_and_other_seed_differs():
    a, b, c = BandSampler(BANDS, TARGET, seed=7), BandSampler(BANDS, TARGET, seed=7), BandSampler(BANDS, TARGET, 8)
    assert a.take(500) == b.take(500)
    assert a.take(100) != c.take(100)


def test_resume_mid_epoch_continues_the_identical_stream():
    bands = [0] * 50 + [1] * 10 + [4] * 3
    full = BandSampler(bands, TARGET, seed=1).take(200)  # crosses three epoch boundaries (63 draws each)
    first = BandSampler(bands, TARGET, seed=1)
    head = first.take(77)
    resumed = BandSampler(bands, TARGET, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(123) == full


def test_two_ranks_draw_disjoint_halves_of_the_one_rank_stream():
    bands = [0] * 40 + [2] * 20
    single = BandSampler(bands, TARGET, seed=2).take(60)
    rank0 = BandSampler(bands, TARGET, seed=2, process_rank=0, world_size=2).take(30)
    rank1 = BandSampler(bands, TARGET, seed=2, process_rank=1, world_size=2).take(30)
    assert rank0 == single[0::2] and rank1 == single[1::2]


def test_empty_band_gives_its_share_to_the_others():
    p = example_probabilities([0, 0, 1], TARGET)
    assert np.isclose(p.sum().item(), 1.0)
    assert np.isclose(p[2].item(), 0.124 / (0.75 + 0.124))


def test_total_variation():
    assert total_variation([1, 0], [0, 1]) == 1.0
    assert total_variation([0.5, 0.5], [0.5, 0.5]) == 0.0
