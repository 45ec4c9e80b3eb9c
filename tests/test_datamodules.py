"""Data modules: ImageNet loader on a small ImageFolder tree written here, built-in digits,
named splits, and the error message of every bad input."""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from jit.datamodules import (
    CorruptImageError,
    DigitsDataModule,
    ImageNetDataModule,
    center_crop,
    from_model_range,
    stratified_order,
    to_model_range,
    to_rgb,
)

SIZE = 32
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
TRAIN_COUNTS = {"a": 20, "b": 30, "c": 10}  # includes the special images of class "a"
VAL_PER_CLASS = 4


def smooth_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth, asymmetric pattern: interpolation differs little, misplaced crops a lot."""
    coarse = torch.from_numpy(np.random.default_rng(seed).random((1, 3, 4, 6))).float()
    big = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    return (big[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def half_bright(width: int = 40, height: int = 40) -> np.ndarray:
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[:, : width // 2] = 255
    return img


def write_special_images(folder: Path) -> None:
    """Several sizes and aspect ratios and every PIL mode the loader must handle."""
    Image.fromarray(smooth_rgb(600, 400, 0)).save(folder / "wide_600x400.png")
    Image.fromarray(smooth_rgb(300, 900, 1)).save(folder / "tall_300x900.jpg")
    Image.fromarray(smooth_rgb(64, 64, 2)).save(folder / "square_64.png")
    Image.fromarray(smooth_rgb(1000, 1000, 3)).save(folder / "big_1000.jpg", quality=90)
    Image.fromarray(smooth_rgb(50, 70, 4)[..., 0]).save(folder / "gray.png")
    Image.fromarray(smooth_rgb(80, 60, 5)).convert("CMYK").save(folder / "cmyk.jpg")
    palette = Image.fromarray(smooth_rgb(40, 40, 6)).convert("P")
    palette.save(folder / "palette.png", transparency=0)
    rgba = np.concatenate([smooth_rgb(48, 48, 7), np.full((48, 48, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(half_bright()).save(folder / "half.png")


def write_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)

    def fill(folder: Path, count: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count - len(list(folder.iterdir()))):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")

    write_special_images(_mkdir(root / "train" / "a"))
    for name, count in TRAIN_COUNTS.items():
        fill(root / "train" / name, count)
    Image.fromarray(half_bright()).save(_mkdir(root / "val" / "a") / "half.png")
    for name in TRAIN_COUNTS:
        fill(root / "val" / name, VAL_PER_CLASS)
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def copy_tree(tree, tmp_path) -> Path:
    """A private copy to break in one test."""
    return Path(shutil.copytree(tree, tmp_path / "copy"))


def make_dm(root, **kwargs) -> ImageNetDataModule:
    kwargs = {"img_size": SIZE, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageNetDataModule(root, **kwargs)


def index_of(dataset, name: str) -> int:
    return [str(dataset.path(i)).endswith(name) for i in range(len(dataset))].index(True)


# -- ImageNet loader ------------------------------------------------------------------------


def test_loader_yields_uint8_batches_of_img_size(tree):
    dm = make_dm(tree)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.uint8
    assert y.shape == (4,) and y.dtype == torch.int64
    assert dm.num_classes == 3 and dm.img_size == SIZE and dm.dataset_name == "imagenet"
    assert len(dm.split_dataset("train")) == sum(TRAIN_COUNTS.values())
    labels = torch.cat([y for _, y in dm.dataloader("val", batch_size=5)])
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_every_size_and_mode_becomes_rgb_at_img_size(tree):
    train = make_dm(tree, random_flip=False).split_dataset("train")
    for name in ["wide_600x400.png", "tall_300x900.jpg", "square_64.png", "big_1000.jpg",
                 "gray.png", "cmyk.jpg", "palette.png", "rgba.png"]:
        x, label = train[index_of(train, name)]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8, name
        assert label == 0
        assert x.float().std() > 1, f"{name} came out flat"
    gray, _ = train[index_of(train, "gray.png")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_centre_crop_matches_direct_computation(tree):
    """600x400 at 32 px: box-halve 3 times to 75x50, bicubic to 48x32, keep columns 8..39."""
    train = make_dm(tree, random_flip=False).split_dataset("train")
    got, _ = train[index_of(train, "wide_600x400.png")]

    arr = smooth_rgb(600, 400, 0).astype(np.float64)
    for _ in range(3):  # box filter = 2x2 block means
        h, w = arr.shape[0] // 2, arr.shape[1] // 2
        arr = arr[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    assert arr.shape == (50, 75, 3)
    small = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    resized = F.interpolate(small, size=(32, 48), mode="bicubic", antialias=True,
                            align_corners=False)[0]
    # PIL rounds each of the four stages to uint8 in fixed point, hence a small tolerance;
    # the centred crop must fit far better than any other horizontal offset.
    errors = [(got.float() - resized[:, :, left:left + 32]).abs().mean().item()
              for left in range(17)]
    assert errors[8] < 2.0 and int(np.argmin(errors)) == 8

    # The same chain in PIL reproduces the loader bit for bit.
    img = Image.fromarray(smooth_rgb(600, 400, 0))
    for _ in range(3):
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    img = img.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
    assert torch.equal(got, torch.from_numpy(np.array(img)).permute(2, 0, 1))


@pytest.mark.parametrize("size,expected", [((64, 64), (64, 64)), ((1000, 1000), (125, 125)),
                                           ((300, 900), (75, 225)), ((127, 300), (127, 300))])
def test_box_halving_stops_below_twice_the_target(size, expected):
    seen = []
    original = Image.Image.resize

    def spy(self, new_size, resample=None, *args, **kwargs):
        if resample == Image.Resampling.BICUBIC:
            seen.append(self.size)
        return original(self, new_size, resample, *args, **kwargs)

    img = Image.new("RGB", size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "resize", spy)
        out = center_crop(img, 64)
    assert out.size == (64, 64) and seen == [expected]


def test_flip_only_in_train(tree):
    dm = make_dm(tree, calib_num_images=60, calib_split="train")
    torch.manual_seed(0)
    train = dm.split_dataset("train")
    seen = {tuple(train[index_of(train, "half.png")][0][0, 0, [0, -1]].tolist())
            for _ in range(30)}
    assert seen == {(255, 0), (0, 255)}
    for name in ["val", "calibration", "reference"]:
        ds = dm.split_dataset(name)
        i = index_of(ds, "half.png")
        assert all(ds[i][0][0, 0, [0, -1]].tolist() == [255, 0] for _ in range(15)), name
    plain = make_dm(tree, random_flip=False).split_dataset("train")
    i = index_of(plain, "half.png")
    assert all(plain[i][0][0, 0, [0, -1]].tolist() == [255, 0] for _ in range(15))


def test_subset_frac_is_deterministic_stratified_and_nested(tree):
    def files(**kwargs):
        ds = make_dm(tree, **kwargs).split_dataset("train")
        return list(ds.files), np.bincount(ds.labels, minlength=3)

    half, counts = files(subset_frac=0.5, seed=1)
    assert len(half) == 30
    assert np.all(np.abs(counts - np.array(list(TRAIN_COUNTS.values())) * 0.5) <= 1)
    assert files(subset_frac=0.5, seed=1)[0] == half
    assert files(subset_frac=0.5, seed=2)[0] != half
    assert set(files(subset_frac=0.3, seed=1)[0]) <= set(half)
    assert len(make_dm(tree, subset_frac=0.5).split_dataset("val")) == 6


def test_stratified_order_prefixes():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    order = stratified_order(labels, 0)
    for n in (10, 37, 120):
        counts = np.bincount(labels[order[:n]], minlength=4)
        assert np.all(np.abs(counts - n * np.array([100, 50, 30, 20]) / 200) <= 1)
    balanced = stratified_order(labels, 0, balanced=True)
    assert np.bincount(labels[balanced[:80]]).tolist() == [20, 20, 20, 20]
    assert sorted(order.tolist()) == list(range(200))


def test_named_splits(tree):
    dm = make_dm(tree, calib_num_images=9, subset_frac=0.5)
    calib = dm.split_dataset("calibration")
    assert np.bincount(calib.labels).tolist() == [3, 3, 3]
    full = make_dm(tree, calib_num_images=9)
    assert list(full.split_dataset("calibration").files) == list(calib.files)
    assert len(dm.split_dataset("reference")) == len(full.split_dataset("val")) == 12
    uneven = make_dm(tree, calib_num_images=45).split_dataset("calibration")
    a, b, c = np.bincount(uneven.labels)
    assert c == 10 and abs(a - b) <= 1 and a + b == 35
    x, y = next(iter(dm.dataloader("calibration", batch_size=9)))
    assert x.shape == (9, 3, SIZE, SIZE) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    on_train = make_dm(tree, reference_split="train").split_dataset("reference")
    assert len(on_train) == sum(TRAIN_COUNTS.values())


def test_worker_processes_and_pinning_settings(tree):
    dm = make_dm(tree, num_workers=1, persistent_workers=True, pin_memory=True)
    loader = dm.dataloader("val", batch_size=12)
    assert loader.persistent_workers and loader.num_workers == 1
    assert loader.pin_memory == torch.cuda.is_available()
    x, _ = next(iter(loader))
    assert x.shape == (12, 3, SIZE, SIZE)
    assert not make_dm(tree, num_workers=0, persistent_workers=True).dataloader(
        "val").persistent_workers


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(from_model_range(y), x)
    assert from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(y)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [128, 128, 128]


# -- corrupt files ---------------------------------------------------------------------------


@pytest.fixture
def corrupt_tree(copy_tree) -> Path:
    folder = copy_tree / "train" / "b"
    (folder / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    good = (copy_tree / "train" / "a" / "big_1000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return copy_tree


def test_corrupt_file_error_names_the_file(corrupt_tree):
    dm = make_dm(corrupt_tree)
    dm.setup("fit")  # found when loaded: no verify pass by default
    train = dm.split_dataset("train")
    with pytest.raises(CorruptImageError, match=r"cannot read image .*train/b/broken\.jpg"):
        train[index_of(train, "broken.jpg")]
    with pytest.raises(CorruptImageError, match=r"cannot read image .*train/b/truncated\.jpg"):
        train[index_of(train, "truncated.jpg")]


def test_corrupt_file_error_from_a_worker_is_one_line_naming_the_file(corrupt_tree):
    dm = make_dm(corrupt_tree, num_workers=1, batch_size=64)
    with pytest.raises(CorruptImageError) as raised:
        next(iter(dm.dataloader("train")))
    message = str(raised.value)
    assert message.startswith(f"cannot read image {corrupt_tree / 'train' / 'b' / 'broken.jpg'}: "), message
    assert "\n" not in message and "Traceback" not in message


def test_skip_corrupt_reference_statistics_count_the_images_used(corrupt_tree):
    """Each readable image counted once; the two unreadable ones neither counted nor replaced."""
    from jit.metrics.reference import compute_split_stats

    class MeanColour:  # a 3-d feature space: enough to count and to compare statistics
        name, feature_dim = "mean-colour", 3

        def __call__(self, images):
            return images.float().mean(dim=(2, 3)), None

    dm = make_dm(corrupt_tree, skip_corrupt=True, num_workers=1, reference_split="train")
    total = len(dm.split_dataset("reference"))
    stats = compute_split_stats(dm, "reference", MeanColour(), chunk_size=4)
    assert stats.count == total - 2 == sum(TRAIN_COUNTS.values())
    assert dm.num_skipped == 2
    clean = make_dm(corrupt_tree, skip_corrupt=True, verify_images=True, reference_split="train")
    expected = compute_split_stats(clean, "reference", MeanColour(), chunk_size=4)  # dropped up front
    np.testing.assert_allclose(stats.mu_sigma()[0], expected.mu_sigma()[0])


def test_skip_corrupt_substitutes_and_counts(corrupt_tree, caplog):
    dm = make_dm(corrupt_tree, skip_corrupt=True, num_workers=1, random_flip=False)
    train = dm.split_dataset("train")
    with caplog.at_level(logging.WARNING):
        i = index_of(train, "broken.jpg")
        x, y = train[i]
    assert torch.equal(x, train[i + 1][0]) and y == train[i + 1][1]  # next file stands in
    assert "broken.jpg" in caplog.text
    seen = sum(len(y) for _, y in dm.dataloader("train", batch_size=8))  # in a worker
    assert seen == len(train)
    assert dm.num_skipped == 2
    assert [Path(p).name for p in dm.skipped_files] == ["broken.jpg", "truncated.jpg"]


def test_verify_images_in_setup(corrupt_tree):
    with pytest.raises(CorruptImageError, match=r"(?s)2 unreadable image.*train/b/broken\.jpg"):
        make_dm(corrupt_tree, verify_images=True).setup("fit")
    dm = make_dm(corrupt_tree, verify_images=True, skip_corrupt=True)
    dm.setup("fit")
    assert len(dm.split_dataset("train")) == sum(TRAIN_COUNTS.values())
    assert dm.num_skipped == 2


# -- bad input -------------------------------------------------------------------------------


def test_missing_root():
    with pytest.raises(ValueError, match="data.root is not set"):
        make_dm(None).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"ImageNet root /no/such/dir does not exist"):
        make_dm("/no/such/dir").setup("fit")
    assert make_dm(None, num_classes=1000).num_classes == 1000  # sampling-only use


def test_missing_split_folder(copy_tree):
    shutil.rmtree(copy_tree / "val")
    with pytest.raises(FileNotFoundError, match=r"split folder .*copy/val not found; .* "
                                                r"contains: train"):
        make_dm(copy_tree).setup("fit")


def test_split_without_classes(copy_tree):
    shutil.rmtree(copy_tree / "val")
    (copy_tree / "val").mkdir()
    (copy_tree / "val" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"split folder .*val has no class sub-folders.*"
                                         r"readme\.txt"):
        make_dm(copy_tree).setup("validate")


def test_empty_class_folder(copy_tree):
    for f in (copy_tree / "val" / "b").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"class folder .*val/b contains no images"):
        make_dm(copy_tree).setup("fit")
    for f in (copy_tree / "train" / "c").iterdir():
        f.unlink()
    (copy_tree / "train" / "c" / "labels.csv").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*train/c contains no images"):
        make_dm(copy_tree).setup("fit")


def test_class_folders_differ_between_splits(copy_tree):
    (copy_tree / "val" / "c").rename(copy_tree / "val" / "d")
    with pytest.raises(ValueError, match=r"class folders of .*val differ.*missing \['c'\], "
                                         r"extra \['d'\]"):
        make_dm(copy_tree).setup("fit")


def test_patch_size_and_num_classes(tree):
    with pytest.raises(ValueError, match="img_size=32 is not divisible by patch_size=5"):
        make_dm(tree, patch_size=5)
    dm = make_dm(tree, patch_size=16)
    with pytest.raises(ValueError, match="img_size=32 is not divisible by patch_size=6"):
        dm.check_compatible(patch_size=6)
    with pytest.raises(ValueError, match=r"num_classes=1000 .* has 3 classes"):
        make_dm(tree, num_classes=1000).setup("fit")
    with pytest.raises(ValueError, match=r"num_classes=10 .* has 3 classes"):
        dm.check_compatible(patch_size=16, num_classes=10)
    dm.check_compatible(patch_size=16, num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes=5 .*digits.* has 10 classes"):
        DigitsDataModule(num_classes=5)


def test_bad_arguments(tree):
    dm = make_dm(tree)
    with pytest.raises(ValueError, match=r"unknown split 'test'; valid names: train, val, "
                                         r"calibration, reference"):
        dm.split_dataset("test")
    with pytest.raises(ValueError, match=r"calib_split='test' .* allowed values: train, val"):
        make_dm(tree, calib_split="test")
    with pytest.raises(ValueError, match=r"reference_split='valid' .* allowed values"):
        make_dm(tree, reference_split="valid")
    for frac in (0, 1.5):
        with pytest.raises(ValueError, match=rf"subset_frac must be in \(0, 1\], got {frac}"):
            make_dm(tree, subset_frac=frac)
    with pytest.raises(ValueError, match="img_size must be a positive integer, got 0"):
        make_dm(tree, img_size=0)
    with pytest.raises(ValueError, match=r"calib_num_images=500 exceeds the 60 images of "
                                         r"calib_split='train'"):
        make_dm(tree, calib_num_images=500).split_dataset("calibration")
    with pytest.raises(ValueError, match=r"train split has 60 images, fewer than "
                                         r"batch_size=128"):
        make_dm(tree, batch_size=128).train_dataloader()
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        DigitsDataModule(val_fraction=1.0)


# -- digits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(img_size=32, seed=0)
    dm.setup("fit")
    return dm


def _rows(ds) -> set[tuple[int, bytes]]:
    return {(int(label), img.numpy().tobytes()) for img, label in zip(ds.images, ds.labels)}


def test_digits_splits(digits):
    train, val = digits.split_dataset("train"), digits.split_dataset("val")
    assert len(train) == 1438 and len(val) == 359 and digits.num_classes == 10
    assert digits.dataset_name == "digits"
    assert len(train.labels) + len(val.labels) == 1797
    assert np.bincount(np.concatenate([train.labels, val.labels])).sum() == 1797
    share = np.bincount(val.labels) / (np.bincount(val.labels) + np.bincount(train.labels))
    assert np.all(np.abs(share - 0.2) < 0.02)
    # Deterministic for a seed, different for another.
    again = DigitsDataModule(img_size=32, seed=0).split_dataset("val")
    assert np.array_equal(again.labels, val.labels) and torch.equal(again.images, val.images)
    other = DigitsDataModule(img_size=32, seed=1).split_dataset("val")
    assert _rows(other) != _rows(val)
    assert np.bincount(digits.split_dataset("calibration").labels).tolist() == [20] * 10
    assert len(digits.split_dataset("reference")) == 359


def test_digits_pixels(digits):
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x.max() >= 240  # bright strokes
    assert x[..., [0, -1]].float().mean() < 5  # on a dark background (empty edge columns)
    assert 0 <= y.min() and y.max() <= 9
    small = DigitsDataModule(img_size=8).split_dataset("train")
    assert small[0][0].shape == (3, 8, 8)
    assert set(torch.unique(small.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}


def test_digits_are_not_flipped_by_default(digits):
    train = digits.split_dataset("train")
    assert all(torch.equal(train[5][0], train.images[5].expand(3, -1, -1)) for _ in range(10))
    flipping = DigitsDataModule(random_flip=True).split_dataset("train")
    torch.manual_seed(0)
    outs = {flipping[5][0].numpy().tobytes() for _ in range(20)}
    assert len(outs) == 2


def test_flip_defaults():
    def default(cls):
        return inspect.signature(cls).parameters["random_flip"].default

    assert default(ImageNetDataModule) is True and default(DigitsDataModule) is False


@pytest.mark.parametrize("name,cls", [("imagenet", ImageNetDataModule),
                                      ("digits", DigitsDataModule)])
def test_configs_list_every_argument_with_its_default(name, cls):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert config.pop("_target_") == f"jit.datamodules.{cls.__name__}"
    # the resolution follows the model config: one value, no room for a mismatch
    assert config.pop("img_size") == "${model.net.input_size}"
    assert config.pop("calib_num_images") == "${calibration.num_images}"
    params = inspect.signature(cls).parameters
    linked = ("img_size", "calib_num_images")
    assert config == {key: p.default for key, p in params.items() if key not in linked}


def test_flat_official_val_folder_is_sorted_into_class_folders(tmp_path):
    import subprocess
    import sys

    val = tmp_path / "val"
    val.mkdir()
    solution = tmp_path / "LOC_val_solution.csv"
    rows = [("ILSVRC2012_val_00000001", "n01751748"), ("ILSVRC2012_val_00000002", "n09193705"),
            ("ILSVRC2012_val_00000003", "n01751748")]
    solution.write_text("ImageId,PredictionString\n"
                        + "".join(f"{i},{w} 10 20 30 40 {w} 1 2 3 4\n" for i, w in rows))
    for image_id, _ in rows:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(val / f"{image_id}.JPEG")
    proc = subprocess.run([sys.executable, "-m", "jit.datamodules.imagenet_val", str(val), str(solution)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(val)) for p in val.rglob("*.JPEG")) == [
        "n01751748/ILSVRC2012_val_00000001.JPEG", "n01751748/ILSVRC2012_val_00000003.JPEG",
        "n09193705/ILSVRC2012_val_00000002.JPEG"]
    dm = ImageNetDataModule(tmp_path, img_size=8, batch_size=2, num_workers=0)
    assert dm._class_names(val) == ["n01751748", "n09193705"]
