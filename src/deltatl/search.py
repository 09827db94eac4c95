"""``deltatl search``: alpha (and optionally beta, lr) of one method chosen by k-fold cross-validation.

The protocol
    1. The training split (what ``deltatl train`` draws from ``--data``, ``--train-per-class`` and
       ``--seed``) is cut into k stratified, seeded folds (:mod:`deltatl.data.folds`), written to
       ``<out>/folds/fold<i>.txt``. The test split takes no part.
    2. Every grid point x fold is one training run (``<out>/trials/<point>/fold<i>``): train on the
       other k-1 folds, validate on fold i (:attr:`TrainConfig.cv_folds` / ``cv_fold``).
    3. The grid point with the highest mean validation top-1 over the folds is chosen; ties go to the
       earlier grid point, in the order given (alpha values first, then beta, then lr).
    4. The chosen point is refit on the whole training split (``<out>/refit/<point>``) and evaluated
       once on the test split.
    ``search.json`` and ``search.md`` in ``<out>`` hold every fold result, the choice and the refit.

Sharing the work (Optuna)
    One Optuna study holds one trial per (grid point, fold) and one ``refit`` trial, each with a
    ``key`` user attribute. Trials are enqueued with fixed parameters; the sampler never chooses.
    A worker takes a waiting trial with the storage's atomic WAITING -> RUNNING update (a row lock
    in PostgreSQL), so two workers never take the same trial. Every worker enqueues the keys that
    have no waiting, running or complete trial (there is no "creator" whose crash could leave the
    study half-filled). Two workers may enqueue one key at the same moment; so a worker that takes a
    trial checks first whether a lower-numbered trial of its key is waiting, running or complete,
    and if so marks its own PRUNED (``duplicate_of``) without training. Optuna numbers trials under a
    lock on the study row, so of two copies the lower-numbered is the older and is visible to
    whoever sees the newer: exactly one copy of a key trains. The refit is one more key, enqueued
    once every fold trial is complete, so it also runs once, whichever worker saw the study done.
    A fold trial's value is its validation top-1; the refit trial's is the chosen point's mean over
    the folds (so the study's best value stays a validation score), its test top-1 a user attribute.

    A worker with nothing to take waits (polling) for the trials running elsewhere, or, with
    ``leave_when_idle``, leaves them to their workers (the last one runs the refit and writes the
    results), free for other work: a queue of searches on a few machines keeps every one busy. A trial whose
    worker died is failed after its heartbeat (timed by the database's clock) stops for the grace
    period, or at once by a worker on the same host that sees its process gone; its key is then
    enqueued again, and its run directory, if on this machine, resumes from its checkpoint
    (``--resume``). Finished runs are always reused: from the study, or from their run directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import socket
import statistics
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from .config import TrainConfig
from .data.folds import stratified_folds, write_folds
from .data.images import ImageCollection
from .methods import get_method
from .errors import DeltatlError
from .outputs import atomic_open, check_output_folder

# What search writes in --out (the study database with its journal files, the folds, the runs, results).
OWN_FILES = ("study.db*", "folds", "trials", "refit", "search.json", "search.md", "*.tmp",
             "optimization_history.png", "param_importances.png")
STUDY_FILE = "study.db"  # the embedded SQLite study, in --out
DEFAULT_STUDY = "deltatl-search"
SPEC_ATTR = "deltatl_search"  # study user attribute: what the study searches (checked by every worker)
REFIT = "refit"
PARAMS = ("alpha", "beta", "lr")
TIE_RULE = ("highest mean validation top-1 over the folds; ties go to the earlier grid point: "
            "alpha values in the order given, then beta, then lr")
# Summary fields copied into a trial's user attributes (and so into search.json).
_SUMMARY_FIELDS = ("val_top1", "val_loss", "test_top1", "test_loss", "seconds", "epochs", "steps",
                   "train_images", "reused")


@dataclass(frozen=True)
class Grid:
    """Candidate values; a parameter with no values keeps the base config's value."""

    alpha: tuple[float, ...] = ()
    beta: tuple[float, ...] = ()
    lr: tuple[float, ...] = ()

    def names(self) -> list[str]:
        return [n for n in PARAMS if getattr(self, n)]

    def points(self) -> list[dict[str, float]]:
        """Every combination, alpha outermost: the order that breaks ties."""
        names = self.names()
        if not names:  # product() of nothing is one empty point; an empty grid has none
            return []
        return [dict(zip(names, combo)) for combo in itertools.product(*(getattr(self, n) for n in names))]

    def as_dict(self) -> dict[str, list[float]]:
        return {n: list(getattr(self, n)) for n in self.names()}


