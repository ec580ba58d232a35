"""Data: the demo digits as an ImageFolder, ImageNet-folder checks, sharding, seeded epochs."""

import pytest
import torch
import torchvision
from PIL import Image

from gsparsity import demo_data
from gsparsity.data import DataSettings, ShardSampler, build_datasets, build_loaders, check_image_folder, start_epoch
from gsparsity.distributed import DistContext
from gsparsity.errors import UserError

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def data_settings(**overrides) -> DataSettings:
    values = dict(data="demo", image_size=16, batch_size=32, seed=3, workers=0)
    values.update(overrides)
    return DataSettings(**values)


def test_demo_digits_become_an_image_folder_with_ten_classes_and_a_fifth_held_out():
    loaders = build_loaders(data_settings(), CPU)
    assert loaders.num_classes == 10
    assert len(loaders.val.dataset) == 360  # indices 0, 5, 10, ... of the 1,797 digits
    assert len(loaders.train.dataset) == 1797 - 360
    root = demo_data.demo_root()
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    images, labels = next(iter(loaders.val))
    assert images.shape == (32, 3, 16, 16)


def test_demo_folder_is_written_once_and_reused(monkeypatch):
    root = demo_data.demo_root()
    monkeypatch.setattr(demo_data, "write_digits", lambda root: pytest.fail("rewrote the demo folder"))
    assert demo_data.demo_root() == root


def test_subset_keeps_every_class():
    loaders = build_loaders(data_settings(subset=50), CPU)
    labels = torch.cat([target for _, target in loaders.train])
    assert len(labels) == 50 and set(labels.tolist()) == set(range(10))


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        check_image_folder(tmp_path / "nowhere")


def test_data_folder_without_val_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no 'val' folder"):
        check_image_folder(tmp_path)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.png").write_bytes(b"")
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(UserError, match="class folder train/dog holds no image file"):
        check_image_folder(tmp_path)


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_class_folder_without_image_files_is_a_clear_error(tmp_path):
    for split in ("train", "val"):
        write_image(tmp_path / split / "cat" / "a.png")
        (tmp_path / split / "dog").mkdir()
        (tmp_path / split / "dog" / ".DS_Store").write_bytes(b"\0")
        (tmp_path / split / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"class folder train/dog holds no image file \(\.jpg"):
        build_datasets(data_settings(data=str(tmp_path)))


def test_images_in_subfolders_of_a_class_folder_count_as_imagenet_reads_them(tmp_path):
    for split in ("train", "val"):
        write_image(tmp_path / split / "cat" / "a.png")
        write_image(tmp_path / split / "dog" / "shots" / "b.JPG")
    train, val, num_classes = build_datasets(data_settings(data=str(tmp_path)))
    assert num_classes == 2 and len(train) == len(val) == 2


def test_batch_smaller_than_process_count_is_refused():
    two_processes = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match="smaller than the number of processes"):
        build_loaders(data_settings(batch_size=1), two_processes)


@pytest.mark.parametrize("batch_size, warned", [(8, True), (9, False)])
def test_a_global_batch_that_does_not_split_evenly_over_the_processes_is_named(captured_log, batch_size, warned):
    three_processes = DistContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    loaders = build_loaders(data_settings(batch_size=batch_size, subset=30), three_processes)
    assert loaders.train.batch_size == batch_size // 3
    warnings = [line for line in captured_log.lines if "does not split evenly" in line]
    expected = ["--batch-size 8 does not split evenly over 3 processes: each takes 2, so a step trains on 6 images"]
    assert warnings == (expected if warned else [])


def test_fewer_validation_images_than_processes_are_refused():
    three_processes = DistContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match="the validation set has 2 image.s., fewer than the 3 processes"):
        build_loaders(data_settings(batch_size=6, subset=2), three_processes)


def test_validation_shards_cover_every_image_exactly_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_the_loader_shuffles_each_epoch_the_same_way_whatever_came_before():
    loader = build_loaders(data_settings(subset=64, batch_size=16), CPU).train
    start_epoch(loader, 2, seed=3)
    first = [labels.clone() for _, labels in loader]
    start_epoch(loader, 0, seed=3)
    other = [labels.clone() for _, labels in loader]
    start_epoch(loader, 2, seed=3)
    second = [labels for _, labels in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def batch_sizes(loader):
    return [len(labels) for _, labels in loader]


def test_a_last_batch_of_one_image_is_left_out_so_batchnorm_can_train_on_a_1x1_feature_map():
    loader = build_loaders(data_settings(image_size=32, subset=9, batch_size=4), CPU).train
    start_epoch(loader, 0, seed=3)
    assert len(loader) == 2 and batch_sizes(loader) == [4, 4]
    model = torchvision.models.resnet18(num_classes=10).train()  # layer4 sees 1x1 at 32x32
    for images, labels in loader:
        torch.nn.functional.cross_entropy(model(images), labels).backward()


def test_other_last_batches_are_kept_whole():
    loader = build_loaders(data_settings(subset=10, batch_size=4), CPU).train
    start_epoch(loader, 0, seed=3)
    assert len(loader) == 3 and batch_sizes(loader) == [4, 4, 2]


def test_with_several_processes_the_lone_image_is_counted_in_each_process_share():
    # 9 images on 2 processes: 5 each (one padded), batches of 2 -> 2, 2 and a lone one, left out
    shares = [build_loaders(data_settings(subset=9, batch_size=4),
                            DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))).train
              for rank in range(2)]
    for loader in shares:
        start_epoch(loader, 0, seed=3)
        assert len(loader) == 2 and batch_sizes(loader) == [2, 2]


def test_a_resumed_epoch_yields_the_rest_of_the_same_batches_and_counts_them():
    loader = build_loaders(data_settings(subset=13, batch_size=4), CPU).train
    start_epoch(loader, 1, seed=3)
    whole = [labels.clone() for _, labels in loader]
    start_epoch(loader, 1, seed=3, first_step=2)
    rest = [labels.clone() for _, labels in loader]
    assert len(whole) == 3 and len(loader) == len(rest) == 1
    assert torch.equal(rest[0], whole[2])
