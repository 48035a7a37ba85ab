"""Uniform sampling: hand-computed cases."""

import numpy as np
import pytest

from pipeline.sampling import PAD_INDEX, clip_frame_range, sample_frames, uniform_indices


def test_midpoints_exact_division():
    # 24 frames, 4 segments of 6: midpoints 3, 9, 15, 21
    assert uniform_indices(0, 24, 4).tolist() == [3, 9, 15, 21]


def test_midpoints_fixture_video_counts():
    # 355 frames, 12 segments: floor((2k+1) * 355 / 24)
    s = sample_frames(355, 19.62, 12)
    assert s.indices.tolist() == [14, 44, 73, 103, 133, 162, 192, 221, 251, 281, 310, 340]
    assert s.mask.all()
    np.testing.assert_allclose(s.times, np.array(s.indices) / 19.62, rtol=1e-6)
    assert s.indices.dtype == np.int32 and s.times.dtype == np.float32


def test_one_frame_is_middle():
    assert sample_frames(10, 10.0, 1).indices.tolist() == [5]


def test_clip_bounds():
    # fps 10, clip [1.0, 2.0) -> frames 10..19; 2 segments of 5 -> 12, 17
    assert clip_frame_range(100, 10.0, 1.0, 2.0) == (10, 20)
    s = sample_frames(100, 10.0, 2, start=1.0, end=2.0)
    assert s.indices.tolist() == [12, 17]
    np.testing.assert_allclose(s.times, [1.2, 1.7], rtol=1e-6)
    # start 1.05 -> first frame shown at or after 1.05 s is 11 (1.1 s)
    assert clip_frame_range(100, 10.0, 1.05, None) == (11, 100)
    # end past the file is clamped; start past the file gives an empty range
    assert clip_frame_range(30, 10.0, 2.5, 99.0) == (25, 30)
    assert clip_frame_range(30, 10.0, 5.0, 6.0) == (30, 30)


def test_short_clip_padded_with_mask():
    s = sample_frames(3, 1.0, 5)
    assert s.indices.tolist() == [0, 1, 2, PAD_INDEX, PAD_INDEX]
    assert s.mask.tolist() == [True, True, True, False, False]
    assert s.times.tolist() == [0.0, 1.0, 2.0, -1.0, -1.0]
    assert s.num_valid == 3


def test_empty_clip_all_padding():
    s = sample_frames(0, 25.0, 4)
    assert not s.mask.any() and (s.indices == PAD_INDEX).all()


def test_exactly_n_frames_takes_each_once():
    assert sample_frames(6, 3.0, 6).indices.tolist() == [0, 1, 2, 3, 4, 5]


def test_bad_arguments():
    with pytest.raises(ValueError):
        sample_frames(10, 10.0, 0)
    with pytest.raises(ValueError):
        clip_frame_range(10, 0.0, 1.0, 2.0)