def point_label(point: dict[str, float]) -> str:
    """``alpha0.001_lr0.01``: the run-directory name of a grid point (``repr`` keeps distinct floats apart)."""
    return "_".join(f"{name}{value!r}" for name, value in point.items()) or "base"


def fold_key(point: dict[str, float], fold: int) -> str:
    return f"{point_label(point)}/fold{fold}"


def fold_config(base: TrainConfig, point: dict[str, float], folds: int, fold: int, out: str) -> TrainConfig:
    """The run of one grid point on one fold (train on the others, validate on it)."""
    return replace(base, **point, cv_folds=folds, cv_fold=fold,
                   out=os.path.join(out, "trials", point_label(point), f"fold{fold}"))


def refit_config(base: TrainConfig, point: dict[str, float], out: str) -> TrainConfig:
    """The chosen point on the whole training split, evaluated on the test split."""
    return replace(base, **point, out=os.path.join(out, "refit", point_label(point)))


def choose(scores: Sequence[Sequence[float]]) -> int:
    """Index of the grid point with the highest mean score; the first of ties (see :data:`TIE_RULE`).

    ``statistics.fmean`` sums exactly, so equal fold scores in another order give an exactly equal mean.
    """
    means = [statistics.fmean(s) for s in scores]
    return max(range(len(means)), key=lambda i: means[i])  # max() keeps the first of equal keys


def default_alpha_grid(base: TrainConfig) -> tuple[float, ...]:
    """The alphas searched when no grid is given: the run's alpha (the method's default unless given)
    and a decade either side, as the evidence searched them (README, "Measured on the embedded default");
    empty for a method without alpha."""
    alpha = base.resolved_alpha()
    return () if alpha is None else tuple(float(f"{alpha * factor:.6g}") for factor in (0.1, 1, 10))


def check_search(base: TrainConfig, grid: Grid, folds: int, out: str) -> list[dict[str, float]]:
    """Validate the search before anything is written; return the grid points."""
    method = get_method(base.method)
    if base.cv_folds is not None:
        raise DeltatlError("the base settings of a search must not set cv_folds / cv_fold")
    points = grid.points()
    if not points and method.uses("alpha"):
        raise DeltatlError("the grid is empty: give values to `alpha_grid` (default_alpha_grid(base) is the "
                           "command line's default)")
    if not points:
        raise DeltatlError(f"method '{base.method}' has no alpha: give a grid (`lr_grid`) or choose a method with "
                           f"alpha")
    if (grid.alpha and not method.uses("alpha")) or (grid.beta and not method.uses("beta")):
        raise DeltatlError(f"method '{base.method}' has no alpha or beta to search "
                           f"(l2-sp, delta-noatt and delta have; `lr_grid` works with any method)")
    if folds < 2:
        raise DeltatlError(f"`folds` must be at least 2, got {folds}")
    check_output_folder(out, "search", OWN_FILES)
    for point in points:  # e.g. --lr-grid 0 is refused by TrainConfig here, not after hours of training
        fold_config(base, point, folds, 0, out)
    return points


def stored_where(storage: str | None) -> str:
    """The study's storage as the result files name it: the URL without password, or the SQLite file in
    ``--out`` (not its absolute path, which is this machine's)."""
    return redact(storage) if storage else f"{STUDY_FILE} (SQLite, in --out)"


