"""The text-to-image benchmark's parts on tiny local models: optional inputs and their digests, the FID
Inception's calling convention, CLIP score against torchmetrics, intervals over sampling seeds, caption folders."""
import json

import pytest
import torch

import sd_fixtures as sd


def _params(**sections):
    from fewstep.params import Params

    return Params.model_validate({"teacher": {"path": "t"}, "prompts": {"source": "p"}, **sections})


def test_input_paths_are_found_in_the_schema_and_hashed_by_content(tmp_path):
    from fewstep.errors import DataError
    from fewstep.pipeline.hashing import Hasher
    from fewstep.pipeline.inputs import declared, record

    assert set(declared(_params())) == {"evaluate.clip_path", "evaluate.fid.featurizer", "evaluate.fid.reference",
                                        "benchmark.source", "benchmark.featurizer", "benchmark.clip_path"}
    model = tmp_path / "clip"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "inception.pt").write_bytes(b"weights")
    params = _params(evaluate={"clip_path": "clip"}, benchmark={"source": "clip", "featurizer": "inception.pt"})
    first = record(params, tmp_path, Hasher())
    assert set(first) == {"evaluate.clip_path", "benchmark.source", "benchmark.featurizer"}  # unset keys: absent
    assert record(params, tmp_path, Hasher()) == first
    (model / "config.json").write_text('{"changed": 1}')
    second = record(params, tmp_path, Hasher())
    assert second["evaluate.clip_path"] != first["evaluate.clip_path"]
    assert second["benchmark.featurizer"] == first["benchmark.featurizer"]
    with pytest.raises(DataError, match=r"^benchmark.featurizer: gone.pt does not exist"):
        record(_params(benchmark={"source": "clip", "featurizer": "gone.pt"}), tmp_path, Hasher())


def test_benchmark_needs_something_to_score(tmp_path):
    import yaml

    from fewstep.params import ParamsError, load

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"path": "t"}, "prompts": {"source": "p"}, "benchmark": {"source": "x"}}))
    with pytest.raises(ParamsError) as error:
        load(path)
    assert str(error.value).endswith("params.yaml: benchmark source is set but neither featurizer nor clip_path: "
                                     "nothing to score")
    assert "\n" not in str(error.value)


def test_fid_inception_torchscript_gets_pixels_in_0_255_and_returns_pool_features(tmp_path):
    from fewstep.families.t2i.t2i_evaluation import InceptionFeatures, load_featurizer

    path = sd.tiny_inception(tmp_path / "inception.pt")
    net = load_featurizer(str(path), 24)
    assert isinstance(net, InceptionFeatures)
    images = torch.rand(3, 3, 24, 24) * 2 - 1
    raw = torch.jit.load(str(path))
    torch.testing.assert_close(net(images), raw((images + 1) * 127.5, return_features=True))
    assert net(images).shape == (3, 8)  # the features, not the 5 logits
    with pytest.raises(torch.jit.Error, match="0, 255"):  # what feeding it [-1, 1] would do
        raw(images.clamp(-1, 1) * 0.5)


def test_clip_score_per_image_averages_to_torchmetrics(tmp_path):
    from scipy.stats import t
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from fewstep.families.t2i.t2i_evaluation import ClipScorer, clip_score, uint8

    path = sd.tiny_clip(tmp_path / "clip")
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1  # a positive mean
    prompts = sd.PROMPTS[:6]
    scorer = ClipScorer(str(path), "cpu")
    per_image = scorer(images, prompts)
    mean, (low, high) = clip_score(scorer, images, prompts, batch_size=4)

    class Tensors(torch.nn.Module):  # transformers 5 returns output objects; torchmetrics wants tensors
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kw):
            return self.model.get_image_features(*args, **kw).pooler_output

        def get_text_features(self, *args, **kw):
            return self.model.get_text_features(*args, **kw).pooler_output

    reference = CLIPScore(model_name_or_path=lambda: (Tensors(CLIPModel.from_pretrained(path)),
                                                      CLIPProcessor.from_pretrained(path)))
    reference.update(uint8(images), prompts)
    assert mean == pytest.approx(float(per_image.double().mean()), abs=1e-5)
    assert mean > 0 and mean == pytest.approx(float(reference.compute()), abs=1e-4)
    half = t.ppf(0.975, 5) * float(per_image.double().std()) / 6 ** 0.5  # a t-interval over the 6 images
    assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-5)


def test_benchmark_intervals_are_over_sampling_seeds_as_everywhere():
    """Features N(0, I) against N(mu, I) in 4 dimensions: the Fréchet distance is |mu|^2 = 1. Each sampling seed
    is one FID; the interval is the t-interval over seeds (none with one seed, never a bootstrap over images);
    a one-seed CLIP score keeps its interval over the images."""
    from scipy.stats import t

    from fewstep.families.t2i.benchmark import ModelScores, scores_over_seeds

    gen = torch.Generator().manual_seed(0)
    draw = lambda shift: torch.randn(4000, 4, generator=gen, dtype=torch.float64) + shift  # noqa: E731
    reference = ModelScores(features=[draw(0.0)])
    mu = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    runs = [ModelScores(features=[draw(mu)], clip=[torch.rand(50, generator=gen) + 20]) for _ in range(3)]
    three = scores_over_seeds(runs, reference)
    low, high = three["fid_ci95"]
    assert low < 1.0 < high and low < three["fid"] < high and high - low < 1
    assert 0.9 < three["fid"] < 1.1 and three["kid"] > 0 and "kid_ci95" in three
    assert three["clip_score_ci95"][0] < three["clip_score"] < three["clip_score_ci95"][1]
    one = scores_over_seeds(runs[:1], reference)
    assert "fid_ci95" not in one and "kid_ci95" not in one and one["fid"] != three["fid"]
    per_image = runs[0].clip[0].double()
    assert one["clip_score"] == pytest.approx(float(per_image.mean()))
    half = one["clip_score"] - one["clip_score_ci95"][0]
    assert half == pytest.approx(t.ppf(0.975, 49) * float(per_image.std()) / 50 ** 0.5)  # over the 50 images
    assert scores_over_seeds(runs[:1], ModelScores()) == {k: one[k] for k in ("clip_score", "clip_score_ci95")}


def test_caption_folder_pairs_count_and_errors(tmp_path):
    from fewstep.errors import DataError
    from fewstep.families.t2i.benchmark import load_pairs

    folder = sd.write_caption_folder(tmp_path / "coco", count=6)
    pairs = load_pairs(str(folder), "text", "image", 4, seed=0)
    assert len(pairs.texts) == 4 and len(pairs.images(0, 4)) == 4
    captions = {json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()}
    assert set(pairs.texts) <= captions
    assert load_pairs(str(folder), "text", "image", 4, seed=0).texts == pairs.texts  # seeded choice
    assert len(load_pairs(str(folder), "text", "image", 0, seed=0).texts) == 6
    with pytest.raises(DataError, match=r"^benchmark.count: 9 pairs asked for"):
        load_pairs(str(folder), "text", "image", 9, seed=0)
    with pytest.raises(DataError, match=r"^benchmark.text_column: .* has no column 'caption'"):
        load_pairs(str(folder), "caption", "image", 0, seed=0)
    (folder / "003.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^benchmark.source: .*003.png is not a readable image"):
        load_pairs(str(folder), "text", "image", 0, seed=0).images(0, 6)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match=r"^benchmark.source: .* has no metadata.jsonl"):
        load_pairs(str(folder), "text", "image", 0, seed=0)
