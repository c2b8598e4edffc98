"""Image trees and test lists from the wild (issue 32): symlink cycles and links out of a split, test-list entries
outside val/, named pipes, sockets and devices, empty, truncated, non-image and decompression-bomb files, binary
lists. Each is one line naming the link, file, folder or list line, exit 2, no traceback, the tree unchanged; the
kinds of image a real tree holds (grayscale, CMYK, RGBA, palette, 16-bit, 1-bit) train."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error
from image_tree import WNIDS, header_only_png, make_tree, tree_state, write_every_mode
from robust_sparse.cli import main
from robust_sparse.datasets.folders import FolderLoader, FolderSet, ImageFileError, in_memory, load_rgb

FIRST, SECOND = WNIDS[0], WNIDS[1]


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    """(root, test list): 2 classes x 4 training and 3 validation JPEGs at 20 px, 4 of them listed."""
    root = tmp_path / "tree"
    return root, make_tree(root, classes=2, train_per_class=4, val_per_class=3, size=(20, 20), listed=4)


def _train(root: Path, test_list: Path | None, out: Path, *extra: str) -> list[str]:
    fields = ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=2", "data.image_size=16",
              "data.val_size=2", "data.batch_size=4", "data.workers=0", "model.name=tiny_cnn", "optim.epochs=1",
              "attack.steps=1", "val.pgd_steps=1", "eval.pgd_steps=1", "eval.n_examples=4",
              "eval.autoattack_examples=0", *extra]
    if test_list is not None:
        fields.append(f"data.test_list={test_list}")
    return ["train", *(part for field in fields for part in ("--set", field)), "--no-progress", "--device", "cpu",
            "--out", str(out)]


def _refused(tree_root: Path, argv: list[str], capsys) -> str:
    """The command's one error line; the tree (links, pipes and all) is as it was and no run directory was left."""
    before = tree_state(tree_root)
    line = one_line_error(argv, capsys)
    assert tree_state(tree_root) == before
    assert not Path(argv[-1]).exists()
    return line


def _a_training_image(root: Path, wnid: str = FIRST) -> Path:
    return sorted((root / "train" / wnid).iterdir())[0]


# ----------------------------------------------------------------------------------------------------------
# symlinks


@pytest.mark.parametrize("target", ["..", ".", f"../{SECOND}", "../.."])
def test_symlinked_folder_read_twice_or_in_a_cycle_is_refused_naming_the_link(tree, tmp_path, capsys, target):
    """A link to the split, to its own folder or to another class would be walked again and again (a tree of 24
    read as 1,304 images) or give one class's images a second label; "../.." leaves the split."""
    root, test_list = tree
    link = root / "train" / FIRST / "sub" / "loop"
    link.parent.mkdir()
    link.symlink_to(Path("..") / target)
    line = _refused(root, _train(root, test_list, tmp_path / "run"), capsys)
    assert f"symlink {link} leads to" in line
    assert ("outside" in line) if target == "../.." else ("a link cycle or a second way" in line)


def test_cycle_of_links_is_refused_naming_the_link(tree, tmp_path, capsys):
    root, test_list = tree
    (root / "train" / FIRST / "a").symlink_to("b")
    (root / "train" / FIRST / "b").symlink_to("a")
    line = _refused(root, _train(root, test_list, tmp_path / "run"), capsys)
    assert f"symlink {root / 'train' / FIRST / 'a'} cannot be followed" in line and "ELOOP" in line


def test_image_linked_from_another_class_is_refused_naming_the_link(tree, tmp_path, capsys):
    root, test_list = tree
    link = root / "train" / FIRST / "borrowed.JPEG"
    link.symlink_to(_a_training_image(root, SECOND))
    line = _refused(root, _train(root, test_list, tmp_path / "run"), capsys)
    assert f"symlink {link} leads to {_a_training_image(root, SECOND)}, also read as" in line