def redact(url: str) -> str:
    """A storage URL without its password, for messages and files."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy's default changed from psycopg2
    to psycopg (3) in 2.1, and ``deltatl[postgres]`` installs psycopg."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url[len("postgresql"):]
    raise DeltatlError(f"`storage` {redact(url)} needs a PostgreSQL driver: pip install 'deltatl[postgres]'")


def open_storage(url: str, heartbeat_seconds: int) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats; a bad URL or an unreachable server is a DeltatlError."""
    import sqlalchemy.exc  # Optuna's dependency

    shown, url = redact(url), _with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for another process's write lock
    attempts = 5
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_seconds,
                                                  grace_period=5 * heartbeat_seconds)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Two workers creating the tables of a fresh database at once: the loser's CREATE or
            # INSERT fails; creation is idempotent, so try again (a real error fails every attempt).
            if attempt == attempts - 1:
                raise DeltatlError(f"cannot open `storage` {shown}: {_first_line(exc)}") from None
            time.sleep(0.2 + random.random())
        except ModuleNotFoundError as exc:
            raise DeltatlError(f"`storage` {shown} needs the database driver {exc.name}") from None
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, optuna.exceptions.OptunaError) as exc:
            cause = exc.__cause__ if isinstance(exc, ImportError) and exc.__cause__ else exc
            raise DeltatlError(f"cannot open `storage` {shown}: {_first_line(cause)}") from None
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _host_token() -> str:
    """This host and PID namespace: process ids are comparable only between workers with the same token."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def _heartbeat(storage: Any, trial_id: int, seconds: float) -> Iterator[None]:
    """Record the trial's heartbeat every ``seconds`` while the block runs (a missing one fails the trial)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(seconds):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a database hiccup: the next beat may succeed; the grace period is long
                pass

    thread = threading.Thread(target=beat, name=f"deltatl-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Job:
    key: str
    point: dict[str, float]
    fold: int | None  # None: the refit


# A key with a trial in one of these states is taken care of (not enqueued again).
_LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


class _Board:
    """The study's trials grouped by key."""

    def __init__(self, trials: Sequence[FrozenTrial]):
        self.trials = trials
        self.by_key: dict[str, list[FrozenTrial]] = {}
        for t in trials:
            if "key" in t.user_attrs:
                self.by_key.setdefault(t.user_attrs["key"], []).append(t)

    def live(self, key: str) -> bool:
        return any(t.state in _LIVE for t in self.by_key.get(key, []))

    def complete(self, key: str) -> FrozenTrial | None:
        return next((t for t in self.by_key.get(key, []) if t.state == TrialState.COMPLETE), None)

    def older_live(self, key: str, number: int) -> FrozenTrial | None:
        return next((t for t in self.by_key.get(key, []) if t.number < number and t.state in _LIVE), None)


class _Search:
    """One worker of one search (several may share the study, on this machine or others)."""

    def __init__(self, base: TrainConfig, grid: Grid, points: list[dict[str, float]], folds: int, out: str,
                 study: optuna.Study, storage: Any, train: Callable[[TrainConfig], dict[str, Any]],
                 poll_seconds: float, heartbeat_seconds: float, log: Callable[[str], None],
                 leave_when_idle: bool = False):
        self.base, self.grid, self.points, self.folds, self.out = base, grid, points, folds, out
        self.leave_when_idle = leave_when_idle
        self.study, self.storage, self.train, self.log = study, storage, train, log
        self.poll_seconds, self.heartbeat_seconds = poll_seconds, heartbeat_seconds
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.jobs = {fold_key(p, f): _Job(fold_key(p, f), p, f) for p in points for f in range(folds)}
        self.by_label = {point_label(p): p for p in points}
        self.worker = f"{_host_token()}|{os.getpid()}"

    # --- the study ------------------------------------------------------------------------------

    def _fail_dead_trials(self) -> None:
        """Fail running trials whose worker is gone, so that their keys are enqueued again."""
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # heartbeat older than the grace period
        host = _host_token()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = str(t.user_attrs.get("worker", ""))
            w_host, _, pid = worker.rpartition("|")
            if w_host == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                self._finish(t._trial_id, TrialState.FAIL)  # noqa: SLF001 (Optuna has no public trial id)

    def _finish(self, trial_id: int, state: Any, **attrs: Any) -> bool:
        """Set attributes and a final state unless the trial is already finished; True if done here."""
        try:
            for name, value in attrs.items():
                self.storage.set_trial_user_attr(trial_id, name, value)
            return self.storage.set_trial_state_values(trial_id, state)
        except UpdateFinishedTrialError:
            return False

    def _enqueue_missing(self, board: _Board) -> None:
        for key, job in self.jobs.items():
            if not board.live(key):
                self.study.enqueue_trial(job.point, user_attrs={"key": key, "kind": "fold", "fold": job.fold,
                                                                "point": point_label(job.point)})
        if all(board.complete(k) for k in self.jobs) and not board.live(REFIT):
            point = self.points[self._choice(board)[0]]
            self.study.enqueue_trial(point, user_attrs={"key": REFIT, "kind": "refit", "point": point_label(point)})

    def _take(self) -> FrozenTrial | None:
        """Atomically move one waiting trial of this search to RUNNING, for this worker."""
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,)):
            key = t.user_attrs.get("key")
            if key not in self.jobs and key != REFIT:
                continue
            try:
                if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):  # noqa: SLF001
                    self.storage.record_heartbeat(t._trial_id)  # noqa: SLF001
                    self.storage.set_trial_user_attr(t._trial_id, "worker", self.worker)  # noqa: SLF001
                    return t
            except UpdateFinishedTrialError:
                continue
        return None

    def _choice(self, board: _Board) -> tuple[int, list[list[float]]]:
        scores = [[board.complete(fold_key(p, f)).value for f in range(self.folds)]  # type: ignore[union-attr]
                  for p in self.points]
        return choose(scores), scores

    # --- the work -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any] | None:
        """Take and run trials until the refit is complete; return the results (None: left idle)."""
        waiting_for: int | None = None
        while True:
            self._fail_dead_trials()
            board = _Board(self.study.get_trials(deepcopy=False))
            if board.complete(REFIT):
                return self._results(board)
            self._enqueue_missing(board)
            taken = self._take()
            if taken is None:
                running = sum(t.state == TrialState.RUNNING for t in board.trials)
                if self.leave_when_idle and running:
                    self.log(f"nothing left to start: leaving {running} running trial(s) to their workers (the "
                             f"last one writes the results)")
                    return None
                if running != waiting_for:
                    self.log(f"waiting for {running} trial(s) running on other workers")
                    waiting_for = running
                time.sleep(self.poll_seconds)
                continue
            waiting_for = None
            key = taken.user_attrs["key"]
            board = _Board(self.study.get_trials(deepcopy=False))  # read after taking: see the module doc
            older = board.older_live(key, taken.number)
            if older is not None:
                self._finish(taken._trial_id, TrialState.PRUNED, duplicate_of=older.number)  # noqa: SLF001
                continue
            if key == REFIT:
                point = self.by_label[taken.user_attrs["point"]]
                index, scores = self._choice(board)
                self._run_trial(taken, _Job(REFIT, point, None), value=statistics.fmean(scores[index]))
            else:
                self._run_trial(taken, self.jobs[key], value=None)

    def _run_trial(self, taken: FrozenTrial, job: _Job, value: float | None) -> None:
        """Train one job in its run directory and record the result (a fold's value: its val top-1)."""
        trial_id = taken._trial_id  # noqa: SLF001
        trial = optuna.Trial(self.study, trial_id)
        for name in job.point:  # the enqueued values, recorded as the trial's parameters
            trial.suggest_categorical(name, list(getattr(self.grid, name)))
        if job.fold is None:
            config = refit_config(self.base, job.point, self.out)
        else:
            config = fold_config(self.base, job.point, self.folds, job.fold, self.out)
        self.storage.set_trial_user_attr(trial_id, "run_dir", os.path.abspath(config.out or ""))
        self.log(f"trial {taken.number}: {job.key} -> {config.out}")
        with _heartbeat(self.storage, trial_id, self.heartbeat_seconds):
            try:
                summary = self.train(config)
            except BaseException:  # an error or Ctrl-C: the key is enqueued again by the next worker loop
                self._finish(trial_id, TrialState.FAIL)
                raise
        if job.fold is not None:
            value = summary.get("val_top1")
            if value is None:
                self._finish(trial_id, TrialState.FAIL)
                raise DeltatlError(f"the run in {config.out} has no validation accuracy")
        try:  # one attribute, one database commit
            self.storage.set_trial_user_attr(trial_id, "summary", {k: summary[k] for k in _SUMMARY_FIELDS
                                                                   if k in summary})
            self.study.tell(trial, value)
        except UpdateFinishedTrialError:
            warnings.warn(f"trial {taken.number} ({job.key}) was given up by another worker while it ran "
                          f"(no heartbeat for a while); its result stays in {config.out}", stacklevel=2)

    # --- the results ----------------------------------------------------------------------------

    def _in_out(self, config: TrainConfig) -> str:
        """A run directory as the result files name it: relative to ``--out`` (the study keeps the
        absolute path its worker saw), so every worker writes the same files, on any machine."""
        return os.path.relpath(config.out or "", self.out)

    def _results(self, board: _Board) -> dict[str, Any]:
        index, scores = self._choice(board)
        refit = board.complete(REFIT)
        assert refit is not None
        trials = []
        for p in self.points:
            for f in range(self.folds):
                t = board.complete(fold_key(p, f))
                assert t is not None
                trials.append({"point": point_label(p), **p, "fold": f, "val_top1": t.value, "trial": t.number,
                               "run_dir": self._in_out(fold_config(self.base, p, self.folds, f, self.out)),
                               "worker": t.user_attrs.get("worker"),
                               **{k: t.user_attrs.get("summary", {}).get(k) for k in ("seconds", "reused")}})
        points = [{"point": point_label(p), **p, "val_top1": s, "mean": statistics.fmean(s),
                   "std": statistics.stdev(s) if len(s) > 1 else 0.0} for p, s in zip(self.points, scores)]
        chosen = self.points[index]
        if refit.user_attrs.get("point") != point_label(chosen):
            raise DeltatlError(f"the study's refit ({refit.user_attrs.get('point')}) is not the chosen point "
                               f"({point_label(chosen)}); the study was changed by hand?")
        return {
            "method": self.base.method, "rifle": self.base.rifle, "folds": self.folds, "grid": self.grid.as_dict(),
            "rule": TIE_RULE, "study": self.study.study_name, "points": points, "trials": trials,
            "chosen": chosen,
            "refit": {"point": point_label(chosen), "trial": refit.number, "cv_mean": refit.value,
                      "run_dir": self._in_out(refit_config(self.base, chosen, self.out)),
                      "worker": refit.user_attrs.get("worker"),
                      **refit.user_attrs.get("summary", {})},
        }


