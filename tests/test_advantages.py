import pytest
import torch

from agents.common.advantages import (
    PerConditionStatTracker,
    compute_advantages,
    global_standardize,
    group_standardize,
)


def test_group_standardize_uses_each_groups_own_statistics():
    rewards = torch.tensor([1.0, 3.0, 10.0, 30.0, 7.0])
    groups = torch.tensor([0, 0, 1, 1, 2])
    adv = group_standardize(rewards, groups)
    torch.testing.assert_close(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert adv[4] == pytest.approx(global_standardize(rewards)[4].item())  # singleton: batch stats


def test_the_authors_sample_std_gives_their_advantages():
    """The HRF authors' standardize(): (x - mean) / (x.std() + 1e-6) with torch's n - 1 std, per reference."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 30.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0: mean 3, sample std sqrt(14 / 3) = 2.1602 (population: sqrt(14 / 4) = 1.8708)
    authors = group_standardize(rewards, groups, "group-sample")
    torch.testing.assert_close(authors[:4], torch.tensor([-0.9258, -0.4629, 0.0, 1.3887]), atol=1e-4, rtol=0)
    torch.testing.assert_close(authors[4:], torch.tensor([-0.7071, 0.7071]), atol=1e-4, rtol=0)  # n = 2: std 14.14
    ours = group_standardize(rewards, groups, "group")
    torch.testing.assert_close(ours[:4], torch.tensor([-1.0690, -0.5345, 0.0, 1.6036]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[:4] * (3 / 4) ** 0.5, authors[:4], atol=1e-5, rtol=0)


def test_tracker_falls_back_to_batch_stats_until_min_count():
    tracker = PerConditionStatTracker(buffer_size=4, min_count=3)
    c = torch.tensor([0, 0, 1, 1])
    first = tracker.update(c, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(first, global_standardize(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    second = tracker.update(c, torch.tensor([5.0, 6.0, 7.0, 8.0]))
    # condition 0 now holds [1, 2, 5, 6]: mean 3.5, population std sqrt(4.25)
    assert second[0].item() == pytest.approx((5.0 - 3.5) / 4.25**0.5, rel=1e-5)
    state = tracker.state_dict()
    clone = PerConditionStatTracker(buffer_size=4, min_count=3)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.update(c, torch.ones(4)), tracker.update(c, torch.ones(4)))


def test_compute_advantages_modes_and_clip():
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0] * 2)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = compute_advantages(rewards, groups, torch.zeros(8, dtype=torch.long), "auto", clip=1.5)
    assert adv.max() == pytest.approx(1.5) and adv.min() < 0
    pure_noise = torch.full((8,), -1)
    g = compute_advantages(rewards, pure_noise, torch.zeros(8, dtype=torch.long), "auto", tracker=None, clip=5)
    torch.testing.assert_close(g, global_standardize(rewards).clamp(-5, 5))
    with pytest.raises(ValueError, match="valid choices"):
        compute_advantages(rewards, groups, groups, "median")
