import math

import pytest
import torch

from diffusion_gym import metrics


def test_vendi_known_answers():
    x = torch.randn(1, 30)
    assert metrics.vendi_score(x.repeat(12, 1)) == pytest.approx(1.0, abs=1e-9)
    assert metrics.vendi_score(torch.eye(12)) == pytest.approx(12.0, abs=1e-9)
    assert metrics.vendi_score(torch.eye(40)[:7] * 3.0) == pytest.approx(7.0, abs=1e-9)  # scale-free
    # two groups of identical vectors, orthogonal to each other: two effective samples
    two = torch.cat([torch.eye(5)[:1].repeat(4, 1), torch.eye(5)[1:2].repeat(4, 1)])
    assert metrics.vendi_score(two) == pytest.approx(2.0, abs=1e-9)
    # the n > D and n <= D code paths agree
    f = torch.randn(50, 8)
    k = torch.nn.functional.normalize(f.double(), dim=1)
    eig = torch.linalg.eigvalsh(k @ k.T / 50).clamp(min=0)
    direct = math.exp(-(eig[eig > 0] * eig[eig > 0].log()).sum().item())
    assert metrics.vendi_score(f) == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="zero norm"):
        metrics.vendi_score(torch.zeros(3, 4))


def test_inception_score_known_answers():
    confident = torch.eye(10).repeat(20, 1)  # 200 one-hot predictions, uniform over 10 classes
    score = metrics.inception_score(confident, splits=10)
    assert score.mean == pytest.approx(10.0, abs=1e-9) and score.std == pytest.approx(0.0, abs=1e-9)
    single = torch.zeros(100, 10)
    single[:, 3] = 1
    assert metrics.inception_score(single).mean == pytest.approx(1.0, abs=1e-9)
    uncertain = torch.full((100, 10), 0.1)
    assert metrics.inception_score(uncertain).mean == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score(torch.randn(100, 10))
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(torch.eye(10)[:5])


def test_mean_and_standard_error_against_direct_computation():
    values = [1.0, 2.0, 4.0, 7.0, 11.0]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    result = metrics.mean_and_standard_error(values)
    assert result.mean == pytest.approx(mean) and result.std == pytest.approx(sd / math.sqrt(n))
    assert metrics.mean_and_standard_error(torch.tensor(values)) == result


def test_pixel_vendi_resizes_and_counts_distinct_images():
    imgs = torch.zeros(6, 1, 16, 16)
    for i in range(6):
        imgs[i, 0, i, :] = 1.0  # six images with disjoint lit rows: orthogonal
    assert metrics.pixel_vendi(imgs, size=None) == pytest.approx(6.0, abs=1e-6)
    assert metrics.pixel_features(imgs, size=32).shape == (6, 32 * 32)
