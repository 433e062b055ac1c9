"""Data sources and resolution-adaptive models."""
import pytest
import torch

from conftest import write_image_folder
from fewstep.data.sources import DataError, Dataset, load_dataset, split
from fewstep.families.edm.unet import EDMDenoiser, build_unet, make_scheduler
from fewstep.data.featurizer import Featurizer
from fewstep.core.heads import GanHead, FeatureTap
from fewstep.params import EDMParams


def test_digits_default():
    data = load_dataset("digits", 8)
    assert data.images.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert data.images.min() == -1 and data.images.max() == 1


def test_split_is_seeded_and_disjoint():
    data = load_dataset("digits", 8)
    train, test = split(data, 0.2, seed=3)
    assert torch.equal(test.images, split(data, 0.2, seed=3)[1].images) and len(test.labels) == 359
    numbered = Dataset(data.images, torch.arange(1797), data.class_names)  # each image's index as its label
    train_ids, test_ids = (set(part.labels.tolist()) for part in split(numbered, 0.2, seed=3))
    assert not train_ids & test_ids and train_ids | test_ids == set(range(1797))
    assert set(split(numbered, 0.2, seed=4)[1].labels.tolist()) != test_ids  # another seed, another held-out set


@pytest.mark.parametrize("resolution,channels", [(8, 1), (28, 1), (32, 3), (64, 3)])
def test_models_adapt_to_resolution(resolution, channels):
    unet = build_unet(resolution, channels, num_classes=10)
    model = EDMDenoiser(unet, make_scheduler(EDMParams()), 10)
    tap = FeatureTap(unet)
    x = torch.randn(2, channels, resolution, resolution)
    out = model(x, torch.tensor([0.5, 10.0]), torch.tensor([3, 10]))
    assert out.shape == x.shape
    head = GanHead(unet.config.block_out_channels[-1])
    assert head(tap.features).shape == (2,)
    feat = Featurizer(channels, 10)
    assert feat(x).shape == (2, 128) and feat.logits(x).shape == (2, 10)


def test_image_folder_resized(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=4, size=28)
    data = load_dataset(str(folder), 16)
    assert data.images.shape == (12, 1, 16, 16) and data.class_names == ["class_0", "class_1", "class_2"]
    assert sorted(data.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_saved_dataset(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_dataset(str(tmp_path / "ds"), 8)
    assert data.images.shape == (6, 3, 8, 8) and data.class_names == ["a", "b"]
    with pytest.raises(DataError, match="no column 'img'"):
        load_dataset(str(tmp_path / "ds"), 8, image_column="img")