def search(base: TrainConfig, train_split: ImageCollection, grid: Grid, out: str, *, folds: int = 5,
           storage: str | None = None, study_name: str = DEFAULT_STUDY,
           train: Callable[[TrainConfig], dict[str, Any]], poll_seconds: float = 10.0,
           heartbeat_seconds: int = 60, log: Callable[[str], None] | None = None,
           leave_when_idle: bool = False) -> dict[str, Any] | None:
    """Run one worker of a cross-validated grid search, until the study's refit is done; return the results.

    Args:
        base: the settings every run shares (``base.method`` is the method searched).
        train_split: the whole training split of ``base`` (the folds are cut from it; the fold runs
            draw the same images themselves from their config).
        out: results folder: folds, run directories, ``search.json`` / ``search.md`` and, without
            ``storage``, the SQLite study.
        storage: an SQLAlchemy URL of the study's database (``postgresql://user@host/db``) shared by
            workers on several machines; None: ``sqlite:///<out>/study.db``.
        train: runs one config and returns its summary (``deltatl.run.train_run`` with options bound).
        poll_seconds: how often a worker with nothing to take looks again.
        heartbeat_seconds: heartbeat period of a running trial; after 5 missed periods another worker
            fails the trial and its (point, fold) is run again.
        leave_when_idle: return None, results unwritten, once nothing is left to start while other
            workers still run trials (instead of waiting for them).
    """
    log = log or (lambda msg: print(f"deltatl search: {msg}", file=sys.stderr))
    points = check_search(base, grid, folds, out)
    fold_lists = stratified_folds(train_split.targets, folds, base.seed, train_split.classes)
    url = storage or f"sqlite:///{os.path.abspath(os.path.join(out, STUDY_FILE))}"
    if storage is None:
        os.makedirs(out, exist_ok=True)
    rdb = open_storage(url, heartbeat_seconds)
    try:
        study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize", load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler(seed=0))  # never samples: all enqueued
    except Exception as exc:  # noqa: BLE001  (any database error, as one line)
        raise DeltatlError(f"cannot open study '{study_name}' in {redact(url)}: {_first_line(exc)}") from None
    _check_spec(study, _spec(base, grid, folds, train_split, fold_lists), redact(url))
    os.makedirs(out, exist_ok=True)
    write_folds(os.path.join(out, "folds"), train_split, fold_lists)
    worker = _Search(base, grid, points, folds, out, study, rdb, train, poll_seconds, heartbeat_seconds, log,
                     leave_when_idle)
    log(f"study '{study_name}' in {redact(url)}: {len(worker.jobs)} fold runs + 1 refit")
    results = worker.run()
    if results is None:
        return None
    results["storage"] = stored_where(storage)
    write_results(out, results)
    return results


