"""Two processes never train into the same run directory."""
import os

from deltatl.run import lock_run_dir


def test_a_run_directory_in_use_by_another_process_is_refused(cli, image_folder, tiny_train_args, tmp_path):
    root = image_folder()
    out = tmp_path / "run"
    os.makedirs(out)
    held = lock_run_dir(str(out))  # stands for another process holding the run
    try:
        result = cli("train", "--data", root, "--out", out, *tiny_train_args)
        assert result.code == 2
        assert result.err.strip().splitlines()[-1] == f"deltatl: error: another deltatl process is using {out}"
        assert not (out / "checkpoint.pt").exists()
    finally:
        held.close()
    result = cli("train", "--data", root, "--out", out, *tiny_train_args)
    assert result.code == 0, result.err
    assert (out / "summary.json").exists()


def test_an_unfinished_run_that_another_process_is_training_says_so_instead_of_suggesting_resume(
        cli, image_folder, tiny_train_args, tmp_path):
    root = image_folder()
    out = tmp_path / "run"
    assert cli("train", "--data", root, "--out", out, *tiny_train_args).code == 0
    (out / "summary.json").unlink()  # as if it were still training: a checkpoint, no summary
    held = lock_run_dir(str(out))
    try:
        result = cli("train", "--data", root, "--out", out, *tiny_train_args)
        assert result.code == 2
        assert result.err.strip().splitlines()[-1] == f"deltatl: error: another deltatl process is using {out}"
    finally:
        held.close()
    assert "--resume" in cli("train", "--data", root, "--out", out, *tiny_train_args).err  # once it is free
