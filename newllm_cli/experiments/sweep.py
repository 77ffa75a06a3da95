"""`newllm sweep`: grids and searches over any settings, kept in an Optuna study.

Each trial is an ordinary run, WORKSPACE/runs/SWEEP.flag-value..., made by the same stage code as
`newllm full`, so any of its stages can be rerun alone. The study (SQLite in the workspace, or any
database Optuna supports) records each trial's point, state, value (val perplexity of the head) and
one-line error.

A grid is put in the study's queue once, under a lock that is itself a study (its unique name makes
creating it atomic on every storage): a point gets queued only when the study has no finished,
running or queued trial of it. Workers take queued trials with Optuna's pop, which is atomic where the
database locks the row it reads (PostgreSQL, MySQL) and which SQLite makes atomic only when every
transaction takes the write lock at its start (`serialized`), so a point runs once however many
workers, local (`--jobs`) or on other machines, share the study. A worker that is
killed stops sending heartbeats; the next worker to look marks its trial failed, and the next sweep
command queues the point again.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from newllm_cli.experiments.replicate import replicate
from newllm_cli.runtime import locks
from newllm_cli.runtime.errors import NewLLMError, UsageError, first_line
from newllm_cli.runtime.progress import info, warn
from newllm_cli.runtime.session import current
from newllm_cli.settings import PROBE_ROWS, SECTIONS, Settings, flag_index, merge, validate

SAMPLERS = ("grid", "random", "tpe")
LOCK_TIMEOUT = 60.0  # seconds after which a queueing lock left by a killed process is taken over


@dataclass(frozen=True)
class Axis:
    """One swept setting: a list of values (grid, or choices of a search) or a numeric range."""

    flag: str
    section: str
    field: str
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False


def parse_axes(specs: list[str]) -> list[Axis]:
    """`--grid NAME=v1,v2,...` (values) or `--grid NAME=LOW:HIGH[:log]` (a range, searches only)."""
    flags, axes = flag_index(), list[Axis]()
    for spec in specs:
        name, sep, rest = spec.partition("=")
        name = name.strip().removeprefix("--")
        if not sep or not rest:
            raise UsageError(f"--grid {spec!r}: expected NAME=v1,v2,... or NAME=LOW:HIGH")
        if name not in flags:
            raise UsageError(f"--grid {spec!r}: no setting --{name} (see `newllm full --help`)")
        section, field = flags[name]
        if any(a.section == section and a.field == field for a in axes):
            raise UsageError(f"--grid names --{name} twice")
        if ":" in rest and "," not in rest:
            parts = rest.split(":")
            try:
                low, high = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                raise UsageError(f"--grid {spec!r}: a range is LOW:HIGH or LOW:HIGH:log") from None
            if (
                len(parts) > 3
                or (len(parts) == 3 and parts[2] != "log")
                or not low < high
                or not all(math.isfinite(v) for v in (low, high))
                or (len(parts) == 3 and low <= 0)
            ):
                raise UsageError(
                    f"--grid {spec!r}: a range is LOW:HIGH or LOW:HIGH:log with LOW < HIGH (LOW > 0 for log)"
                )
            axes.append(Axis(name, section, field, low=low, high=high, log=len(parts) == 3))
        else:
            values = tuple(v.strip() for v in rest.split(","))
            if any(not v for v in values) or len(set(values)) != len(values):
                raise UsageError(f"--grid {spec!r}: empty or repeated values")
            axes.append(Axis(name, section, field, values=values))
    return axes


def points(axes: list[Axis]) -> list[dict[str, str]]:
    """Every combination of a grid, as {flag: value}, in the order given."""
    if any(a.low is not None for a in axes):
        raise UsageError("a range (LOW:HIGH) needs a search: --sampler random or tpe with --trials N")
    return [dict(zip([a.flag for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]


def run_name(sweep: str, params: dict[str, str]) -> str:
    """SWEEP.flag-value.flag-value: a valid run name that says what the trial is."""
    parts = [sweep] + [f"{flag}-{value}" for flag, value in params.items()]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join(parts))


def trial_settings(base: dict, axes: list[Axis], params: dict[str, str], sweep: str) -> Settings:
    """The base settings with the trial's values and its own run; invalid values raise UsageError."""
    layer: dict = {"runtime": {"run": run_name(sweep, params)}}
    for a in axes:
        layer.setdefault(a.section, {})[a.field] = params[a.flag]
    return validate(merge(base, layer))


def storage_url(workspace: str, storage: str | None) -> str:
    if storage:
        return storage
    Path(workspace).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(workspace).resolve() / 'sweeps.db'}"