@pytest.mark.parametrize("where", ["outside the root", "the test split", "class folder outside"])
def test_link_leaving_its_split_is_refused_naming_it(tree, tmp_path, capsys, where):
    root, test_list = tree
    if where == "class folder outside":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        Image.open(_a_training_image(root)).save(elsewhere / "x.JPEG")
        link = root / "train" / "zz_linked_class"
        link.symlink_to(elsewhere, target_is_directory=True)
    else:
        if where == "outside the root":
            target = tmp_path / "outside.JPEG"
            Image.open(_a_training_image(root)).save(target)
        else:
            target = sorted((root / "val" / FIRST).iterdir())[0]
        link = root / "train" / FIRST / "linked.JPEG"
        link.symlink_to(target)
    classes = len(list((root / "train").iterdir()))
    line = _refused(root, _train(root, test_list, tmp_path / "run", f"data.num_classes={classes}"), capsys)
    assert f"symlink {link} leads to" in line and f"outside {root / 'train'}" in line


def test_split_folders_that_are_links_are_read(tree, tmp_path):
    """data.root holding train -> and val -> links to a shared copy is the user's layout, not a link inside it."""
    root, test_list = tree
    linked = tmp_path / "linked"
    linked.mkdir()
    for split in ("train", "val"):
        (linked / split).symlink_to(root / split, target_is_directory=True)
    assert main(_train(linked, test_list, tmp_path / "run")) == 0


# ----------------------------------------------------------------------------------------------------------
# the test list


@pytest.mark.parametrize("entry,reason", [
    (f"{FIRST}/../../train/{FIRST}/train_00_000.JPEG", "leads outside"),
    (f"/etc/{FIRST}/x.JPEG", "leads outside"),
    (f"{FIRST}/../{SECOND}/val_01_000.JPEG", "leads outside"),
    (f"{FIRST}/val_00_000.JPEG\0", "NUL byte"),
])
def test_test_list_entry_outside_its_class_folder_is_refused_naming_the_line(tree, tmp_path, capsys, entry, reason):
    root, test_list = tree
    bad = tmp_path / "list.txt"
    bad.write_text(f"{FIRST}/val_00_001.JPEG\n{entry}\n")
    line = _refused(root, _train(root, bad, tmp_path / "run"), capsys)
    assert f"data.test_list: {bad} line 2: {entry!r}" in line and reason in line


def test_test_list_entry_linked_to_a_training_image_is_refused(tree, tmp_path, capsys):
    root, _ = tree
    link = root / "val" / FIRST / "leak.JPEG"
    link.symlink_to(_a_training_image(root))
    bad = tmp_path / "list.txt"
    bad.write_text(f"{FIRST}/leak.JPEG\n")
    line = _refused(root, _train(root, bad, tmp_path / "run"), capsys)
    assert f"{bad} line 1: '{FIRST}/leak.JPEG' leads to {_a_training_image(root)}" in line
    assert f"outside {root / 'val' / FIRST}" in line


def test_test_list_normalised_entries_are_read_and_repeats_refused(tree, tmp_path, capsys):
    root, _ = tree
    good = tmp_path / "list.txt"
    good.write_text(f"./{FIRST}/val_00_000.JPEG\n\n{SECOND}//val_01_002.JPEG\r\n")
    assert main(_train(root, good, tmp_path / "run")) == 0
    capsys.readouterr()
    again = tmp_path / "again.txt"
    again.write_text(f"{FIRST}/val_00_000.JPEG\n{FIRST}/./val_00_000.JPEG\n")
    line = _refused(root, _train(root, again, tmp_path / "run2"), capsys)
    assert f"{again} line 2" in line and "the image of line 1 again" in line


def test_binary_test_list_is_one_line_naming_it(tree, tmp_path, capsys):
    root, _ = tree
    bad = tmp_path / "list.bin"
    bad.write_bytes(f"{FIRST}/val_00_000.JPEG\n".encode() + b"\x89PNG\xff\xfe\x00\n")
    line = _refused(root, _train(root, bad, tmp_path / "run"), capsys)
    assert f"data.test_list: {bad} is not UTF-8 text (line 2" in line