def _spec(base: TrainConfig, grid: Grid, folds: int, train_split: ImageCollection,
          fold_lists: Sequence[Sequence[int]]) -> dict[str, Any]:
    """What a study searches: workers with another spec must not join it. The data may sit at another
    path on each machine (``data``, ``data_root``): the digest of the fold lists (image ids relative
    to the dataset root, labels) checks that it is the same data. A searched parameter's base value
    does not matter."""
    config = {k: v for k, v in base.result_fields().items() if k not in ("data", "data_root", *grid.names())}
    digest = hashlib.sha256(json.dumps([[(train_split.ids[i], train_split.targets[i]) for i in part]
                                        for part in fold_lists]).encode()).hexdigest()
    return json.loads(json.dumps({"folds": folds, "grid": grid.as_dict(), "fold_lists": digest, "config": config}))


def _check_spec(study: optuna.Study, spec: dict[str, Any], where: str) -> None:
    recorded = study.user_attrs.get(SPEC_ATTR)
    if recorded is None:
        study.set_user_attr(SPEC_ATTR, spec)
        recorded = spec
    # As for run folders: a setting added to deltatl after the study was recorded counts at its default,
    # and one recorded that is no longer part of what a run computes (an execution setting) is not compared.
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    was = {**{k: defaults[k] for k in spec["config"] if k in defaults}, **recorded.get("config", {})}
    changed = sorted({k for k in ("folds", "grid", "fold_lists") if recorded.get(k) != spec.get(k)} | {
        k for k in spec["config"] if was.get(k) != spec["config"][k]})
    if changed:
        raise DeltatlError(f"study '{study.study_name}' in {where} holds another search (differs in: "
                           f"{', '.join(changed)}); choose another `study_name` (a wider grid then reuses the "
                           f"folder's finished runs) or `out`")


