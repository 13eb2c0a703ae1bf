import numpy as np
import pytest
import torch

from diffusion_gym.windows import (
    PRESETS,
    DynamicWindow,
    FullWindow,
    PredefinedWindows,
    ProbeResult,
    make_window,
)


def _bound(window, k=40):
    window.bind(k)
    return window


def test_full_window_starts_at_zero_from_noise():
    w = _bound(make_window("full"))
    assert isinstance(w, FullWindow) and not w.uses_references
    assert w.next_batch(5, np.random.default_rng(0)).tolist() == [0] * 5


@pytest.mark.parametrize("name", ["hrf", "hrf-baseline", "hrf-early", "hrf-later"])
def test_presets_draw_from_the_current_cluster_and_advance(name):
    clusters, iterations = PRESETS[name]
    w = _bound(make_window(name, batches_per_iteration=2))
    rng = np.random.default_rng(0)
    seen = {i: set() for i in range(len(clusters))}
    for _cycle in range(2):  # the schedule starts over after the last cluster
        for j, ((a, b), its) in enumerate(zip(clusters, iterations, strict=True)):
            for _ in range(its * 2):  # two batches per iteration
                assert w.current_cluster == (a, b)
                steps = w.next_batch(3, rng)
                assert all(a <= s <= b for s in steps)
                seen[j].update(steps.tolist())
    assert all(len(s) > 1 for s in seen.values())  # uniform over the cluster, not a constant


def test_custom_clusters_and_stay_in_last():
    w = _bound(PredefinedWindows([(0, 0), (5, 6)], iterations=[1, 2], cycle=False), k=10)
    rng = np.random.default_rng(1)
    firsts = [w.next_batch(1, rng)[0] for _ in range(6)]
    assert firsts[0] == 0 and all(s in (5, 6) for s in firsts[1:])
    state = w.state_dict()
    w2 = _bound(PredefinedWindows([(0, 0), (5, 6)], iterations=[1, 2], cycle=False), k=10)
    w2.load_state_dict(state)
    assert w2.iteration == w.iteration == 6


@pytest.mark.parametrize(
    "bad",
    ["nope", [(3, 1)], [(-1, 2)], [(1, 2, 3)], [], [("a", 2)], [(1.5, 2)], 7],
)
def test_malformed_windows_are_rejected_with_the_choices(bad):
    with pytest.raises(ValueError) as err:
        make_window(bad)
    assert repr(bad) in str(err.value) or "valid choices" in str(err.value)


def test_half_open_clusters_draw_as_the_authors_arange():
    """end_inclusive=False: the authors' torch.arange(a, b): (8, 12) draws 8..11 and never 12; b may be K."""
    rng = np.random.default_rng(0)
    closed = _bound(make_window("hrf"), k=40)
    half = _bound(make_window("hrf", end_inclusive=False), k=40)
    assert set(np.concatenate([closed.next_batch(50, rng) for _ in range(4)]).tolist()) == {8, 9, 10, 11, 12}
    assert set(np.concatenate([half.next_batch(50, rng) for _ in range(4)]).tolist()) == {8, 9, 10, 11}
    assert "half-open" in half.describe()
    last = _bound(PredefinedWindows([(36, 40)], end_inclusive=False), k=40)
    assert set(last.next_batch(200, rng).tolist()) == {36, 37, 38, 39}
    with pytest.raises(ValueError, match=r"\(36, 41\).*\[0, 39\]"):
        _bound(PredefinedWindows([(36, 41)], end_inclusive=False), k=40)
    with pytest.raises(ValueError, match=r"need a < b; \(5, 5\) holds no step"):
        PredefinedWindows([(5, 5)], end_inclusive=False)


def test_cluster_beyond_the_chain_is_rejected():
    w = make_window([(8, 12), (38, 45)])
    with pytest.raises(ValueError, match=r"\(38, 45\).*\[0, 39\]"):
        w.bind(40)
    with pytest.raises(ValueError, match="iterations"):
        make_window([(1, 2)], iterations=[1, 2])


def _stub_probe(rewards_by_k, distance_by_k, num_steps):
    """A probe whose rewards and distances to the reference are known exactly."""
    reference = torch.tensor([[1.0, 0.0]])

    def probe(k):
        if k >= num_steps:
            return ProbeResult(torch.tensor([rewards_by_k[num_steps]]), reference)
        d = distance_by_k[k]  # an image at cosine distance d from the reference
        image = torch.tensor([[1.0 - d, (1 - (1 - d) ** 2) ** 0.5]])
        return ProbeResult(torch.tensor([rewards_by_k[k]]), image)

    return probe


def test_hrf_d_picks_the_argmax_of_the_documented_objective():
    k_total = 10
    w = _bound(DynamicWindow(beta=0.5, stride=2), k_total)
    assert w.candidates == [0, 2, 4, 6, 8]
    rewards = {0: 5.0, 2: 4.0, 4: 3.5, 6: 1.0, 8: 0.8, 10: 0.5}
    distance = {0: 0.9, 2: 0.6, 4: 0.4, 6: 0.2, 8: 0.1}
    # the objective, computed independently
    r = np.array([rewards[k] for k in w.candidates] + [rewards[10]])
    gain = r[:-1] - r[1:]
    d = np.array([distance[k] for k in w.candidates])
    norm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
    expected = w.candidates[int(np.argmax(norm(gain) - 0.5 * norm(d)))]
    chosen = w.next_batch(4, np.random.default_rng(0), _stub_probe(rewards, distance, k_total))
    assert chosen.tolist() == [expected] * 4 and expected == 4
    np.testing.assert_allclose(w.last_scores["distance"], d, atol=1e-9)


def test_hrf_d_large_beta_picks_the_smallest_distance_and_probes_once_per_iteration():
    k_total = 10
    calls = []
    rewards = {0: 5.0, 2: 4.0, 4: 3.5, 6: 1.0, 8: 0.8, 10: 0.5}
    distance = {0: 0.9, 2: 0.6, 4: 0.4, 6: 0.2, 8: 0.05}
    base = _stub_probe(rewards, distance, k_total)

    def probe(k):
        calls.append(k)
        return base(k)

    w = _bound(DynamicWindow(beta=1000.0, batches_per_iteration=2), k_total)
    rng = np.random.default_rng(0)
    assert w.next_batch(1, rng, probe)[0] == 8
    n_calls = len(calls)
    w.next_batch(1, rng, probe)  # same iteration: no new probe
    assert len(calls) == n_calls
    w.next_batch(1, rng, probe)  # next iteration: probes again
    assert len(calls) == 2 * n_calls
    flipped = _bound(DynamicWindow(beta=0.0, paper_sign=True), k_total)
    # with the paper's literal sign the smallest gain wins: R_6 - R_8 = 0.2
    assert flipped.next_batch(1, rng, base)[0] == 6
    with pytest.raises(RuntimeError, match="probe"):
        _bound(DynamicWindow(), k_total).next_batch(1, rng, None)


def test_hrf_d_candidate_range_is_bounded_by_first_and_last():
    w = _bound(DynamicWindow(stride=3, first=2, last=9), 12)
    assert w.candidates == [2, 5, 8]
    with pytest.raises(ValueError, match="last"):
        DynamicWindow(first=5, last=3)
    with pytest.raises(ValueError, match="outside a chain"):
        DynamicWindow(last=40).bind(40)