def open_storage(url: str, heartbeat: float):
    """Optuna's RDB storage with heartbeats, so that a killed worker's trial can be told from a
    running one; SQLite waits for its lock instead of failing at once."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials: our own one-line warning
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=max(1, round(heartbeat)),
                grace_period=max(2, round(3 * heartbeat)),
            )
            return serialized(storage) if url.startswith("sqlite") else storage
        except (ImportError, ModuleNotFoundError) as e:
            raise UsageError(f"--storage {url}: its database driver is missing ({first_line(e)})") from None
        except Exception as e:  # SQLAlchemy's errors: a bad URL, a server that does not answer, or two
            if attempt == 4:  # workers creating the schema of a new database at once (retried)
                raise UsageError(f"--storage {url}: {first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))


def serialized(storage):
    """SQLite transactions that take the write lock when they begin. Optuna pops a queued trial by
    reading its state and then writing RUNNING; SQLite's driver begins the transaction only at the
    write, so two workers could both read WAITING and both run the trial (measured: 23 of 200 trials
    popped twice by 4 processes). Begun IMMEDIATE, the second reader waits and then sees RUNNING."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _driver_does_not_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below decides instead

    @event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # connections made before the listeners are closed, not reused
    return storage


@contextmanager
def queue_lock(storage, name: str):
    """A study named NAME.queue-lock exists while one process fills the queue; creating it is atomic."""
    import optuna

    lock = f"{name}.queue-lock"
    deadline = time.monotonic() + 2 * LOCK_TIMEOUT
    while True:
        try:
            study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], lock)
            storage.set_study_user_attr(study_id, "since", time.time())
            break
        except optuna.exceptions.DuplicatedStudyError:
            try:
                held = optuna.load_study(study_name=lock, storage=storage)
                if time.time() - held.user_attrs.get("since", time.time()) > LOCK_TIMEOUT:
                    optuna.delete_study(study_name=lock, storage=storage)  # its holder was killed
                    continue
            except KeyError:  # released meanwhile
                continue
            if time.monotonic() > deadline:
                raise UsageError(f"the queue of sweep {name!r} stays locked; delete study {lock!r}") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        optuna.delete_study(study_name=lock, storage=storage)


def open_study(storage, name: str, axes: list[Axis], sampler: str, seed: int):
    import optuna

    samplers = {
        "grid": lambda: optuna.samplers.RandomSampler(seed=seed),  # never asked: grids are queued
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
    }
    study = optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, direction="minimize", sampler=samplers[sampler]()
    )
    axes_key = [[a.flag, list(a.values), a.low, a.high, a.log] for a in axes]
    known = study.user_attrs.get("axes")
    if known is None:
        study.set_user_attr("axes", axes_key)
        study.set_user_attr("sampler", sampler)
    elif known != axes_key or study.user_attrs.get("sampler") != sampler:
        raise UsageError(f"sweep {name!r} exists with other axes or sampler ({known}); choose another --name")
    return study


