"""``deltatl search``: k-fold choice of alpha, refit, resume, and workers sharing a PostgreSQL study.

The PostgreSQL tests start a throwaway server on loopback (a temp dir, a free port) and stop it after.
They skip only when the server binaries or the driver are missing *and* the environment variable CI
is not set; in CI (``make test`` installs both) they must run.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import deltatl.attention.estimate
import deltatl.run
from conftest import TINY_TRAIN_ARGS
from deltatl.config import TrainConfig
from deltatl.data import ArrayImages
from deltatl.data.folds import read_folds
from deltatl.errors import DeltatlError
from deltatl.search import REFIT, Grid, choose, point_label, search

# --- the search logic with a fake trainer (no training: fast, exact scores) --------------------------


class FakeTrainer:
    """Returns ``val_top1 = score(alpha, fold)`` for fold runs and a test score for the refit; records calls."""

    def __init__(self, score: Callable[[float, int], float], delay: float = 0.0,
                 fail_on_call: int | None = None, rendezvous: int = 0):
        self.score, self.delay, self.fail_on_call = score, delay, fail_on_call
        self.calls: list[tuple[float, int | None, str]] = []
        self.lock = threading.Lock()
        # The first `rendezvous` calls wait for each other: they must come from as many workers at once.
        self.barrier = threading.Barrier(rendezvous, timeout=60) if rendezvous else None

    def __call__(self, config: TrainConfig) -> dict:
        with self.lock:
            self.calls.append((config.alpha, config.cv_fold, threading.current_thread().name))
            if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
                raise KeyboardInterrupt
            meet = self.barrier is not None and len(self.calls) <= self.barrier.parties
        if meet:
            self.barrier.wait()
        time.sleep(self.delay)
        if config.cv_folds is None:  # the refit: no validation split, one test score
            return {"val_top1": None, "test_top1": 77.0, "seconds": 1.0, "train_images": 12}
        return {"val_top1": self.score(config.alpha, config.cv_fold), "test_top1": None, "seconds": 1.0}

    def fold_calls(self) -> Counter:
        return Counter((a, f) for a, f, _ in self.calls if f is not None)

    def refits(self) -> list[float]:
        return [a for a, f, _ in self.calls if f is None]


def train_split(per_class: int = 4, classes: int = 3) -> ArrayImages:
    labels = np.repeat(np.arange(classes), per_class)
    return ArrayImages(np.zeros((len(labels), 4, 4), np.uint8), labels, [f"c{i}" for i in range(classes)], "train")


def fake_search(out: Path, trainer: FakeTrainer, alphas=(0.1, 0.01, 0.001), folds: int = 2, **kwargs) -> dict:
    base = TrainConfig(method="l2-sp", val_per_class=0)
    return search(base, train_split(), Grid(alpha=tuple(alphas)), str(out), folds=folds, train=trainer,
                  poll_seconds=0.05, log=lambda msg: None, **kwargs)


def test_the_alpha_with_the_best_mean_over_folds_wins_not_the_best_single_fold(tmp_path):
    scores = {0.1: [90.0, 10.0], 0.01: [60.0, 60.0], 0.001: [70.0, 40.0]}  # 0.1 has the best fold
    trainer = FakeTrainer(lambda a, f: scores[a][f])
    results = fake_search(tmp_path / "s", trainer)
    assert results["chosen"] == {"alpha": 0.01}
    assert trainer.refits() == [0.01] and results["refit"]["test_top1"] == 77.0
    assert results["refit"]["cv_mean"] == 60.0
    assert sorted(trainer.fold_calls()) == sorted((a, f) for a in scores for f in (0, 1))
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["chosen"] == {"alpha": 0.01}
    assert {(t["alpha"], t["fold"]): t["val_top1"] for t in saved["trials"]} == {
        (a, f): v for a, s in scores.items() for f, v in enumerate(s)}
    md = (tmp_path / "s" / "search.md").read_text()
    assert "| **0.01** | 60.00 | 60.00 | 60.00 ± 0.00 |" in md and "test top-1 77.00 %" in md
    # the study in --out now belongs to this search: another grid there is refused, not mixed in
    with pytest.raises(DeltatlError, match=r"holds another search \(differs in: grid\)"):
        fake_search(tmp_path / "s", FakeTrainer(lambda a, f: 1.0), alphas=(0.1, 0.02))
    with pytest.raises(DeltatlError, match=r"differs in: fold_lists\)"):  # other training images
        search(TrainConfig(method="l2-sp", val_per_class=0), train_split(per_class=5), Grid(alpha=(0.1, 0.01, 0.001)),
               str(tmp_path / "s"), folds=2, train=FakeTrainer(lambda a, f: 1.0), log=lambda msg: None)


def test_a_study_recorded_by_another_deltatl_version_takes_workers_while_what_a_run_computes_is_the_same(tmp_path):
    import optuna
    from deltatl.search import SPEC_ATTR, STUDY_FILE
    fake_search(tmp_path / "s", FakeTrainer(lambda a, f: 1.0))
    study = optuna.load_study(study_name="deltatl-search", storage=f"sqlite:///{tmp_path / 's' / STUDY_FILE}")
    spec = study.user_attrs[SPEC_ATTR]
    del spec["config"]["head_dropout"]  # as written by a deltatl without that setting
    spec["config"]["retired_setting"] = 1  # and with one that no longer defines a run
    study.set_user_attr(SPEC_ATTR, spec)
    assert fake_search(tmp_path / "s", FakeTrainer(lambda a, f: 1.0))["chosen"] == {"alpha": 0.1}
    base = TrainConfig(method="l2-sp", val_per_class=0, head_dropout=0.5)  # not the default: another search
    with pytest.raises(DeltatlError, match=r"differs in: head_dropout\)"):
        search(base, train_split(), Grid(alpha=(0.1, 0.01, 0.001)), str(tmp_path / "s"), folds=2,
               train=FakeTrainer(lambda a, f: 1.0), poll_seconds=0.05, log=lambda msg: None)


def test_an_empty_grid_given_to_the_library_is_refused_with_the_default_to_use(tmp_path):
    from deltatl.search import default_alpha_grid

    with pytest.raises(DeltatlError, match="the grid is empty"):
        fake_search(tmp_path / "s", FakeTrainer(lambda a, f: 1.0), alphas=())
    assert default_alpha_grid(TrainConfig(method="l2-sp")) == (0.001, 0.01, 0.1)
    assert default_alpha_grid(TrainConfig(method="l2")) == ()


def test_a_tie_goes_to_the_earlier_grid_value_in_the_order_given(tmp_path):
    # 0.1 and 0.001 tie: 0.1 comes first in the grid (it is neither the smallest nor the first value)
    trainer = FakeTrainer(lambda a, f: {0.01: 40.0, 0.1: 50.0 + f, 0.001: 51.0 - f}[a])
    assert fake_search(tmp_path / "s", trainer, alphas=(0.01, 0.1, 0.001))["chosen"] == {"alpha": 0.1}
    assert choose([[1.0, 3.0], [3.0, 1.0], [2.0, 2.0]]) == 0
    assert choose([[1.0], [2.0], [2.0]]) == 1


def test_beta_and_lr_grids_are_searched_jointly_with_alpha(tmp_path):
    seen = []

    def trainer(config):
        seen.append((config.alpha, config.beta, config.lr, config.cv_fold))
        if config.cv_folds is None:
            return {"val_top1": None, "test_top1": 1.0, "seconds": 0.0}
        return {"val_top1": 100 * config.beta - config.alpha, "seconds": 0.0}

    results = search(TrainConfig(method="delta"), train_split(), Grid((0.1, 0.2), (0.0, 0.5), (0.01,)),
                     str(tmp_path / "s"), folds=2, train=trainer, poll_seconds=0.05, log=lambda m: None)
    assert results["chosen"] == {"alpha": 0.1, "beta": 0.5, "lr": 0.01}
    assert len(seen) == 2 * 2 * 1 * 2 + 1 and seen[-1] == (0.1, 0.5, 0.01, None)
    assert point_label(results["chosen"]) == "alpha0.1_beta0.5_lr0.01"  # its run directories' name


def test_an_interrupted_search_resumes_without_redoing_finished_trials(tmp_path):
    score = lambda a, f: {0.1: 30.0, 0.01: 40.0, 0.001: 35.0}[a] + f  # noqa: E731
    first = FakeTrainer(score, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        fake_search(tmp_path / "s", first)
    done_before = list(first.fold_calls())[:2]
    second = FakeTrainer(score)
    results = fake_search(tmp_path / "s", second)
    assert not set(second.fold_calls()) & set(done_before)  # the two finished trials were not redone
    assert sum((first.fold_calls() + second.fold_calls()).values()) == 6 + 1  # the interrupted one again
    assert set(first.fold_calls() + second.fold_calls()) == {(a, f) for a in (0.1, 0.01, 0.001) for f in (0, 1)}
    assert results["chosen"] == {"alpha": 0.01} and second.refits() == [0.01]
    third = FakeTrainer(score)
    assert fake_search(tmp_path / "s", third) == results and third.calls == []  # all reused from the study


def test_trials_of_dead_workers_are_failed_and_run_again(tmp_path):
    """A worker killed on this host (its process is gone) and one on another host (its heartbeat stopped)."""
    import optuna

    from deltatl.search import _host_token

    score = lambda a, f: {0.1: 30.0, 0.01: 40.0, 0.001: 35.0}[a] + f  # noqa: E731
    with pytest.raises(KeyboardInterrupt):  # creates and fills the study, then stops
        fake_search(tmp_path / "s", FakeTrainer(score, fail_on_call=1))
    dead = subprocess.Popen(["true"])  # a process id that no longer runs
    dead.wait()
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's' / 'study.db'}")
    study_id = storage.get_study_id_from_name("deltatl-search")
    waiting = storage.get_all_trials(study_id, states=(optuna.trial.TrialState.WAITING,))
    held = {}
    for t, worker in zip(waiting, (f"{_host_token()}|{dead.pid}", "elsewhere|pid:[1]|1")):
        assert storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING)
        storage.record_heartbeat(t._trial_id)
        storage.set_trial_user_attr(t._trial_id, "worker", worker)
        held[t.user_attrs["key"]] = t.number
    trainer = FakeTrainer(score)
    results = fake_search(tmp_path / "s", trainer, heartbeat_seconds=1)  # grace period: 5 s
    assert results["chosen"] == {"alpha": 0.01}
    assert set(trainer.fold_calls().values()) == {1} and len(trainer.fold_calls()) == 6  # held keys too
    states = {t.number: t.state.name for t in storage.get_all_trials(study_id)}
    assert [states[n] for n in held.values()] == ["FAIL", "FAIL"]


def test_a_worker_that_leaves_when_idle_leaves_the_running_trials_and_the_results_to_their_worker(tmp_path):
    import optuna

    from deltatl.search import _host_token

    score = lambda a, f: {0.1: 30.0, 0.01: 40.0, 0.001: 35.0}[a] + f  # noqa: E731
    with pytest.raises(KeyboardInterrupt):  # creates and fills the study, then stops
        fake_search(tmp_path / "s", FakeTrainer(score, fail_on_call=1))
    other = subprocess.Popen(["sleep", "60"])  # another worker of this host, alive, holding one trial
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's' / 'study.db'}")
        study_id = storage.get_study_id_from_name("deltatl-search")
        held = storage.get_all_trials(study_id, states=(optuna.trial.TrialState.WAITING,))[0]
        assert storage.set_trial_state_values(held._trial_id, optuna.trial.TrialState.RUNNING)
        storage.record_heartbeat(held._trial_id)
        storage.set_trial_user_attr(held._trial_id, "worker", f"{_host_token()}|{other.pid}")
        leaving = FakeTrainer(score)
        assert fake_search(tmp_path / "s", leaving, leave_when_idle=True) is None
        assert len(leaving.fold_calls()) == 5 and leaving.refits() == []  # every fold but the held one
        assert not (tmp_path / "s" / "search.json").exists()
    finally:
        other.kill()
        other.wait()
    last = FakeTrainer(score)  # the held trial's worker is gone: it runs again, then the refit
    results = fake_search(tmp_path / "s", last, leave_when_idle=True)
    assert results["chosen"] == {"alpha": 0.01} and len(last.fold_calls()) == 1 and last.refits() == [0.01]
    assert (tmp_path / "s" / "search.json").exists()


# --- the real command on a tiny model: choice verified from the fold runs, refit, resume -------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from conftest import CLASS_COLOURS, make_image, write_png

    root = tmp_path_factory.mktemp("search_data") / "data"
    for label, cls in enumerate(("red", "green", "blue")):
        for split, count, offset in (("train", 6, 0), ("test", 3, 1000)):
            for i in range(count):
                write_png(root / split / cls / f"{i}.png", make_image(label, offset + i, CLASS_COLOURS[cls]))
    return root


GRID = ["0.001", "0.1"]


def search_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--data", str(data), *TINY_TRAIN_ARGS, "--method", "l2-sp", "--alpha-grid", *GRID,
            "--folds", "3", "--out", str(out), "--poll", "0.2", *extra]


@pytest.fixture(scope="module")
def searched(tiny_data, tmp_path_factory):
    import torch

    from deltatl.cli import main

    out = tmp_path_factory.mktemp("search") / "out"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(search_argv(tiny_data, out)) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def test_search_chooses_the_alpha_with_the_best_mean_of_its_fold_runs_and_refits_it(searched):
    out = searched
    means = {}
    for alpha in GRID:
        runs = [json.loads((out / "trials" / f"alpha{float(alpha)!r}" / f"fold{f}" / "summary.json").read_text())
                for f in range(3)]
        assert [(r["config"]["alpha"], r["config"]["cv_folds"], r["config"]["cv_fold"]) for r in runs] == [
            (float(alpha), 3, f) for f in range(3)]
        assert all(r["test_top1"] is None for r in runs)  # the test split took no part
        means[float(alpha)] = statistics.fmean(r["val_top1"] for r in runs)
    best = max(means, key=lambda a: means[a])  # max() keeps the first of ties, the rule of the search
    results = json.loads((out / "search.json").read_text())
    assert results["chosen"] == {"alpha": best}
    assert {p["alpha"]: p["mean"] for p in results["points"]} == pytest.approx(means)
    refit = json.loads((out / "refit" / f"alpha{best!r}" / "summary.json").read_text())
    assert refit["config"]["alpha"] == best and refit["config"]["cv_folds"] is None
    assert refit["train_images"] == 18 and refit["test_top1"] is not None
    assert results["refit"]["test_top1"] == refit["test_top1"]
    assert len(list((out / "refit").iterdir())) == 1
    assert f"test top-1 {refit['test_top1']:.2f} %" in (out / "search.md").read_text()


def test_fold_runs_train_on_the_other_folds_and_validate_on_the_written_fold_list(searched):
    folds = read_folds(str(searched / "folds"), 3)
    all_ids = sorted(i for ids, _ in folds for i in ids)
    assert len(all_ids) == len(set(all_ids)) == 18
    for f, (ids, _) in enumerate(folds):
        run = searched / "trials" / "alpha0.001" / f"fold{f}" / "splits"
        assert (run / "val.txt").read_text() == (searched / "folds" / f"fold{f}.txt").read_text()
        train = [line.rsplit(" ", 1)[0] for line in (run / "train.txt").read_text().splitlines()]
        assert sorted(train + ids) == all_ids
        assert (run / "test.txt").read_text() == ""


def test_rerunning_the_search_reuses_every_run(searched, tiny_data, cli, monkeypatch):
    files = {name: (searched / name).read_bytes() for name in ("search.json", "search.md")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(deltatl.run, "fit", no_training)
    monkeypatch.setattr(deltatl.attention.estimate, "fit", no_training)
    again = cli(*search_argv(tiny_data, searched))
    assert again.code == 0, again.err
    assert {name: (searched / name).read_bytes() for name in files} == files
    assert again.out.startswith(files["search.md"].decode())


def test_without_a_grid_alpha_is_searched_around_the_methods_default(tiny_data, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("search", "--data", tiny_data, *[a for a in TINY_TRAIN_ARGS if a != "--quiet"], "--method",
                 "l2-sp", "--folds", "2", "--out", out, "--poll", "0.2")
    assert result.code == 0, result.err
    assert json.loads((out / "search.json").read_text())["grid"] == {"alpha": [0.001, 0.01, 0.1]}
    assert "no grid given: alpha 0.001 0.01 0.1 (l2-sp's alpha, 0.01, and a decade either side)" in result.err


def test_a_wider_grid_as_another_study_in_the_folder_trains_only_the_new_points(tiny_data, tmp_path, cli):
    out = tmp_path / "out"
    argv = ["search", "--data", tiny_data, *TINY_TRAIN_ARGS, "--method", "l2-sp", "--folds", "2", "--out", out,
            "--poll", "0.2"]
    assert cli(*argv, "--alpha-grid", "0.1", "0.01").code == 0
    first = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/fold*/checkpoint.pt")}
    assert len(first) == 4
    refused = cli(*argv, "--alpha-grid", "0.1", "0.01", "0.001")
    assert refused.code == 2 and "choose another --study-name (a wider grid then reuses" in refused.err
    wider = cli(*argv, "--alpha-grid", "0.1", "0.01", "0.001", "--study-name", "wider")
    assert wider.code == 0, wider.err
    assert {p: p.stat().st_mtime_ns for p in first} == first  # reused, not trained again
    assert len(list(out.glob("trials/*/fold*/summary.json"))) == 6
    assert json.loads((out / "search.json").read_text())["grid"] == {"alpha": [0.1, 0.01, 0.001]}


# --- bad input: one line, exit status 2 ----------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--method", "nope", "--alpha-grid", "0.1"], "unknown method 'nope'"),
    (["--method", "l2"], "method 'l2' has no alpha: give a grid"),
    (["--method", "l2-sp", "--alpha-grid", "0.1", "x"], "--alpha-grid: 'x' is not a number"),
    (["--method", "l2", "--alpha-grid", "0.1"], "method 'l2' has no alpha or beta to search"),
    (["--method", "l2-sp", "--alpha-range", "0.001", "0.1", "--leave-when-idle"], "--leave-when-idle is for grids"),
    (["--method", "wise-ft", "--lr-grid", "0.01", "--fine-tuned", "runs/x"], "--fine-tuned names one LP-FT run"),
    (["--method", "l2-sp", "--alpha-grid", "0.1", "--folds", "7"], "class 'blue' has 6 training images, "
                                                                   "fewer than the 7 folds"),
    (["--method", "l2-sp", "--alpha-grid", "0.1", "--storage", "nonsense"], "cannot open --storage nonsense"),
    (["--method", "l2-sp", "--alpha-grid", "0.1", "--storage", "redis://h/0"], "cannot open --storage redis://h/0"),
])
def test_bad_input_is_one_line_error(tiny_data, tmp_path, cli, extra, message):
    result = cli("search", "--data", tiny_data, *TINY_TRAIN_ARGS, "--out", tmp_path / "out", *extra)
    assert result.code == 2
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith("deltatl: error: "), result.err
    assert message in result.err_lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_unreachable_postgresql_server_is_one_line_error_without_the_password(tiny_data, tmp_path, cli):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://alice:secret@127.0.0.1:{port}/db"
    result = cli("search", "--data", tiny_data, *TINY_TRAIN_ARGS, "--method", "l2-sp", "--alpha-grid", "0.1",
                 "--out", tmp_path / "out", "--storage", url)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    assert f"cannot open --storage postgresql://alice:***@127.0.0.1:{port}/db" in result.err_lines[0]
    assert "secret" not in result.err


# --- PostgreSQL: a real server on loopback ----------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _postgres_bindir() -> str | None:
    """The newest Debian-layout server (/usr/lib/postgresql/N/bin), else initdb on the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth, user postgres); stopped and deleted after."""
    bindir = _postgres_bindir()
    try:
        import psycopg  # noqa: F401
        driver = True
    except ImportError:
        driver = False
    if bindir is None or not driver:
        missing = "the PostgreSQL server binaries (initdb, pg_ctl)" if bindir is None else "the psycopg driver"
        message = f"{missing} not found (make system-deps; pip install -e '.[dev]')"
        if _in_ci():
            pytest.fail(f"{message}: CI must run the PostgreSQL tests")
        pytest.skip(message)
    root = tempfile.mkdtemp(prefix="deltatl-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: run them as the postgres user
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        assert user, "no 'postgres' or 'nobody' user to run the server as"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")

    def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], check=check, capture_output=True, text=True, timeout=120)

    run(f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    port = None
    for _ in range(3):  # the free port may be taken between the check and the start
        port = _free_port()
        started = run(f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60",
                      "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start", check=False)
        if started.returncode == 0:
            break
    else:
        text = Path(log).read_text() if os.path.exists(log) else started.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {text[-2000:]}")
    try:
        yield {"host": "127.0.0.1", "port": port}
    finally:
        run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the server (so workers also race to create Optuna's tables)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=postgres_server["host"], port=postgres_server["port"], user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@{postgres_server['host']}:{postgres_server['port']}/{name}"


def _study_trials(url: str, name: str = "deltatl-search") -> list:
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_threaded_workers_sharing_a_postgresql_study_run_each_alpha_and_fold_once(postgres_url, tmp_path):
    """Four workers start together on an empty database: each (alpha, fold) and the refit run once."""
    trainer = FakeTrainer(lambda a, f: {0.3: 10.0, 0.2: 30.0, 0.1: 20.0}[a] + f, delay=0.1, rendezvous=3)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[f"w{i}"] = fake_search(tmp_path / f"w{i}", trainer, alphas=(0.3, 0.2, 0.1), folds=3,
                                           storage=postgres_url)
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), name=f"w{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert set(trainer.fold_calls().values()) == {1} and len(trainer.fold_calls()) == 9
    assert trainer.refits() == [0.2]
    assert len({json.dumps(r, sort_keys=True) for r in results.values()}) == 1  # every worker: same results
    assert len({name for _, _, name in trainer.calls[:3]}) == 3  # three workers trained at the same time
    complete = Counter(t.user_attrs["key"] for t in _study_trials(postgres_url) if t.state.name == "COMPLETE")
    assert set(complete.values()) == {1} and len(complete) == 9 + 1


def test_two_processes_sharing_a_postgresql_study_split_the_grid_and_refit_once(postgres_url, tiny_data, tmp_path):
    """Two `deltatl search` processes (two "machines", each with its own --out) on one study."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / "machine_a", tmp_path / "machine_b"]
    procs = [subprocess.Popen([sys.executable, "-m", "deltatl", *search_argv(tiny_data, out, "--storage", postgres_url)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for out in outs]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    trained = Counter()
    for out in outs:
        for summary in out.glob("trials/*/fold*/summary.json"):
            trained[(summary.parent.parent.name, summary.parent.name)] += 1
    assert trained == Counter({(f"alpha{float(a)!r}", f"fold{f}"): 1 for a in GRID for f in range(3)})
    assert sum(len(list(out.glob("refit/*/summary.json"))) for out in outs) == 1
    results = [json.loads((out / "search.json").read_text()) for out in outs]
    assert results[0] == results[1]
    trials = _study_trials(postgres_url)
    complete = Counter(t.user_attrs["key"] for t in trials if t.state.name == "COMPLETE")
    assert complete == Counter({**{f"alpha{float(a)!r}/fold{f}": 1 for a in GRID for f in range(3)}, REFIT: 1})
    # every complete trial says which worker and run directory did it, and that is where its run is
    for t in trials:
        if t.state.name == "COMPLETE":
            assert os.path.isfile(os.path.join(t.user_attrs["run_dir"], "summary.json"))