def markdown(results: dict[str, Any]) -> str:
    """The fold table (one row per grid point), the choice and the refit."""
    names = list(results["grid"])
    k = results["folds"]
    chosen = point_label(results["chosen"])
    head = [*names, *(f"fold {f}" for f in range(k)), "mean ± std"]
    lines = [f"# deltatl search: {results['method']}" + (f"+rifle{results['rifle']}" if results["rifle"] else "")
             + f", {k}-fold cross-validation", "",
             "Validation top-1 (%) of each fold run (trained on the other folds).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in results["points"]:
        cells = [f"{p[n]:g}" for n in names]
        if p["point"] == chosen:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join([*cells, *(f"{v:.2f}" for v in p["val_top1"]),
                                        f"{p['mean']:.2f} ± {p['std']:.2f}"]) + " |")
    refit = results["refit"]
    test = "-" if refit.get("test_top1") is None else f"{refit['test_top1']:.2f} %"
    lines += ["", f"Chosen: {', '.join(f'{n} = {v:g}' for n, v in results['chosen'].items())} "
                  f"({results['rule']}).",
              f"Refit on the whole training split ({refit.get('train_images', '?')} images): test top-1 {test} "
              f"(`{refit.get('run_dir')}`)."]
    return "\n".join(lines) + "\n"


def write_results(out: str, results: dict[str, Any]) -> None:
    """``search.json`` (everything) and ``search.md`` (the table), written atomically."""
    for name, text in (("search.json", json.dumps(results, indent=2) + "\n"), ("search.md", markdown(results))):
        with atomic_open(os.path.join(out, name)) as f:
            f.write(text)