def test_test_list_that_is_a_named_pipe_is_refused_without_blocking(tree, tmp_path, capsys):
    root, _ = tree
    pipe = tmp_path / "list.txt"
    os.mkfifo(pipe)
    line = _refused(root, _train(root, pipe, tmp_path / "run"), capsys)
    assert f"data.test_list: {pipe} is a named pipe (FIFO)" in line


# ----------------------------------------------------------------------------------------------------------
# files that are not regular files


def _special(kind: str, path: Path, monkeypatch) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        monkeypatch.chdir(path.parent)  # a socket's address is limited to ~100 bytes: bind the short name
        server = socket.socket(socket.AF_UNIX)
        server.bind(path.name)
        server.close()  # the socket file stays
    else:
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        except (PermissionError, OSError) as error:
            pytest.skip(f"cannot create a device node here: {error}")


@pytest.mark.parametrize("kind,words", [("fifo", "a named pipe (FIFO)"), ("socket", "a socket"),
                                        ("device", "a character device")])
@pytest.mark.parametrize("split", ["train", "val"])
def test_named_pipe_socket_or_device_called_jpeg_is_refused_by_name(tree, tmp_path, capsys, monkeypatch, kind,
                                                                       words, split):
    """A named pipe called x.JPEG blocked training forever; it is refused before anything opens it."""
    root, test_list = tree
    path = root / split / FIRST / "special.JPEG"
    _special(kind, path, monkeypatch)
    if split == "val":
        test_list.write_text(test_list.read_text() + f"{FIRST}/special.JPEG\n")
    line = _refused(root, _train(root, test_list, tmp_path / "run"), capsys)
    assert f"{path} is {words}, not an image file" in line


# ----------------------------------------------------------------------------------------------------------
# files that are not images


def _truncated_jpeg(keep: float) -> bytes:
    """A 200 px JPEG cut after ``keep`` of its bytes: early, in its header; late, in its pixels (the header reads,
    and only the missing end-of-image marker shows that it was cut)."""
    import io

    pixels = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: int(len(data) * keep)]


@pytest.mark.parametrize("kind,reason", [
    ("empty", "the file is empty (0 bytes)"),
    ("text", "not an image pillow can read"),
    ("JPEG cut in its header", "truncated"),
    ("JPEG cut in its pixels", "truncated"),
    ("truncated PNG header", "cannot be read"),
    ("decompression bomb", "could be decompression bomb"),
])
@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_image_file_is_one_line_naming_it_before_training(tree, tmp_path, capsys, kind, reason, split):
    root, test_list = tree
    content = {"empty": b"", "text": b"these are not the pixels you are looking for\n",
               "JPEG cut in its header": _truncated_jpeg(0.001), "JPEG cut in its pixels": _truncated_jpeg(0.8),
               "truncated PNG header": header_only_png(20, 20)[:20],
               "decompression bomb": header_only_png(50_000, 50_000)}[kind]  # 2.5 G pixels declared
    path = root / split / FIRST / ("bad.png" if "PNG" in kind or "bomb" in kind else "bad.JPEG")
    path.write_bytes(content)
    if split == "val":
        test_list.write_text(f"{FIRST}/{path.name}\n" + test_list.read_text())
    line = _refused(root, _train(root, test_list, tmp_path / "run"), capsys)
    assert f"robust-sparse: error: image {path} cannot be read: " in line and reason in line.lower()
    assert "cannot use an output" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_image_is_one_line_naming_it(tree, tmp_path, capsys):
    root, test_list = tree
    path = _a_training_image(root)
    path.chmod(0)
    try:
        line = _refused(root, _train(root, test_list, tmp_path / "run"), capsys)
    finally:
        path.chmod(0o644)
    assert f"image {path} cannot be read: Permission denied (EACCES)" in line


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder_is_one_line_naming_it(tree, tmp_path, capsys, split):
    root, _ = tree
    folder = root / split / SECOND
    for image in folder.iterdir():
        image.unlink()
    (folder / "notes.txt").write_text("the images are elsewhere\n")
    line = _refused(root, _train(root, None, tmp_path / "run"), capsys)
    assert f"data.root: class folder {folder} holds no image" in line


