"""An interrupted and resumed run ends exactly where the uninterrupted run ends: weights, metrics, summary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from deltatl.data import TransformedImages
from deltatl.engine.objective import Objective

# 18 training images (6 of the 24 are held out for validation) in batches of 4: 4 steps per epoch.
STEPS_PER_EPOCH = 4
EPOCHS = 2
ATTENTION = ["--attention-epochs", "1", "--attention-batches", "1", "--attention-batch-size", "4"]


@pytest.fixture
def train(cli, tiny_train_args):
    """``train(data, out, *flags)``: ``deltatl train`` with the tiny flags and EPOCHS epochs.

    The global torch RNG is reset before every command: train_run draws the new head (and, with
    --pretrained none, the whole network and DELTA's source) from it before any seeding, so without
    this the runs would not even start from the same point (see
    test_the_same_train_command_twice_gives_identical_weights). Resuming itself is tested here.
    """
    args = [a for a in tiny_train_args if a not in ("--epochs", "1")]

    def run(data, out, *flags):
        torch.manual_seed(20190101)
        return cli("train", "--data", data, *args, "--epochs", EPOCHS, *flags, "--out", out)

    return run


def interrupt_forward_at(monkeypatch, step: int, method: str) -> dict[str, int]:
    """Send a real SIGINT to this process during the ``step``-th training step of ``method`` (once)."""
    forward = Objective.forward
    calls = {"steps": 0, "signals": 0}

    def interrupting_forward(self, images, labels):
        if self.method.name == method:  # not the L2-FE fit of the channel attention
            calls["steps"] += 1
            if calls["steps"] == step and not calls["signals"]:
                calls["signals"] += 1
                os.kill(os.getpid(), signal.SIGINT)
        return forward(self, images, labels)

    monkeypatch.setattr(Objective, "forward", interrupting_forward)
    return calls


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_result(resumed: Path, reference: Path) -> None:
    got, expected = checkpoint(resumed), checkpoint(reference)
    assert got["done"] and expected["done"]
    assert got["step"] == expected["step"]
    assert list(got["model"]) == list(expected["model"])
    for key, tensor in expected["model"].items():
        assert torch.allclose(got["model"][key].double(), tensor.double(), rtol=0, atol=1e-6), key
    assert set(got["regularizer"]) == set(expected["regularizer"])
    for key, tensor in expected["regularizer"].items():
        assert torch.equal(got["regularizer"][key], tensor), key
    for key in ("val_top1", "test_top1", "val_loss", "test_loss", "epochs", "steps"):
        assert summary(resumed)[key] == summary(reference)[key], key
    assert metric_rows(resumed) == metric_rows(reference)


@pytest.mark.parametrize("method, flags, stop_at", [
    ("l2-sp", [], 6),
    ("delta", ATTENTION, 6),
    ("delta", [*ATTENTION, "--rifle", "1"], 6),  # RIFLE fires after epoch 1 (step 4), before the stop
], ids=["l2-sp", "delta", "delta-rifle1"])
def test_a_run_interrupted_by_sigint_mid_epoch_and_resumed_equals_the_uninterrupted_run(
        train, image_folder, tmp_path, monkeypatch, method, flags, stop_at):
    data = image_folder()
    assert stop_at % STEPS_PER_EPOCH  # mid-epoch
    reference = tmp_path / "reference"
    done = train(data, reference, "--method", method, *flags, "--attention-cache", tmp_path / "cache-a")
    assert done.code == 0, done.err

    calls = interrupt_forward_at(monkeypatch, stop_at, method)
    run = tmp_path / "run"
    command = ["--method", method, *flags, "--attention-cache", tmp_path / "cache-b"]
    interrupted = train(data, run, *command)
    assert interrupted.code == 130, interrupted.err
    assert "--resume" in interrupted.err
    assert calls == {"steps": stop_at, "signals": 1}
    assert checkpoint(run)["step"] == stop_at and not checkpoint(run)["done"]
    assert not (run / "summary.json").exists()

    resumed = train(data, run, *command, "--resume")
    assert resumed.code == 0, resumed.err
    assert calls["steps"] == EPOCHS * STEPS_PER_EPOCH  # no step repeated, none skipped
    assert_same_result(run, reference)
    if method == "delta":
        assert json.loads((run / "attention.json").read_text())["layers"] == \
            json.loads((reference / "attention.json").read_text())["layers"]
    if "--rifle" in flags:
        assert [r["step"] for r in metric_rows(run) if r.get("event") == "rifle"] == [4]


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH],
                         ids=["last-step-of-an-epoch", "last-step-of-training"])
def test_an_interruption_on_the_last_step_of_an_epoch_still_logs_and_validates_that_epoch(
        train, image_folder, tmp_path, monkeypatch, stop_at):
    data = image_folder()
    reference = tmp_path / "reference"
    assert train(data, reference, "--method", "l2-sp").code == 0
    interrupt_forward_at(monkeypatch, stop_at, "l2-sp")
    run = tmp_path / "run"
    assert train(data, run, "--method", "l2-sp").code == 130
    resumed = train(data, run, "--method", "l2-sp", "--resume")
    assert resumed.code == 0, resumed.err
    assert [r.get("epoch") for r in metric_rows(run)] == list(range(1, EPOCHS + 1))
    assert_same_result(run, reference)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (a KeyboardInterrupt), also where the suite was started with SIGINT
    ignored (a background job of a non-interactive shell, as in CI), for the tests of interruptions
    outside the training loop, which has a handler of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interruption_during_the_final_evaluation_says_how_to_resume_and_resuming_only_evaluates(
        train, image_folder, tmp_path, monkeypatch, python_sigint):
    from deltatl.engine import fit as fit_module

    data = image_folder()
    reference = tmp_path / "reference"
    assert train(data, reference, "--method", "l2-sp").code == 0
    evaluate = fit_module._Loop.evaluate
    signals = []

    def interrupted_test(self, dataset, name):
        if name == "test" and not signals:
            signals.append(name)
            os.kill(os.getpid(), signal.SIGINT)  # outside the training loop: a KeyboardInterrupt
        return evaluate(self, dataset, name)

    monkeypatch.setattr(fit_module._Loop, "evaluate", interrupted_test)
    run = tmp_path / "run"
    interrupted = train(data, run, "--method", "l2-sp")
    assert interrupted.code == 130 and signals == ["test"]
    assert "final evaluation" in interrupted.err and "--resume" in interrupted.err
    steps = interrupt_forward_at(monkeypatch, 10**9, "l2-sp")  # counts the training steps of the resume
    resumed = train(data, run, "--method", "l2-sp", "--resume")
    assert resumed.code == 0, resumed.err
    assert steps["steps"] == 0
    assert_same_result(run, reference)


def test_an_interruption_while_scoring_the_channel_attention_says_how_to_resume(train, image_folder, tmp_path,
                                                                                 monkeypatch, python_sigint):
    from deltatl.attention import estimate

    data = image_folder()
    reference = tmp_path / "reference"
    command = ["--method", "delta", *ATTENTION]
    assert train(data, reference, *command, "--attention-cache", tmp_path / "cache-a").code == 0
    score = estimate.channel_attention_scores
    signals = []

    def interrupted_scoring(*args, **kwargs):
        if not signals:
            signals.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # no training loop to catch it: a KeyboardInterrupt
        return score(*args, **kwargs)

    monkeypatch.setattr(estimate, "channel_attention_scores", interrupted_scoring)
    run = tmp_path / "run"
    interrupted = train(data, run, *command, "--attention-cache", tmp_path / "cache-b")
    assert interrupted.code == 130 and signals == [1]
    assert interrupted.err.splitlines()[-1] == ("deltatl: interrupted; finished work is kept: the same command "
                                                "plus --resume continues")
    resumed = train(data, run, *command, "--attention-cache", tmp_path / "cache-b", "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_result(run, reference)


def test_with_data_loading_workers_kept_across_epochs_a_resumed_run_equals_the_run_without_workers(
        train, image_folder, tmp_path, monkeypatch):
    """Two worker processes, started once for the run and kept over its epochs (their augmentation
    draws follow each item's epoch), give exactly the batches of the main process alone, also after an
    interruption mid-epoch."""
    data = image_folder()
    reference = tmp_path / "reference"
    assert train(data, reference, "--method", "l2-sp", "--workers", "0").code == 0

    loads = tmp_path / "loads.txt"  # "<pid> <epoch>" of every training image loaded
    getitem = TransformedImages.__getitem__

    def recording_getitem(self, index):
        if self.seed is not None:  # the training split (evaluation has no random augmentation)
            with open(loads, "a") as f:
                f.write(f"{os.getpid()} {self.epoch}\n")
        return getitem(self, index)

    monkeypatch.setattr(TransformedImages, "__getitem__", recording_getitem)
    interrupt_forward_at(monkeypatch, 6, "l2-sp")  # the third step of epoch 1
    run = tmp_path / "run"
    assert train(data, run, "--method", "l2-sp", "--workers", "2").code == 130
    pids_by_epoch: dict[int, set[str]] = {}
    for line in loads.read_text().splitlines():
        pid, epoch = line.split()
        pids_by_epoch.setdefault(int(epoch), set()).add(pid)
    # the same two worker processes loaded epoch 0 and epoch 1: started once, not once per epoch
    assert sorted(pids_by_epoch) == [0, 1]
    assert pids_by_epoch[0] == pids_by_epoch[1] and len(pids_by_epoch[0]) == 2
    assert str(os.getpid()) not in pids_by_epoch[0]

    resumed = train(data, run, "--method", "l2-sp", "--workers", "2", "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_result(run, reference)


# --- the same command twice -------------------------------------------------------------------------

@pytest.fixture
def source_weights(tmp_path) -> Path:
    """A 'pretrained' test_resnet saved as a checkpoint file: the backbone is the same in every run."""
    torch.manual_seed(1)
    path = tmp_path / "source.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


def test_the_same_train_command_twice_gives_identical_weights(cli, image_folder, tiny_train_args, tmp_path,
                                                              source_weights):
    data = image_folder()
    for out in ("first", "second"):
        torch.rand(7)  # whatever ran before in this process (or the random seed of a new process)
        result = cli("train", "--data", data, *tiny_train_args, "--checkpoint", source_weights,
                     "--method", "l2-sp", "--out", tmp_path / out)
        assert result.code == 0, result.err
    first, second = checkpoint(tmp_path / "first")["model"], checkpoint(tmp_path / "second")["model"]
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


# --- a real process and SIGTERM -----------------------------------------------------------------------

def training_args(data: Path, source: Path, out: Path, epochs: int) -> list[str]:
    # --head-init zero: the whole starting point is fixed (see the test above for the default head)
    return ["--data", data, "--model", "test_resnet", "--checkpoint", source, "--head-init", "zero",
            "--image-size", "32", "--batch-size", "4", "--device", "cpu", "--quiet", "--method", "delta-noatt",
            "--rifle", "1", "--epochs", epochs, "--out", out]


def start_process(args: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "deltatl", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_files(proc: subprocess.Popen, run: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists() or (run / "checkpoint.pt").exists()):
        assert proc.poll() is None, f"the run ended before writing anything: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint or metrics within the timeout"
        time.sleep(0.02)


def test_a_real_process_stopped_by_sigterm_exits_130_and_resumes_to_the_uninterrupted_result(
        cli, image_folder, tmp_path, source_weights):
    data = image_folder()
    for epochs in (6, 60):  # a longer run if the first one finished before the signal arrived
        run = tmp_path / f"run{epochs}"
        proc = start_process(training_args(data, source_weights, run, epochs))
        # the uninterrupted run, in this process while the other one starts
        reference = tmp_path / f"reference{epochs}"
        assert cli("train", *training_args(data, source_weights, reference, epochs)).code == 0
        wait_for_files(proc, run)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
        if proc.returncode != 0:
            break
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    stopped = checkpoint(run)
    assert 0 < stopped["step"] < epochs * STEPS_PER_EPOCH and not stopped["done"]
    assert not (run / "summary.json").exists()

    resume = start_process([*training_args(data, source_weights, run, epochs), "--resume"])
    out, err = resume.communicate(timeout=600)
    assert resume.returncode == 0, err
    assert "test top-1 %" in out
    assert_same_result(run, reference)
