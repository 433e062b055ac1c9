"""The evaluation's statistics on synthetic features with a known answer."""
import torch

from fewstep.core.distances import fid, kid, pixel_view
from fewstep.core.metrics import differ, mean_interval


def gaussian(n: int, shift: float, seed: int, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_fid_of_shifted_gaussians_matches_the_closed_form():
    # N(0, I) vs N(s·1, I) in d dims: FID = d·s² exactly (equal covariances)
    assert abs(fid(gaussian(4000, 0.0, 0), gaussian(4000, 0.5, 1)) - 8 * 0.25) < 0.2  # sampling sd ≈ 0.06


def test_the_mean_interval_covers_the_expected_fid_at_its_sample_count():
    # FID is biased by the sample count, so what an interval over seeds can hold is the expected FID at that
    # count: here estimated from 200 independent draws, then the 95% interval's coverage is counted
    def draw(i):
        return fid(gaussian(500, 0, 10_000 + i), gaussian(500, 0.5, 20_000 + i))

    expected = sum(draw(i) for i in range(200)) / 200
    covered = 0
    for trial in range(40):
        low, high = mean_interval([draw(1000 + 3 * trial + s) for s in range(3)])
        covered += low <= expected <= high
    assert covered >= 34, covered  # 95% nominal: 38 of 40 expected
    assert mean_interval([1.0]) is None


def test_kid_is_unbiased_where_fid_is_not():
    pairs = [(gaussian(300, 0, 100 + i), gaussian(300, 0, 200 + i)) for i in range(20)]
    fids = torch.tensor([fid(*p) for p in pairs])
    kids = torch.tensor([kid(*p, subsets=1) for p in pairs])
    assert fids.min() > 0.05                       # FID of one distribution against itself: biased above 0
    assert abs(kids.mean()) < 3 * kids.std() / 20 ** 0.5  # KID: centred on 0
    assert kid(gaussian(300, 0, 4), gaussian(300, 0.5, 6)) > 10 * kids.std()


def test_the_comparison_rule():
    close = {"fid_ci95": [1.0, 1.4]}
    assert not differ(close, {"fid_ci95": [1.3, 1.6]}) and differ(close, {"fid_ci95": [1.5, 1.9]})
    assert not differ(close, {"fid": 3.0})  # one seed: no interval, no claim


def test_a_model_against_its_own_other_seed_samples_sits_at_the_floor():
    model_a, model_b, other = gaussian(2000, 0, 20), gaussian(2000, 0, 21), gaussian(2000, 0.4, 22)
    assert fid(model_a, model_b) < 0.05 < fid(model_a, other)


def test_pixel_view_sees_faint_speckle():
    clean = torch.full((100, 1, 8, 8), -1.0)
    clean[:, :, 2:6, 2:6] = 1.0                       # a bright square on black, in [-1, 1]
    speckled = clean.clone()
    speckled[:, :, 0, :] = -1.0 + 2 * 0.1             # a faint row at intensity 0.1
    assert pixel_view(clean, clean) == {"pixel_w1": 0.0, "pixel_faint": 0.0}
    view = pixel_view(speckled, clean)
    assert view["pixel_faint"] == 8 / 64 and abs(view["pixel_w1"] - 0.1 * 8 / 64) < 1e-9