def fill_queue(storage, study, grid: list[dict[str, str]]) -> int:
    """Queue each grid point that has no finished, running or queued trial; return how many."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)  # killed workers' trials become failed ones
    with queue_lock(storage, study.study_name):
        live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        taken = {t.user_attrs.get("run") for t in study.get_trials(deepcopy=False, states=live)}
        added = 0
        for params in grid:
            run = run_name(study.study_name, params)
            if run not in taken:
                study.enqueue_trial(params, user_attrs={"run": run})
                added += 1
    return added


def work(
    s: Settings,
    study,
    axes: list[Axis],
    base: dict,
    search_trials: int | None,
    force: bool,
    probe_rows: int,
    seeds: int = 1,
) -> None:
    """Take trials until the queue is empty (a grid) or the study holds `search_trials` (a search)."""
    import optuna
    from optuna.trial import TrialState

    from newllm_cli import stages

    def objective(trial) -> float:
        grid = search_trials is None
        if grid and "run" not in trial.user_attrs:  # the last queued point went to another worker
            trial.study.stop()
            raise optuna.TrialPruned("no grid point left")
        params = {}
        for a in axes:
            if a.values:
                params[a.flag] = trial.suggest_categorical(a.flag, list(a.values))
            elif SECTIONS[a.section].model_fields[a.field].annotation is int:
                params[a.flag] = str(trial.suggest_int(a.flag, int(a.low or 0), int(a.high or 0), log=a.log))
            else:
                params[a.flag] = str(trial.suggest_float(a.flag, a.low, a.high, log=a.log))
        run = run_name(trial.study.study_name, params)
        trial.set_user_attr("run", run)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        info(f"sweep {trial.study.study_name}: trial {trial.number} -> run {run}")
        try:
            settings = trial_settings(base, axes, params, trial.study.study_name)
            if seeds > 1:  # the point under several seeds: its value, the head's geometric mean perplexity
                pooled = replicate(settings, seeds, force=force, probe_rows=probe_rows)
                trial.set_user_attr("runs", [r["run"] for r in pooled["runs"]])
                trial.set_user_attr("replicate", pooled["path"])
                return math.exp(sum(math.log(r["perplexity"]) for r in pooled["runs"]) / len(pooled["runs"]))
            with locks.run(settings.runtime.workspace, run):
                out = stages.full(settings, force=force, probe_rows=probe_rows)
        except Exception as e:
            trial.set_user_attr("error", first_line(e))
            warn(f"trial {trial.number} ({run}) failed: {first_line(e)}")
            raise
        return float(out["phase2"]["val"]["perplexity"])

    def enough(study, _trial) -> None:
        if search_trials is None:
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                study.stop()
        elif len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))) >= search_trials:
            study.stop()

    if search_trials is None and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    if (
        search_trials is not None
        and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= search_trials
    ):
        return
    try:
        study.optimize(objective, catch=(Exception,), callbacks=[enough], gc_after_trial=True)
    except Exception as e:  # the study's database failed (optuna may hide it behind an error of its own)
        cause = storage_error(e)
        if cause is None:
            raise
        raise NewLLMError(
            f"the sweep's storage failed: {type(cause).__name__}: {first_line(cause)[:200]}; "
            "rerun the same command to run the points left"
        ) from None


def storage_error(e: BaseException) -> BaseException | None:
    """The database error behind `e` (SQLAlchemy's or Optuna's storage error), if any."""
    chain: list[BaseException] = []
    node: BaseException | None = e
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    found = [x for x in chain if type(x).__module__.startswith("sqlalchemy")]  # the database's own words first
    found += [x for x in chain if type(x).__name__ == "StorageInternalError"]
    return found[0] if found else None


def summary(study) -> dict:
    """Each trial of the study: its point, run, state, val perplexity and error."""
    trials = [
        {
            "number": t.number,
            "run": t.user_attrs.get("run"),
            "params": t.params,
            "state": t.state.name,
            "value": t.value,
            "error": t.user_attrs.get("error"),
        }
        for t in study.get_trials(deepcopy=False)
        if "run" in t.user_attrs
    ]
    return {
        "sweep": study.study_name,
        "trials": trials,
        "counts": {state: sum(t["state"] == state for t in trials) for state in {t["state"] for t in trials}},
    }


def spawn_workers(argv: list[str], jobs: int, threads: int) -> None:
    """`jobs` copies of this sweep command as worker processes sharing the study (what a user would
    start on other machines), sharing the cores unless --threads says otherwise."""
    extra = ["--worker"] + ([] if threads else ["--threads", str(max(1, (os.cpu_count() or 1) // jobs))])
    cmd = [sys.executable, "-m", "newllm_cli", *argv, *extra]
    procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) for _ in range(jobs)]
    info(f"started {jobs} workers: pids {', '.join(str(p.pid) for p in procs)}")
    codes = [p.wait() for p in procs]
    failed = [f"{p.pid} ({f'signal {-c}' if c < 0 else f'exit {c}'})" for p, c in zip(procs, codes) if c]
    if failed:
        raise NewLLMError(
            f"workers {', '.join(failed)} stopped early (their error lines are above); "
            "rerun the same command to run the rest"
        )


def sweep(
    s: Settings,
    name: str,
    grid: list[str],
    sampler: str = "grid",
    trials: int | None = None,
    storage: str | None = None,
    jobs: int = 1,
    force: bool = False,
    probe_rows: int = PROBE_ROWS,
    heartbeat: float = 10.0,
    worker: bool = False,
    seeds: int = 1,
) -> dict:
    """Run every point of a grid (or TRIALS points of a search) as ordinary runs named SWEEP.flag-value...,
    with N local workers, sharing the study with any other `newllm sweep` on the same --storage."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise UsageError("--name must be letters, digits, '_' or '-'")
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler must be one of {', '.join(SAMPLERS)}")
    if jobs < 1 or seeds < 1 or (trials is not None and trials < 1):
        raise UsageError("--jobs, --trials and --seeds must be positive")
    if not (math.isfinite(heartbeat) and 0 < heartbeat <= 3600):
        raise UsageError(f"--heartbeat must be a number of seconds in (0, 3600], not {heartbeat:g}")
    axes = parse_axes(grid)
    if not axes:
        raise UsageError("give at least one --grid NAME=v1,v2,...")
    if sampler == "grid":
        if trials is not None:
            raise UsageError("--trials is for searches (--sampler random or tpe); a grid runs every point")
        todo = points(axes)
    elif trials is None:
        raise UsageError(f"--sampler {sampler} needs --trials N")
    base = s.model_dump()
    for params in todo if sampler == "grid" else []:
        try:
            trial_settings(base, axes, params, name)
        except UsageError as e:  # recorded as that trial's failure; the others still run
            warn(f"point {params}: {e}")
    url = storage_url(s.runtime.workspace, storage)
    store = open_storage(url, heartbeat)
    study = open_study(store, name, axes, sampler, s.runtime.seed)
    if not worker:
        if sampler == "grid":
            info(f"sweep {name}: {len(todo)} points, {fill_queue(store, study, todo)} queued now; study in {url}")
        if jobs > 1:
            spawn_workers(list(current().argv), jobs, s.runtime.threads)  # copies of this very command
            return {**summary(study), "storage": url}
    work(s, study, axes, base, None if sampler == "grid" else trials, force, probe_rows, seeds)
    return {**summary(study), "storage": url}