def test_bad_file_met_while_loading_is_one_line_and_the_run_resumes(tree, tmp_path, capsys):
    """A PNG whose header reads and whose pixels do not passes the header scan: the final evaluation meets it,
    says so in one line naming it, and once the file is replaced --resume finishes the run."""
    root, test_list = tree
    broken = root / "val" / FIRST / "broken.png"
    broken.write_bytes(header_only_png(20, 20, b"not zlib data" * 4))
    test_list.write_text(f"{FIRST}/broken.png\n" + test_list.read_text())
    argv = _train(root, test_list, tmp_path / "run")
    line = one_line_error(argv, capsys)
    assert f"robust-sparse: error: image {broken} cannot be read:" in line and "replace the file and resume" in line
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "eval.json").exists()
    Image.open(_a_training_image(root)).save(broken)
    assert main([*argv, "--resume"]) == 0
    assert (tmp_path / "run" / "eval.json").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_turns_a_worker_s_unreadable_image_into_one_line(tree, tmp_path, workers):
    root, _ = tree
    broken = tmp_path / "broken.png"
    broken.write_bytes(header_only_png(20, 20, b"not zlib data"))
    data = FolderSet([str(_a_training_image(root)), str(broken)], [0, 1], 16)
    loader = FolderLoader(data, 2, torch.device("cpu"), workers=workers)
    with pytest.raises(ImageFileError) as raised:
        list(loader)
    assert len(str(raised.value).splitlines()) == 1 and f"image {broken} cannot be read" in str(raised.value)
    with pytest.raises(ImageFileError, match="broken.png cannot be read"):
        in_memory(data, workers=workers)


# ----------------------------------------------------------------------------------------------------------
# valid images of every kind


def test_grayscale_cmyk_rgba_palette_16_bit_and_1_bit_images_train(tmp_path):
    root = tmp_path / "modes"
    for index, wnid in enumerate(WNIDS[:2]):
        for split in ("train", "val"):
            names = write_every_mode(root / split / wnid, index)
    assert main(_train(root, None, tmp_path / "run", "data.val_size=4", "eval.n_examples=8")) == 0
    folder = root / "train" / WNIDS[1]
    rgb = {name: np.asarray(load_rgb(str(folder / name))) for name in names}
    assert all(image.shape == (36, 40, 3) and image.dtype == np.uint8 for image in rgb.values())
    # 16-bit files are scaled to 8 bits, where Pillow's convert("RGB") would clip them to white
    assert np.array_equal(rgb["wide.png"], rgb["channel.png"]) and np.array_equal(rgb["wide.tif"], rgb["channel.png"])
    assert np.array_equal(rgb["png_named.JPEG"], rgb["rgba.png"])  # the alpha is dropped, as torchvision does


def test_eval_of_a_checkpoint_reads_its_test_list_as_defensively(tree, tmp_path, capsys):
    """robust-sparse eval reads the checkpoint's test list and images through the same checks as train."""
    root, test_list = tree
    assert main(_train(root, test_list, tmp_path / "run")) == 0
    capsys.readouterr()
    test_list.write_text(f"{FIRST}/../../train/{FIRST}/train_00_000.JPEG\n")
    before = tree_state(root)
    line = one_line_error(["eval", str(tmp_path / "run" / "best.pt"), "--attacks", "pgd-1", "--no-probe",
                           "--no-progress", "--device", "cpu", "--results-dir", str(tmp_path / "results")], capsys)
    assert f"data.test_list: {test_list} line 1" in line and "leads outside" in line
    assert tree_state(root) == before and not (tmp_path / "results").exists()
