"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no lost files."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import deltatl.run
from deltatl.engine.objective import Objective


def assert_one_error_line(result, *fragments: str) -> str:
    """Exit status 2, exactly one ``deltatl: error:`` line (warnings aside) holding every fragment."""
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("deltatl: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def train(cli, tiny_train_args, tmp_path):
    """``train(data, *flags, out=...)`` runs ``deltatl train`` with the tiny flags."""

    def run(data, *flags, out=None):
        return cli("train", "--data", data, *tiny_train_args, *flags, "--out", out or tmp_path / "run")

    return run


# --- data ---------------------------------------------------------------------------------------------

def test_a_missing_data_folder_is_one_error_line(train, tmp_path):
    result = train(tmp_path / "no-such-folder")
    assert_one_error_line(result, "no-such-folder", "neither a dataset name")
    assert not (tmp_path / "run").exists()


def test_an_empty_data_folder_is_one_error_line(train, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_error_line(train(tmp_path / "empty"), "has no train/ folder")
    assert not (tmp_path / "run").exists()


def test_a_data_folder_without_test_split_is_one_error_line(train, image_folder, tmp_path):
    root = image_folder(test=1)
    shutil.rmtree(root / "test")
    assert_one_error_line(train(root), "missing folder", "test")


def test_a_train_folder_without_class_folders_is_one_error_line(train, tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "test").mkdir()
    assert_one_error_line(train(tmp_path / "flat"), "has no class folders")


def test_a_class_folder_with_no_images_is_one_error_line(train, image_folder, tmp_path):
    root = image_folder()
    (root / "train" / "purple").mkdir()
    (root / "train" / "purple" / "notes.txt").write_text("no images here")
    (root / "test" / "purple").mkdir()
    assert_one_error_line(train(root), "class folder", "purple", "has no images")
    assert not (tmp_path / "run").exists()


def test_train_and_test_class_sets_that_differ_are_one_error_line_naming_the_classes(train, image_folder):
    root = image_folder()
    (root / "test" / "blue").rename(root / "test" / "navy")
    line = assert_one_error_line(train(root), "differ from train")
    assert "navy" in line and "blue" in line


@pytest.mark.filterwarnings("ignore:skipped")
def test_a_class_folder_whose_only_images_are_unreadable_is_an_error(train, image_folder, tmp_path):
    root = image_folder()
    for png in (root / "train" / "red").iterdir():
        png.write_bytes(b"not an image at all")
    assert_one_error_line(train(root), "red")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_corrupt_image_is_skipped_with_a_warning_and_training_still_works(train, image_folder, tmp_path):
    root = image_folder()
    (root / "train" / "red" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) in .*train.*junk.png"):
        result = train(root)
    assert result.code == 0, result.err
    train_ids = (tmp_path / "run" / "splits" / "train.txt").read_text()
    val_ids = (tmp_path / "run" / "splits" / "val.txt").read_text()
    assert "junk.png" not in train_ids + val_ids
    assert len((train_ids + val_ids).splitlines()) == 24


def test_a_truncated_image_in_the_test_split_is_skipped_and_counted(train, image_folder, tmp_path):
    root = image_folder()
    cut_in_half(root / "test" / "green" / "green_0.png")
    cut_in_half(root / "test" / "green" / "green_1.png")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) in .*test"):
        result = train(root)
    assert result.code == 0, result.err
    assert len((tmp_path / "run" / "splits" / "test.txt").read_text().splitlines()) == 9 - 2


def test_with_no_check_images_a_corrupt_image_stops_the_run_naming_the_file(train, image_folder):
    root = image_folder()
    (root / "train" / "red" / "junk.png").write_bytes(b"not an image")
    assert_one_error_line(train(root, "--no-check-images", "--epochs", "2"), "cannot read image", "junk.png")


def test_after_fixing_the_corrupt_image_the_same_command_runs_in_the_same_folder(train, image_folder, tmp_path):
    root = image_folder()
    junk = root / "train" / "red" / "junk.png"
    junk.write_bytes(b"not an image")
    assert_one_error_line(train(root, "--no-check-images"), "junk.png")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # it never trained
    junk.unlink()
    result = train(root, "--no-check-images")
    assert result.code == 0, result.err
    assert "junk.png" not in (tmp_path / "run" / "splits" / "train.txt").read_text()


def test_with_data_loading_workers_a_corrupt_image_is_still_one_error_line(train, image_folder):
    root = image_folder(train=4, test=1)
    (root / "train" / "red" / "junk.png").write_bytes(b"not an image")
    result = train(root, "--no-check-images", "--workers", "1", "--epochs", "2")
    assert_one_error_line(result, "cannot read image", "junk.png")


def test_non_image_files_in_class_folders_are_ignored(train, image_folder, tmp_path):
    root = image_folder()
    for split in ("train", "test"):
        (root / split / "red" / "notes.txt").write_text("hello")
        (root / split / "red" / ".DS_Store").write_bytes(b"\0\0")
        (root / split / "red" / "labels.json").write_text("{}")
    result = train(root)
    assert result.code == 0, result.err
    assert result.warning_lines == []
    lists = "".join((tmp_path / "run" / "splits" / f"{s}.txt").read_text() for s in ("train", "val", "test"))
    assert len(lists.splitlines()) == 3 * 8 + 3 * 3
    assert ".txt" not in lists and ".json" not in lists and "DS_Store" not in lists


def test_train_per_class_larger_than_a_class_has_is_one_error_line(train, image_folder, tmp_path):
    root = image_folder(train=8)
    line = assert_one_error_line(train(root, "--train-per-class", "20"), "has 8 images", "--train-per-class")
    assert "'blue'" in line  # the first class is named
    assert not (tmp_path / "run").exists()


# --- model and checkpoint -----------------------------------------------------------------------------

def test_an_unknown_model_name_is_one_error_line(train, image_folder, tmp_path):
    root = image_folder()
    assert_one_error_line(train(root, "--model", "resnet_that_does_not_exist"),
                          "unknown model 'resnet_that_does_not_exist'")
    assert not (tmp_path / "run").exists()


def test_an_unknown_torchvision_model_is_one_error_line(train, image_folder):
    assert_one_error_line(train(image_folder(), "--model", "torchvision/resnet1000"), "resnet1000")


def test_an_unknown_method_is_one_error_line(train, image_folder):
    assert_one_error_line(train(image_folder(), "--method", "l3"), "unknown method 'l3'")


def test_an_unknown_device_is_one_error_line(train, image_folder):
    assert_one_error_line(train(image_folder(), "--device", "tpu"), "unknown device 'tpu'")


def test_a_checkpoint_of_another_architecture_is_one_error_line(train, image_folder, tmp_path):
    other = tmp_path / "efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), other)
    line = assert_one_error_line(train(image_folder(), "--checkpoint", other), "does not match the model")
    assert str(other) in line and "missing" in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_other_shapes_is_one_error_line(train, image_folder, tmp_path):
    # (a classifier with another number of classes is accepted: it is replaced, e.g. Places365's 365)
    grey = tmp_path / "resnet_1_channel.pth"
    torch.save(timm.create_model("test_resnet", in_chans=1).state_dict(), grey)
    assert_one_error_line(train(image_folder(), "--checkpoint", grey), "of another shape", "conv1.0.weight")


@pytest.mark.parametrize("content, fragment", [
    (b"this is a text file, not a checkpoint\n", "cannot read checkpoint"),
    (None, "cannot read checkpoint"),  # a truncated torch file
    ("list", "does not hold a state dict"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_error_line(train, image_folder, tmp_path, content, fragment):
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save(timm.create_model("test_resnet").state_dict(), path)
        cut_in_half(path)
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    else:
        path.write_bytes(content)
    assert_one_error_line(train(image_folder(), "--checkpoint", path), fragment, str(path))
    assert not (tmp_path / "run").exists()


def test_a_missing_checkpoint_file_is_one_error_line(train, image_folder, tmp_path):
    assert_one_error_line(train(image_folder(), "--checkpoint", tmp_path / "nope.pth"), "not found", "nope.pth")


# --- run directories ----------------------------------------------------------------------------------

def test_a_run_directory_holding_a_different_run_is_refused_and_left_unchanged(train, image_folder, tmp_path):
    root = image_folder()
    assert train(root, "--lr", "0.01").code == 0
    run = tmp_path / "run"
    before = snapshot(run)
    assert {"summary.json", "checkpoint.pt", "config.yaml", "metrics.jsonl"} <= set(before)
    line = assert_one_error_line(train(root, "--lr", "0.02"), "holds a different run", "lr")
    assert str(run) in line
    assert snapshot(run) == before


def test_a_non_empty_folder_that_is_not_a_run_is_refused_and_left_unchanged(train, image_folder, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    assert_one_error_line(train(image_folder(), out=out), "not empty")
    assert snapshot(out) == {"chapter1.tex": b"precious"}


def test_rerunning_the_identical_finished_command_reuses_the_run(train, image_folder, tmp_path, monkeypatch):
    root = image_folder()
    first = train(root)
    assert first.code == 0
    before = snapshot(tmp_path / "run")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(deltatl.run, "fit", no_training)
    second = train(root)
    assert second.code == 0, second.err
    assert second.out == first.out  # the same result table
    assert "test top-1 %" in second.out
    assert snapshot(tmp_path / "run") == before


def test_an_unfinished_run_needs_resume_and_then_finishes(train, image_folder, tmp_path, monkeypatch):
    root = image_folder()
    forward = Objective.forward
    calls = []

    def interrupt_on_first_step(self, images, labels):
        if not calls:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "fit() handles SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return forward(self, images, labels)

    monkeypatch.setattr(Objective, "forward", interrupt_on_first_step)
    interrupted = train(root, "--epochs", "2")
    assert interrupted.code == 130, interrupted.err
    assert "--resume" in interrupted.err
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    before = snapshot(run)

    again = train(root, "--epochs", "2")
    assert_one_error_line(again, "unfinished run", "--resume")
    assert snapshot(run) == before

    resumed = train(root, "--epochs", "2", "--resume")
    assert resumed.code == 0, resumed.err
    assert (run / "summary.json").exists()
    assert len(calls) == 2 * (18 // 4)  # two epochs of 18 training images in batches of 4, no step repeated


# --- a real process -----------------------------------------------------------------------------------

def run_process(*argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deltatl", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_real_process_prints_one_error_line_without_traceback(tmp_path, tiny_train_args):
    proc = run_process("train", "--data", "missing-folder", *tiny_train_args, "--out", "run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("deltatl: error: --data 'missing-folder' is neither a dataset name (")
    assert "fashion-mnist" in line and "caltech256-30" in line and line.endswith(") nor an existing folder")
    assert proc.stdout == ""
    assert os.listdir(tmp_path) == []


def test_a_real_process_warns_about_a_corrupt_image_on_one_line_and_trains(tmp_path, image_folder,
                                                                            tiny_train_args):
    root = image_folder()
    (root / "train" / "red" / "junk.png").write_bytes(b"not an image")
    proc = run_process("train", "--data", root, *tiny_train_args, "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("deltatl: warning:")]
    assert warnings == [f"deltatl: warning: skipped 1 unreadable image file(s) in {root}/train "
                        f"(first: train/red/junk.png)"]
    assert "test top-1 %" in proc.stdout
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--alpha", "-1"], "--alpha must be a finite number >= 0"),
    (["--beta", "-0.5"], "--beta must be a finite number >= 0"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1)"),
    (["--attention-temperature", "0"], "--attention-temperature must be positive"),
])
def test_bad_numbers_are_refused_where_they_are_parsed_with_one_line(train, image_folder, tmp_path, flags, fragment):
    out = tmp_path / "run"
    assert_one_error_line(train(image_folder(), *flags, out=out), fragment)
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["compare", "--methods", "l2-sp", "--alpha-grid"], "--alpha-grid needs at least one value"),
    (["compare", "--methods", "l2-sp", "--alpha-grid", "l2-sp=-1"], "--alpha-grid: -1 must be a finite number >= 0"),
    (["compare", "--methods", "l2-sp", "--alpha-grid", "l2-sp="], "bad --alpha-grid item"),
    (["search", "--method", "l2-sp", "--alpha-grid"], "--alpha-grid needs at least one value"),
    (["search", "--method", "l2-sp", "--lr-grid"], "--lr-grid needs at least one value"),
    (["compare", "--methods", "lp-ft", "wise-ft", "--fine-tuned", "runs/x"], "--fine-tuned names one LP-FT run"),
])
def test_grid_flags_without_usable_values_and_train_only_flags_are_refused_by_compare_and_search(cli, tmp_path, argv, fragment):
    assert_one_error_line(cli(*argv, "--out", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["compare", "--seeds", "0"], ["predict", "--top-k", "0", "x.png"],
                                  ["compare", "--poll", "0"], ["search", "--poll", "-1"], ["search", "--poll", "nan"],
                                  ["compare", "--table", "../x"], ["compare", "--table", ""]])
def test_counts_below_one_waits_that_are_no_time_and_table_names_that_are_no_file_name_are_refused_by_the_parser(
        cli, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli(*argv)
    assert exit_info.value.code == 2


def test_a_diverging_run_stops_with_one_line_and_reports_nothing_as_if_it_were_fine(train, image_folder, tmp_path):
    out = tmp_path / "run"
    line = assert_one_error_line(train(image_folder(), "--lr", "1e12", out=out), "training diverged", "Lower --lr")
    assert "in epoch 1" in line and "no checkpoint was written" in line
    assert not (out / "summary.json").exists() and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv", [
    ["compare", "--methods", "l2", "--seeds", "1"],
    ["search", "--method", "l2-sp", "--alpha-grid", "0.01"],
])
def test_compare_and_search_never_write_into_a_folder_of_someone_elses_files(cli, tmp_path, argv):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.txt").write_text("my results\n")
    (out / "notes").mkdir()
    before = snapshot(out)
    assert_one_error_line(cli(*argv, "--out", out), "did not write (notes, results.txt)")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes", "results.txt"]


def test_report_never_writes_into_a_folder_of_someone_elses_files(cli, train, image_folder, tmp_path):
    assert train(image_folder(), out=tmp_path / "run").code == 0
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("my thesis")
    assert_one_error_line(cli("report", tmp_path / "run", "--out", out), "did not write (thesis.tex)")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_an_output_folder_that_is_a_file_is_refused(cli, tmp_path):
    target = tmp_path / "file.md"
    target.write_text("x")
    assert_one_error_line(cli("compare", "--methods", "l2", "--seeds", "1", "--out", target), "is a file")
    assert target.read_text() == "x"


@pytest.mark.parametrize("device, fragment", [("mps", "no MPS device"), ("meta", "runs on cpu, cuda")])
def test_a_device_this_pytorch_cannot_train_on_is_one_error_line(train, image_folder, tmp_path, device, fragment):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    assert_one_error_line(train(image_folder(), "--device", device, out=tmp_path / "run"), fragment)


def test_torchvision_weights_without_network_are_one_error_line(train, image_folder, tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    assert_one_error_line(train(image_folder(), "--model", "torchvision/resnet18", "--pretrained", "hub",
                                out=tmp_path / "run"),
                          "cannot fetch torchvision's pretrained weights for 'resnet18' (URLError)", "--checkpoint")


def test_eval_of_an_unfinished_run_says_which_step_its_checkpoint_is_from(cli, train, image_folder, tmp_path):
    run = tmp_path / "run"
    assert train(image_folder(), "--epochs", "2", out=run).code == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["done"] and state["step"] == state["total_steps"]
    state.update(done=False, step=3)  # as a run stopped at step 3
    torch.save(state, run / "checkpoint.pt")
    with pytest.warns(UserWarning, match=f"unfinished run's checkpoint, from step 3 of {state['total_steps']}"):
        result = cli("eval", run)
    assert result.code == 0, result.err


# --- the file system says no ----------------------------------------------------------------------------

def fail_writes_to(monkeypatch, fragment: str, error: OSError) -> None:
    """Every file deltatl writes whose path holds ``fragment`` fails as the file system would: the
    temporary file is created, then the write fails (a full disk), or it cannot be created at all."""
    import deltatl.outputs

    def failing_open(path, mode="r", **kwargs):
        if fragment not in os.fspath(path):
            return open(path, mode, **kwargs)
        if error.errno == errno.ENOSPC:
            open(path, mode, **kwargs).close()
        raise OSError(error.errno, error.strerror)

    monkeypatch.setattr(deltatl.outputs, "open", failing_open, raising=False)


def temporary_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


def test_a_full_disk_is_one_error_line_leaves_no_temporary_file_and_the_run_resumes(train, image_folder,
                                                                                    tmp_path, monkeypatch):
    root, run = image_folder(), tmp_path / "run"
    fail_writes_to(monkeypatch, "checkpoint.pt", OSError(errno.ENOSPC, "No space left on device"))
    assert_one_error_line(train(root, "--epochs", "2", out=run), "No space left on device",
                          f"{run}/checkpoint.pt")
    assert temporary_files(run) == []
    assert (run / "config.yaml").exists() and not (run / "summary.json").exists()

    monkeypatch.undo()  # space was freed
    resumed = train(root, "--epochs", "2", "--resume", out=run)
    assert resumed.code == 0, resumed.err
    assert json.loads((run / "summary.json").read_text())["steps"] == 2 * (18 // 4)


@pytest.mark.parametrize("command", ["train", "compare", "search", "report"])
def test_an_output_folder_that_cannot_be_written_is_one_error_line(cli, image_folder, tiny_train_args, tmp_path,
                                                                   monkeypatch, command):
    root, out = image_folder(), tmp_path / "out"
    first = cli("train", "--data", root, *tiny_train_args, "--out", tmp_path / "done")
    assert first.code == 0, first.err
    fail_writes_to(monkeypatch, str(out), OSError(errno.EROFS, "Read-only file system"))
    args = {"train": ["train", "--data", root, *tiny_train_args],
            "compare": ["compare", "--data", root, *tiny_train_args, "--methods", "l2", "--seeds", "1"],
            "search": ["search", "--data", root, *tiny_train_args, "--method", "l2-sp", "--folds", "2",
                       "--alpha-grid", "0.01"],
            "report": ["report", tmp_path / "done"]}[command]
    assert_one_error_line(cli(*args, "--out", out), "Read-only file system", str(out))
    assert temporary_files(out) == [] if out.exists() else True


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes through any permission")
def test_a_really_read_only_output_folder_is_one_error_line(train, image_folder, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_error_line(train(image_folder(), out=locked / "run"), "Permission denied", "locked")


def test_an_unreadable_class_folder_is_one_error_line_naming_it(train, image_folder, tmp_path, monkeypatch):
    root = image_folder()
    unreadable = str(root / "train" / "green")
    listdir = os.listdir

    def refusing_listdir(path="."):
        if os.fspath(path) == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", unreadable)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refusing_listdir)
    assert_one_error_line(train(root), "Permission denied", unreadable)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_start_up_is_one_line_without_traceback(tmp_path, image_folder, tiny_train_args):
    """SIGINT half a second in: Python is still importing PyTorch, or deltatl is starting the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatl", "train", "--data", str(image_folder()),
                             *tiny_train_args, "--out", "run"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a terminal's Ctrl-C: SIGINT not ignored, even when the suite runs as a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    # importing PyTorch alone takes longer than half a second. 130 (our exit) or killed by SIGINT (CPython
    # does that when an extension's init code saw the interrupt): a shell shows both as $? = 130
    assert proc.returncode in (130, -signal.SIGINT), err
    assert err.splitlines()[-1].startswith("deltatl: interrupted"), err


def test_ctrl_c_inside_a_deferred_block_is_raised_after_it_not_inside():
    from deltatl.launch import deferred_interrupt

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may run us with SIGINT ignored
    try:
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGINT)  # as a C extension's init would receive it mid-import
                time.sleep(0.05)
                steps.append("the block ran to its end")
        assert steps == ["the block ran to its end"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: ignored stays ignored
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# --- a run's weights as the starting point of another --------------------------------------------------

def test_a_deltatl_run_checkpoint_is_a_valid_starting_checkpoint(train, image_folder, tmp_path):
    root = image_folder()
    assert train(root, out=tmp_path / "first").code == 0
    second = train(root, "--checkpoint", tmp_path / "first" / "checkpoint.pt", out=tmp_path / "second")
    assert second.code == 0, second.err
    state = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)  # safe loader: tensors only
    assert set(state["model"]) == set(timm.create_model("test_resnet", num_classes=3).state_dict())


# --- runs can be found again ---------------------------------------------------------------------------

def test_eval_works_from_another_directory_and_after_the_data_moved(cli, train, image_folder, tmp_path,
                                                                    monkeypatch):
    root = image_folder()
    monkeypatch.chdir(root.parent)
    assert train(root.name, out=tmp_path / "run").code == 0  # a relative --data
    monkeypatch.chdir(tmp_path / "run")
    first = cli("eval", tmp_path / "run")
    assert first.code == 0, first.err

    moved = root.rename(tmp_path / "moved")
    assert_one_error_line(cli("eval", tmp_path / "run"), f"{root} is not there any more", "--data-root")
    again = cli("eval", tmp_path / "run", "--data-root", moved)
    assert again.code == 0, again.err
    assert again.out == first.out


# --- images of every mode Pillow opens ------------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [
    (lambda: Image.fromarray(np.full((6, 6), 40000, np.uint16)), (156, 156, 156)),           # 16-bit PNG
    (lambda: Image.fromarray(np.full((6, 6), 65535, np.uint16)), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((6, 6), 0.5, np.float32)), (128, 128, 128)),            # float 0..1
    (lambda: Image.fromarray(np.full((6, 6), 77.0, np.float32)), (77, 77, 77)),              # float 0..255
    (lambda: Image.fromarray(np.full((6, 6), 40000, np.int32)), (156, 156, 156)),           # 32-bit int
    (lambda: Image.new("L", (6, 6), 90).convert("I"), (90, 90, 90)),                        # 8-bit in I
    (lambda: Image.new("RGBA", (6, 6), (10, 20, 30, 0)), (255, 255, 255)),                  # transparent
    (lambda: Image.new("RGBA", (6, 6), (200, 30, 40, 255)), (200, 30, 40)),                  # opaque
    (lambda: Image.new("LA", (6, 6), (0, 128)), (127, 127, 127)),                             # half on white
    (lambda: Image.new("RGBA", (6, 6), (0, 0, 0, 0)).convert("P"), (255, 255, 255)),         # palette, clear
    (lambda: Image.new("RGB", (6, 6), (200, 30, 40)).convert("CMYK"), (200, 30, 40)),
    (lambda: Image.new("RGB", (6, 6), (200, 30, 40)).convert("P", dither=Image.Dither.NONE), (204, 51, 51)),
    (lambda: Image.new("1", (6, 6), 1), (255, 255, 255)),
])
def test_images_of_every_mode_load_with_their_full_range_and_colours(tmp_path, make, expected):
    from deltatl.data.images import FileImages

    image = make()
    path = tmp_path / ("x.tif" if image.mode in ("F", "I", "CMYK") else "x.png")
    image.save(path)
    loaded = FileImages(str(tmp_path), [path.name], [0], ["a"]).load(0)
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded, dtype=int) - expected).max() <= 1, (Image.open(path).mode,
                                                                        np.asarray(loaded)[0, 0])


def test_timm_weights_without_network_fail_at_once_with_one_line(train, image_folder, tmp_path, monkeypatch):
    """No name lookup: the local cache only (huggingface_hub would otherwise retry for about 25 s a file)."""
    import socket

    import huggingface_hub

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    waits = []
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", waits.append)
    assert_one_error_line(train(image_folder(), "--model", "resnet18", "--pretrained", "hub", out=tmp_path / "run"),
                          "cannot fetch pretrained weights for 'resnet18'", "not in the local cache", "--checkpoint")
    assert waits == []  # no retry
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while creating the model


def test_an_unknown_delta_layer_is_one_error_line_listing_the_valid_ones(train, image_folder, tmp_path):
    result = train(image_folder(), "--method", "delta", "--delta-layers", "nosuchlayer", out=tmp_path / "run")
    assert_one_error_line(result, "unknown layer name(s): 'nosuchlayer'", "'layer1'")
    fixed = train(image_folder(name="data2"), "--method", "delta", "--delta-layers", "layer1", out=tmp_path / "run")
    assert fixed.code == 0, fixed.err  # the folder of the failed start is reused


def test_predict_given_a_run_folder_as_an_image_points_to_checkpoint(cli, train, image_folder, tmp_path):
    assert train(image_folder(), out=tmp_path / "run").code == 0
    assert_one_error_line(cli("predict", tmp_path / "run"), "cannot read image", f"--checkpoint {tmp_path / 'run'}")


@pytest.mark.parametrize("module, command, extra", [
    ("optuna", ["search", "--method", "l2-sp", "--alpha-grid", "0.01", "--out", "s"], "search"),
    ("matplotlib", ["report", "run", "--out", "r"], "analysis"),
])
def test_a_missing_optional_dependency_names_its_extra(tmp_path, image_folder, tiny_train_args, module, command,
                                                       extra):
    """train needs none of the extras; search and report say which one to install."""
    def without(*modules: str) -> str:
        return (f"import sys; sys.modules.update(dict.fromkeys({modules!r})); from deltatl.launch import main; "
                f"sys.exit(main(sys.argv[1:]))")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trained = subprocess.run([sys.executable, "-c", without("optuna", "matplotlib", "scipy"), "train", "--data", str(image_folder()),
                              *tiny_train_args, "--out", "run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    if command[0] == "search":
        command = [command[0], "--data", str(image_folder("data2")), *tiny_train_args, *command[1:]]
    proc = subprocess.run([sys.executable, "-c", without(module), *command], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"deltatl: error: this needs {module}, which deltatl's '{extra}' "
                                                    f"extra installs: pip install 'deltatl[{extra}]'")
