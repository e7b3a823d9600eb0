"""CelebA end to end on a generated miniature: `dist-mtl data celeba`, then training on the shards."""

import json
import tarfile
from pathlib import Path

from dist_mtl.cli import main
from dist_mtl.data import CELEBA_ATTRIBUTES, make_celeba_miniature


def test_convert_then_train_resnet18_on_40_attributes(tmp_path: Path) -> None:
    root = make_celeba_miniature(tmp_path / "celeba", num_images=40, seed=1)
    shards = tmp_path / "shards"
    assert main(["data", "celeba", str(root), str(shards), "--image-size", "16", "--shard-size", "8"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sorted(shards.glob("train-*.tar")) and manifest["format"] == "dist_mtl-shards/1"
    assert manifest["input"] == {"key": "jpg", "shape": [3, 16, 16], "dtype": "uint8"}
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [8, 8, 8, 8]
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            f"run_dir={run_dir}",
            "data.name=celeba",
            f"data.path={shards}",
            "data.image_size=16",
            "data.batch_size=8",
            "model.encoder=resnet18",
            "model.width=4",
            "balancer.name=mgda",
            "train.steps=2",
            "train.progress=false",
        ]
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["tasks"]) == list(CELEBA_ATTRIBUTES)
    assert summary["skipped_steps"] == 0


def test_missing_celeba_root_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["data", "celeba", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_malformed_annotation_names_file_and_line(tmp_path: Path, capsys) -> None:
    root = make_celeba_miniature(tmp_path / "celeba", num_images=12, seed=2)
    attr = root / "Anno" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 7"  # a label outside {-1, 1} on line 5
    attr.write_text("\n".join(lines) + "\n")
    assert main(["data", "celeba", str(root), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "list_attr_celeba.txt:5" in err and not (tmp_path / "out").exists()


def test_corrupt_source_image_is_a_clear_error_and_writes_nothing(tmp_path: Path, capsys) -> None:
    root = make_celeba_miniature(tmp_path / "celeba", num_images=12, seed=3)
    image = root / "Img" / "img_align_celeba" / "000011.jpg"  # a val image: copied, not re-encoded
    image.write_bytes(image.read_bytes()[:200])
    assert main(["data", "celeba", str(root), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"dist-mtl: error: {image}: not a readable image" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_training_on_a_cut_off_shard_names_the_shard_and_the_split(tmp_path: Path, capsys) -> None:
    root = make_celeba_miniature(tmp_path / "celeba", num_images=40, seed=1)
    shards = tmp_path / "shards"
    assert main(["data", "celeba", str(root), str(shards), "--image-size", "16", "--shard-size", "8"]) == 0
    shard = shards / "train-000002.tar"
    with tarfile.open(shard) as tar:
        fourth = [m for m in tar.getmembers() if m.name.endswith(".cls.npy")][3]
    shard.write_bytes(shard.read_bytes()[: fourth.offset])  # cut off between samples: 3 of 8 remain
    capsys.readouterr()
    overrides = ["data.name=celeba", f"data.path={shards}", "data.image_size=16", "model.encoder=mlp"]
    code = main(["train", f"run_dir={tmp_path / 'run'}", *overrides, "train.steps=1", "train.progress=false"])
    err = capsys.readouterr().err
    # The manifest lists every shard's byte size, so the cut is found before training starts.
    assert (
        code == 2 and f"dist-mtl: error: {shard}: " in err and "the shard is cut off or was replaced" in err
    )
    assert "Traceback" not in err and not (tmp_path / "run" / "summary.json").exists()
