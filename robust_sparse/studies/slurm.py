"""``backend: slurm`` of ``robust-sparse sweep``: every run is one Slurm job (one job array for the sweep),
submitted through submitit, with no surprise:

* no ``sbatch`` (or ``srun``) on PATH: a one-line refusal, never submitit's silent fall-back to this machine
  (``slurm: {debug: true}`` runs the jobs one by one in the sweep's own process, for debugging);
* the ``slurm:`` mapping takes submitit's names: its shared ones (``timeout_min``, ``mem_gb``, ``nodes``,
  ``tasks_per_node``, ``gpus_per_node``, ``cpus_per_task``, ``name``, ``stderr_to_stdout``) and
  ``slurm_<sbatch option>`` (``slurm_partition``, ``slurm_qos``, ...); a bare sbatch name (``partition``) is
  translated with a warning, anything else is refused; the sbatch script is built once to check the values;
* every value that goes into the sbatch script is checked first: an option's value holds no newline (or other
  control character), quote, ``;``, ``\\``, backquote or ``$``, so none can end its ``#SBATCH`` line and start a
  shell line; ``slurm_setup`` (and ``slurm_teardown``) lines are the only shell lines a sweep file adds, one
  line per entry; ``sweep --dry-run`` prints the script exactly as it is submitted;
* a job of N tasks (``nodes`` x ``tasks_per_node``, one per GPU) trains one run with torch.distributed
  initialised from submitit's job environment (SLURM_PROCID, SLURM_NTASKS, the job's first node), through the
  same DDP path as ``torchrun`` (robust_sparse.distributed); ``gpus_per_node: 4`` alone means 4 tasks per node;
* sbatch, sacct and squeue run with a time limit, in their own process group, killed on a timeout or an
  interruption (one SIGTERM stops a sweep even while sbatch hangs); sbatch's failure is one line with its own
  message;
* job ids are recorded in ``SWEEP_DIR/slurm/jobs.json`` (atomically, right after submission); a rerun checks
  every recorded id has Slurm's shape before any path is built from it, asks Slurm for their state (sacct
  where the cluster keeps accounting, else scontrol or ``squeue -t all`` while Slurm remembers the job, else
  what the run wrote), waits on a job that is pending or running instead of submitting it again, and says per
  job what became of one that ended FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL or PREEMPTED (Slurm's
  words, its exit code and signal, the log where one was written) before submitting the run again with
  ``--resume`` from its last.pt;
* while jobs are pending or running the sweep looks at them after 2 s, then less often while nothing changes
  (up to ``slurm.poll_seconds``, 20 s by default), and rewrites runs.csv at each change; a cluster without
  accounting is said once per sweep, and submitit's repeated sacct warnings are filtered;
* a job's training ignores submitit's USR2 (90 s before the time limit) and saves last.pt on Slurm's SIGTERM
  at the limit (TIMEOUT); a failed training ends its job with the training's exit status (FAILED);
* a job's outcome is what its run wrote (its marker, or the evaluation stage's result) and Slurm's state,
  never submitit's result pickle: unpickling runs whatever the file names, and a file in the sweep directory
  is no proof of who wrote it. The sweep process reads no pickle at all (the jobs read their own submission).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from robust_sparse.files.atomic import write_atomic
from robust_sparse.config import coerce
from robust_sparse.errors import ConfigError, ExitCode, UserError
from robust_sparse.studies import local

log = logging.getLogger(__name__)

# submitit's names shared by its executors (AutoExecutor), with their types
SHARED = {"name": str, "timeout_min": int, "mem_gb": float, "nodes": int, "cpus_per_task": int, "gpus_per_node": int,
          "tasks_per_node": int, "stderr_to_stdout": bool}
OWN = {"debug": bool,  # ours: run the jobs in this process (submitit's debug executor)
       "poll_seconds": float}  # ours: the longest wait between two looks at the jobs' states
RECORD = "jobs.json"  # in SWEEP_DIR/slurm/: the job id of every submitted run, by stage
# Slurm states of a job that is still queued or running: a rerun waits on it and never submits it again. Not
# PREEMPTED: a job Slurm requeues after a preemption shows as PENDING (or REQUEUED) again, so one that stays
# PREEMPTED has ended and is submitted again, with --resume, like FAILED, CANCELLED and TIMEOUT
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "READY"}
POLL_FIRST = 2.0  # seconds to the first look at the jobs after a submission or a change of state
POLL_SECONDS = 20.0  # the longest wait between two looks (slurm.poll_seconds); runs.csv lags no more than this
USR2_LEAD_SECONDS = 90  # submitit's #SBATCH --signal=USR2@90: Slurm's warning before a job's time limit
SHORT_LIMIT_SECONDS = 180  # less than this after that warning: said once when the sweep file is read
STAGES = {"status": "train", "eval": "eval"}  # the runs.csv column a stage writes -> its key in jobs.json
COMMAND_SECONDS = 120.0  # the most sbatch, sacct or squeue may take; a busy controller answers within seconds
# Slurm's job id shapes: 123, an array task 123_4, a pending array 123_[0-9%2]; nothing else becomes a path
JOB_ID = re.compile(r"[0-9]+(?:_(?:[0-9]+|\[[0-9,%-]+\]))?")
# In an option's value these could end its #SBATCH line (a newline) or change how sbatch or the shell reads it
# (quotes, ';', a backslash, '`', '$'); control characters are refused with them
UNSAFE = re.compile(r"[\x00-\x1f\x7f'\";\\`$]")
LINES = ("setup", "teardown")  # sbatch options that are shell lines: the only lines a sweep file adds
OPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a key of slurm_additional_parameters: --KEY=value


class SubmissionError(UserError):
    """sbatch refused, failed, hung or answered without a job id; the message carries its own words."""


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweep backend slurm needs submitit: pip install 'robust-sparse[cluster]'") from None
    return submitit


def _sbatch_options() -> dict[str, Any]:
    """The sbatch options submitit's Slurm executor knows (``slurm_<name>``), with their defaults."""
    from submitit.slurm.slurm import _get_default_parameters

    return dict(_get_default_parameters())


def parameters(raw: dict[str, Any], where: str = "sweep slurm") -> dict[str, Any]:
    """The sweep file's ``slurm:`` mapping as submitit's AutoExecutor takes it, checked: one line per problem.
    Without submitit it is kept as it is: :func:`check_submission` refuses the sweep before it runs."""
    try:
        options = _sbatch_options()
    except ImportError:
        return dict(raw)
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key == "cluster":
            raise ConfigError(f"{where}.cluster: not used; backend: slurm submits to Slurm, backend: local runs on "
                              f"this machine, slurm: {{debug: true}} runs the jobs in the sweep's process")
        if key in OWN or key in SHARED:
            checked[key] = coerce(value, {**OWN, **SHARED}[key], f"{where}.{key}")
            _check_value(key, checked[key], f"{where}.{key}")
            continue
        name = key.removeprefix("slurm_")
        if name == "array_parallelism":
            raise ConfigError(f"{where}.{key}: set the sweep's parallel instead (jobs of the array at once)")
        if name not in options:
            known = ", ".join([*OWN, *SHARED, "slurm_<sbatch option>"])
            raise ConfigError(f"{where}.{key}: unknown; known: {known} (options: {', '.join(sorted(options))})")
        _check_value(name, value, f"{where}.{key}")
        if name == key:  # a bare sbatch name
            log.warning("%s.%s: submitit's name is slurm_%s; translated (write slurm_%s to silence this)", where,
                        key, key, key)
        checked[f"slurm_{name}"] = value
    # as submitit reads them: the cluster-specific name wins over the shared one
    gpus = checked.get("slurm_gpus_per_node", checked.get("gpus_per_node"))
    tasks = checked.get("slurm_ntasks_per_node", checked.get("tasks_per_node"))
    nodes = checked.get("slurm_nodes", checked.get("nodes"))
    for name, number in (("nodes", nodes), ("tasks_per_node", tasks), ("gpus_per_node", gpus)):
        if number is not None and (not isinstance(number, int) or number < (0 if name == "gpus_per_node" else 1)):
            raise ConfigError(f"{where}.{name} = {number!r}: must be an integer >= "
                              f"{0 if name == 'gpus_per_node' else 1}")
    if gpus and tasks is None and "slurm_gpus_per_task" not in checked:
        checked["tasks_per_node"] = tasks = gpus  # one rank per GPU
    if gpus and tasks and gpus != tasks and "slurm_gpus_per_task" not in checked:
        raise ConfigError(f"{where}: tasks_per_node = {tasks} with gpus_per_node = {gpus}; each task is one rank "
                          f"on one GPU, so give them the same value (or only gpus_per_node)")
    if "poll_seconds" in checked and not checked["poll_seconds"] > 0:
        raise ConfigError(f"{where}.poll_seconds = {checked['poll_seconds']!r}: must be a number of seconds > 0")
    _script(_submission_parameters(checked, map_count=2), Path(tempfile.gettempdir()))  # submitit's own checks
    _warn_short_limit(checked, where)
    return checked


def _warn_short_limit(checked: dict[str, Any], where: str) -> None:
    """One line when the time limit leaves under a few minutes after submitit's USR2 warning (90 s before it):
    the training keeps going until Slurm's SIGTERM at the limit (train_task ignores USR2), so a limit that short
    mostly stops runs midway."""
    name = "slurm_time" if isinstance(checked.get("slurm_time"), int) else "timeout_min"
    minutes = checked.get(name)
    if isinstance(minutes, int) and minutes * 60 - USR2_LEAD_SECONDS < SHORT_LIMIT_SECONDS:
        log.warning("%s.%s = %d: leaves %d s after submitit's time-limit warning (USR2, %d s before the limit); a "
                    "run still training at the limit is stopped (TIMEOUT, last.pt kept, the next sweep run "
                    "resumes it); give at least %d minutes", where, name, minutes,
                    max(0, minutes * 60 - USR2_LEAD_SECONDS), USR2_LEAD_SECONDS,
                    (USR2_LEAD_SECONDS + SHORT_LIMIT_SECONDS + 59) // 60)


def _check_value(name: str, value: Any, where: str) -> None:
    """A value bound for the sbatch script cannot add a line to it: shell lines (``setup``, ``teardown``) are
    lists of single lines; ``srun_args`` single-line arguments (submitit quotes them on srun's line); every
    other option a number, true/false or a string without :data:`UNSAFE` characters (an ``#SBATCH`` line is a
    comment to the shell only up to its newline, and sbatch reads its own quotes in it)."""
    if name in LINES or name == "srun_args":
        if not (isinstance(value, list) and all(isinstance(line, str) for line in value)):
            what = "shell lines" if name in LINES else "arguments of srun"
            raise ConfigError(f"{where} = {value!r}: must be a list of strings ({what}, one per entry)")
        for position, line in enumerate(value):
            if re.search(r"[\x00-\x1f\x7f]", line):
                raise ConfigError(f"{where}[{position}] = {line!r}: a newline or other control character; give "
                                  f"each line as its own entry")
        return
    if name == "additional_parameters":
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: must be a mapping of sbatch option names to values")
        for option, setting in value.items():
            if not (isinstance(option, str) and OPTION_NAME.fullmatch(option)):
                raise ConfigError(f"{where}: option name {option!r} must be letters, digits, '-' and '_'")
            _check_value(option, setting, f"{where}.{option}")
        return
    if isinstance(value, (bool, int, float)) or value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r}: must be a string, a number or true/false")
    if UNSAFE.search(value):
        raise ConfigError(f"{where} = {value!r}: a newline or other control character, a quote, ';', a backslash, "
                          f"'`' or '$' could add a line to the sbatch script; use letters, digits, spaces and "
                          f"-_.,:=@%+/[]()&|*!#")


def _check_folder(folder: Path) -> None:
    """The sweep directory is written into the script (the logs' #SBATCH lines, the job's command)."""
    if UNSAFE.search(str(folder.absolute())):
        raise ConfigError(f"sweep out_dir {str(folder)!r}: a path with a newline or other control character, a "
                          f"quote, ';', a backslash, '`' or '$' cannot go into an sbatch script; use another "
                          f"out_dir for backend: slurm")


def _executor_parameters(checked: dict[str, Any]) -> dict[str, Any]:
    """The Slurm executor's own parameters for an AutoExecutor mapping, as submitit translates them."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem

    equivalent = SlurmExecutor._equivalence_dict()
    translated = {equivalent[key]: value for key, value in checked.items() if key in SHARED}
    if "mem" in translated:
        translated["mem"] = _convert_mem(translated["mem"])
    translated.update({key.removeprefix("slurm_"): value for key, value in checked.items()
                       if key.startswith("slurm_")})  # the cluster-specific name wins, as in submitit
    return translated


def _submission_parameters(checked: dict[str, Any], parallel: int | None = None,
                           map_count: int | None = None) -> dict[str, Any]:
    """The executor's parameters for a submission: one job, or an array of ``map_count`` jobs."""
    parameters = _executor_parameters({key: value for key, value in checked.items() if key not in OWN})
    if parallel is not None:
        parameters["array_parallelism"] = parallel
    if map_count is not None:
        parameters["map_count"] = map_count
    return parameters


def _job_command(folder: Path) -> str:
    """What every task of a job runs, as submitit writes it: its runner on the job's pickled submission."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def _script(parameters: dict[str, Any], folder: Path) -> str:
    """The sbatch script for ``parameters`` with its logs in ``folder``: the one function the submission and
    ``sweep --dry-run`` both build it with, so the dry run shows exactly what sbatch receives."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).expanduser().absolute()  # as submitit's executor holds its folder
    try:
        return _make_sbatch_string(command=_job_command(folder), folder=folder, **parameters)
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(f"sweep slurm: submitit refuses these parameters: {error}") from None


def tasks(checked: dict[str, Any]) -> tuple[int, int]:
    """(nodes, tasks per node) of every training job."""
    nodes = checked.get("slurm_nodes", checked.get("nodes", 1))
    return int(nodes), int(checked.get("slurm_ntasks_per_node", checked.get("tasks_per_node", 1)) or 1)


def _named(checked: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The jobs named after the sweep directory in squeue, unless the sweep file names them."""
    if "name" in checked or "slurm_job_name" in checked:
        return dict(checked)
    return {**checked, "name": f"robust-sparse-{out_dir.name}"}


def _single_task(checked: dict[str, Any]) -> dict[str, Any]:
    """The evaluation stage runs one process per run: one task on one node, at most one GPU."""
    single = {key: value for key, value in checked.items()
              if key not in ("nodes", "tasks_per_node", "slurm_nodes", "slurm_ntasks_per_node")}
    for key in ("gpus_per_node", "slurm_gpus_per_node"):
        if key in single:
            single[key] = min(int(single[key]), 1)
    return single


def check_submission(checked: dict[str, Any], dry_run: bool = False, out_dir: Path | None = None) -> None:
    """Before anything is written or submitted: submitit is installed, the sweep directory can go into an sbatch
    script, the job ids it records are Slurm's and, unless only checking (``dry_run``) or debugging in-process,
    the Slurm commands it needs are on PATH."""
    _submitit()
    if checked.get("debug"):
        return
    if out_dir is not None:
        _check_folder(out_dir)
        _Records(out_dir / "slurm")  # a hand-edited jobs.json is refused here, before any run is prepared
    if dry_run:
        return
    for command in ("sbatch", "srun"):
        if shutil.which(command) is None:
            raise ConfigError(f"sweep backend slurm: {command} is not on PATH (not a Slurm login node?); run "
                              f"here with backend: local, or with slurm: {{debug: true}} (jobs in this process)")


def _train_command(config_path: Path, run_dir: Path) -> list[str]:
    return local.train_command(config_path, run_dir, "auto")


def plan(checked: dict[str, Any], out_dir: Path, parallel: int, index: pd.DataFrame) -> str:
    """What ``sweep --dry-run`` shows for ``backend: slurm``: the submitit parameters, the sbatch script exactly
    as it is submitted for the runs to do, and per run the command every task of its job runs."""
    todo = index[index["status"].isin(["pending", "partial"])]
    checked = _named(checked, out_dir)
    nodes, per_node = tasks(checked)
    submitted = {key: value for key, value in checked.items() if key not in OWN}
    lines = [f"slurm: {'debug (in this process): ' if checked.get('debug') else ''}{len(todo)} training jobs, at "
             f"most {parallel} at once; submitit parameters: {json.dumps(submitted, sort_keys=True)}",
             f"slurm: each job {nodes * per_node} task(s) ({nodes} node(s) x {per_node}), one rank each"
             + ("; torch.distributed from SLURM_PROCID, SLURM_NTASKS and the job's first node" if nodes * per_node > 1
                else "")]
    if len(todo) and not checked.get("debug"):
        script = _script(_submission_parameters(checked, parallel, len(todo) if len(todo) > 1 else None),
                         out_dir / "slurm")
        lines += [f"slurm: the sbatch script of these {len(todo)} runs, as sbatch will receive it (a run whose "
                  f"recorded job is still pending or running is waited on instead, and leaves the array):",
                  script.rstrip("\n"),
                  "slurm: end of the sbatch script"]
    records = _Records(out_dir / "slurm")
    for _, row in todo.iterrows():
        run_dir = out_dir / "runs" / row["run_id"]
        entry = records.get("train", row["run_id"])
        lines.append(f"{row['run_id']}: {' '.join(_train_command(run_dir / 'requested.yaml', run_dir))}"
                     + (f"  (recorded: slurm job {entry['job_id']}, waited on if still pending or running)"
                        if entry else ""))
    return "\n".join(lines)


def train_task(config_path: Path, run_dir: Path, modules: tuple[str, ...], device: str, threads: int) -> str:
    """One task of a run's Slurm job: this rank's share of ``robust-sparse train``. With several tasks it joins
    the job's process group through torchrun's variables; rank 0 writes the run and reports its outcome."""
    import submitit

    # submitit asks Slurm for USR2 90 s before the time limit and, for a function it cannot checkpoint, ends the
    # job on it ("timed-out and not checkpointable", a FAILED job) while USR2's default action kills the
    # training outright, without a save. Ignored here, and so in the training processes (an ignored signal stays
    # ignored across exec): the run trains up to the limit, where Slurm's SIGTERM makes it save last.pt and
    # Slurm itself reports TIMEOUT
    if "SLURM_JOB_ID" in os.environ and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    environment = submitit.JobEnvironment()
    rank = 0
    if environment.num_tasks > 1:
        # MASTER_ADDR (the job's first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK; every
        # task keeps the node's GPUs and picks GPU LOCAL_RANK, as under torchrun
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        rank = environment.global_rank
    if rank == 0:
        return _exit_like(local.run_training(config_path, run_dir, modules, device, threads))
    env, device = local.child_environment(device, threads, modules)
    log_path = run_dir / f"train.rank{rank}.log"
    with open(log_path, "a") as logfile:
        code = subprocess.run(local.train_command(config_path, run_dir, device), stdout=logfile,
                              stderr=subprocess.STDOUT, env=env).returncode
    return "done" if code == ExitCode.OK else _exit_like(f"failed ({code}, see {log_path})")


def _exit_like(outcome: str) -> str:
    """A job whose training failed ends with the training's exit status (128+N for a signal N), so that Slurm
    reports it FAILED with that code; submitit would report a returned failure as a job that completed."""
    failed = re.match(r"failed \((-?[0-9]+),", outcome)
    if failed is None:
        return outcome
    code = int(failed.group(1))
    log.error("training %s", outcome)
    raise SystemExit(128 - code if code < 0 else code or ExitCode.FAILED)


class _Records:
    """``SWEEP_DIR/slurm/jobs.json``: ``{stage: {run id: {job_id, log}}}``, rewritten atomically. It is read as
    untrusted (a hand edit, a copy from elsewhere): every job id must have Slurm's shape (:data:`JOB_ID`) before
    any path or command is built from it, and anything else is one line naming the file; the ``log`` entries
    are for people and never read back."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RECORD
        advice = "fix it, or remove it to submit every unfinished run again (check squeue first)"
        try:
            self.data = json.loads(self.path.read_bytes()) if self.path.is_file() else {}
        except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise ConfigError(f"{self.path}: not the sweep's JSON record of Slurm job ids ({reason}); "
                              f"{advice}") from None
        if not isinstance(self.data, dict):
            raise ConfigError(f"{self.path}: not a mapping of stages ({', '.join(STAGES.values())}); {advice}")
        for stage, runs in self.data.items():
            if stage not in STAGES.values() or not isinstance(runs, dict):
                raise ConfigError(f"{self.path}: {stage!r} is not a stage ({', '.join(STAGES.values())}) mapping "
                                  f"run ids to jobs; {advice}")
            for run, entry in runs.items():
                job_id = entry.get("job_id") if isinstance(entry, dict) else None
                if not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
                    raise ConfigError(f"{self.path}: {stage} run {run!r}: job id {job_id!r} is not a Slurm job "
                                      f"id (digits, an array task as 123_4 or 123_[0-3]); {advice}")

    def get(self, stage: str, run: str) -> dict[str, str] | None:
        return self.data.get(stage, {}).get(run)

    def put(self, stage: str, entries: dict[str, dict[str, str]]) -> None:
        self.data.setdefault(stage, {}).update(entries)
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def seen(self, stage: str, run: str) -> str | None:
        """The Slurm state the sweep saw last for the run's job: one of :data:`ENDED` or PENDING, else None (the
        file is not trusted: anything else is ignored)."""
        seen = (self.get(stage, run) or {}).get("seen")
        return seen if seen in ENDED | {"PENDING"} else None

    def note(self, stage: str, run: str, state: str) -> None:
        """Keep the state the sweep saw last for the run's job (see :meth:`seen`)."""
        entry = self.get(stage, run)
        if entry is not None and entry.get("seen") != state:
            entry["seen"] = state
            write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))


def _log_path(folder: Path, job_id: str) -> Path:
    """Task 0's stderr log of a job (rank 0 reports the run), named as submitit names it; shown, never read."""
    from submitit.core.utils import JobPaths

    if not JOB_ID.fullmatch(job_id):  # _Records and _sbatch let no other id through; a path is built from it
        raise ConfigError(f"slurm job id {job_id!r} is not a Slurm job id")
    path = JobPaths(folder, job_id=job_id, task_id=0).stderr
    if path.parent.resolve() != folder.resolve():  # the file itself is only named, so it is not followed
        raise ConfigError(f"slurm job id {job_id!r} names a log outside {folder}")
    return path


def _slurm(command: list[str]) -> subprocess.CompletedProcess:
    """A Slurm command (sbatch, sacct, squeue) with a time limit (:data:`COMMAND_SECONDS`), in its own process
    group, killed whole on a timeout or an interruption. subprocess's own clean-up (``with Popen``, ``run``)
    waits for the child unless the exception is exactly KeyboardInterrupt, and the CLI's SIGTERM exception
    (robust_sparse.cli.Terminated) only subclasses it: without the kill, one SIGTERM waits for a hung sbatch."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=COMMAND_SECONDS)
    except BaseException:  # the timeout, Ctrl-C, SIGTERM: the whole group, so that no grandchild keeps the pipes
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()  # killed: at once
        child.stdout.close()
        child.stderr.close()
        raise
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def _one_line(text: str) -> str:
    """A command's output as one line of an error message."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())[:500]


def _sbatch(script: Path) -> str:
    """Submit ``script``; its job id, or a :class:`SubmissionError` in one line with sbatch's own words."""
    try:
        result = _slurm(["sbatch", str(script)])
    except OSError as error:
        raise SubmissionError(f"sweep slurm: cannot run sbatch: {error.strerror or error}") from None
    except subprocess.TimeoutExpired:
        raise SubmissionError(f"sweep slurm: sbatch did not answer within {COMMAND_SECONDS:g} s and was stopped; "
                              f"a job may have been submitted all the same: check squeue before rerunning") from None
    if result.returncode != 0:
        raise SubmissionError(f"sweep slurm: sbatch failed (exit {result.returncode}): "
                              f"{_one_line(result.stderr or result.stdout) or 'no message'}")
    # sbatch's own answer, "Submitted batch job 123" (with " on cluster NAME" in a federation)
    found = re.search(r"^Submitted batch job ([0-9]+)\b", result.stdout, re.MULTILINE)
    if found is None:
        raise SubmissionError(f"sweep slurm: sbatch answered without a job id: "
                              f"{_one_line(result.stdout) or 'nothing'!r}; a job may have been submitted all the "
                              f"same: check squeue before rerunning")
    return found.group(1)


@functools.cache
def _executor_class():
    """submitit's Slurm executor, with the script from :func:`_script` and sbatch run by :func:`_sbatch` (a time
    limit, one-line errors, killed on an interruption) instead of submitit's CommandFunction, which has none of
    these and waits on a hung sbatch after a SIGTERM."""
    from submitit.core.utils import JobPaths
    from submitit.slurm.slurm import SlurmExecutor, SlurmJob

    class Executor(SlurmExecutor):
        @property
        def _submitit_command_str(self) -> str:
            return _job_command(self.folder)

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return _script(self.parameters, self.folder)

        def _submit_command(self, command: str):
            folder = JobPaths.get_first_id_independent_folder(self.folder)
            path = folder / f".submission_file_{uuid.uuid4().hex}.sh"
            write_atomic(path, self._make_submission_file_text(command, ""))
            try:
                job_id = _sbatch(path)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            job = SlurmJob(folder=self.folder, job_id=job_id, tasks=list(range(self._num_tasks())))
            job.paths.move_temporary_file(path, "submission_file", keep_as_symlink=True)
            return job

        def _internal_process_submissions(self, delayed_submissions):
            if len(delayed_submissions) == 1:
                return super()._internal_process_submissions(delayed_submissions)
            # submitit's array submission, as in SlurmExecutor, but through this class (submitit's builds a plain
            # SlurmExecutor for the array)
            folder = JobPaths.get_first_id_independent_folder(self.folder)
            folder.mkdir(parents=True, exist_ok=True)
            pickles = []
            for submission in delayed_submissions:
                pickles.append(folder / f"{uuid.uuid4().hex}.pkl")
                submission.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
                submission.dump(pickles[-1])
            array = type(self)(self.folder, self.max_num_timeout)
            array.parameters = {**self.parameters, "map_count": len(delayed_submissions)}
            try:
                first = array._submit_command(self._submitit_command_str)
            except BaseException:
                for path in pickles:
                    path.unlink(missing_ok=True)
                raise
            jobs = [SlurmJob(folder=self.folder, job_id=f"{first.job_id}_{index}", tasks=list(range(first.num_tasks)))
                    for index in range(len(delayed_submissions))]
            for job, path in zip(jobs, pickles):
                job.paths.move_temporary_file(path, "submitted_pickle")
            return jobs

    return Executor


@dataclass(frozen=True)
class JobState:
    """A job's state in Slurm's words (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY,
    NODE_FAIL, PREEMPTED, ...), with what Slurm says of how it ended. Two words are ours: GONE (Slurm no longer
    knows the job: it ended more than MinJobAge ago on a cluster without accounting, or it was an array task
    cancelled while pending, which Slurm drops at once) and UNKNOWN (no Slurm command answered)."""

    state: str
    exit_code: int | None = None  # the batch script's exit status (ExitCode=N:S)
    signal: int | None = None  # the signal that ended it, if one did (the S of ExitCode=N:S)
    elapsed: str | None = None  # the time it ran, as Slurm writes it ([D-]HH:MM:SS)


GONE, UNKNOWN = JobState("GONE"), JobState("UNKNOWN")
# Slurm's words for a job that has ended; the last one the sweep saw is kept in jobs.json ("seen"), for when
# Slurm has forgotten the job by the next sweep run
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def _exit_code(text: str | None) -> tuple[int | None, int | None]:
    """Slurm's ExitCode ``N:S`` as (exit status, signal or None)."""
    found = re.fullmatch(r"([0-9]+):([0-9]+)", (text or "").strip())
    if found is None:
        return None, None
    return int(found.group(1)), int(found.group(2)) or None


def _expand(job_id: str) -> list[str]:
    """The array tasks an id names: ``7_[0-3%2]`` or ``7_0-3`` -> 7_0 ... 7_3; any other id as it is."""
    found = re.fullmatch(r"([0-9]+)_\[?([0-9,-]+)(?:%[0-9]+)?\]?", job_id)
    if found is None or found.group(2).isdigit():
        return [job_id]
    tasks = []
    for part in found.group(2).split(","):
        low, _, high = part.partition("-")
        if low.isdigit():
            tasks += [f"{found.group(1)}_{task}" for task in range(int(low), int(high or low) + 1)]
    return tasks


class _Queries:
    """Slurm's answers about a sweep's jobs, in the order they can be trusted: sacct where the cluster keeps
    accounting; otherwise scontrol (squeue -t all where scontrol does not answer) while Slurm still remembers
    the job; a job neither knows is GONE and its outcome comes from what the run wrote (see :func:`_outcome`).
    A cluster without accounting is said once per sweep, and sacct is not asked again."""

    _said: set[str] = set()  # sweep directories already told that the cluster keeps no accounting

    def __init__(self, sweep_dir: Path | None = None) -> None:
        self.sweep_dir = str(sweep_dir)
        self.accounting: bool | None = None  # unknown until sacct answers

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        states = self._sacct(job_ids) if self.accounting is not False else {}
        rest = [job_id for job_id in job_ids if job_id not in states]
        if rest:
            remembered = self._scontrol(rest)
            if remembered is None:
                remembered = self._squeue(rest)
            for job_id in rest:
                states[job_id] = UNKNOWN if remembered is None else remembered.get(job_id, GONE)
        return states

    def _sacct(self, job_ids: list[str]) -> dict[str, JobState]:
        command = ["sacct", "-o", "JobID,State,ExitCode,Elapsed", "--parsable2"]
        for base in sorted({job_id.split("_")[0] for job_id in job_ids}):  # an array's id lists all its tasks
            command += ["-j", base]
        try:
            result = _slurm(command)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.debug("sacct: %s; asking scontrol", error)
            return {}
        if result.returncode != 0:
            message = _one_line(result.stderr or result.stdout)
            if "accounting storage is disabled" in message.lower():
                self.accounting = False
                if self.sweep_dir not in self._said:
                    self._said.add(self.sweep_dir)
                    log.info("slurm: this cluster keeps no accounting (sacct: %s): job states come from scontrol "
                             "while Slurm remembers a job (its MinJobAge), then from what the run wrote", message)
            else:
                log.debug("sacct failed (exit %s): %s; asking scontrol", result.returncode, message)
            return {}
        self.accounting = True
        from submitit.slurm.slurm import SlurmInfoWatcher

        listed = SlurmInfoWatcher().read_info(result.stdout)  # submitit's parser: array ranges, steps skipped
        states = {}
        for job_id in job_ids:
            info = listed.get(job_id) or {}
            if info.get("State"):
                code, signal_number = _exit_code(info.get("ExitCode"))
                states[job_id] = JobState(info["State"].split()[0].upper(), code, signal_number,
                                          info.get("Elapsed") or None)
        return states

    def _scontrol(self, job_ids: list[str]) -> dict[str, JobState] | None:
        """What ``scontrol show job`` says of the jobs it still knows; None when it does not answer."""
        states: dict[str, JobState] = {}
        for base in sorted({job_id.split("_")[0] for job_id in job_ids}):  # one call lists an array's tasks
            try:
                result = _slurm(["scontrol", "-o", "show", "job", base])
            except (OSError, subprocess.TimeoutExpired) as error:
                log.debug("scontrol: %s; asking squeue", error)
                return None
            if result.returncode != 0:
                if "Invalid job id" in result.stderr:
                    continue  # forgotten (MinJobAge), or never known
                log.debug("scontrol failed (exit %s): %s", result.returncode, _one_line(result.stderr))
                return None
            for line in result.stdout.splitlines():
                fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
                if "JobState" not in fields:
                    continue
                task = fields.get("ArrayTaskId")
                named = (_expand(f"{fields.get('ArrayJobId')}_{task}") if task and task != "N/A"
                         else [fields.get("JobId", "")])
                code, signal_number = _exit_code(fields.get("ExitCode"))
                for job_id in named:
                    states[job_id] = JobState(fields["JobState"].upper(), code, signal_number, fields.get("RunTime"))
        return states

    def _squeue(self, job_ids: list[str]) -> dict[str, JobState] | None:
        """squeue's view, ended jobs included (``-t all``), where scontrol does not answer; None if neither."""
        try:
            result = _slurm(["squeue", "-h", "-t", "all", "-o", "%i|%T|%M", "-j", ",".join(job_ids)])
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode != 0:
            return {} if "Invalid job id" in result.stderr else None
        states = {}
        for line in result.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                for job_id in _expand(parts[0]):
                    states[job_id] = JobState(parts[1].upper(), elapsed=parts[2])
        return states


def _states(job_ids: list[str]) -> dict[str, JobState]:
    """Every job's state (see :class:`_Queries`)."""
    return _Queries().states(job_ids)


def _finished(column: str, arguments: tuple) -> str | None:
    """A run's outcome as the run itself wrote it: its marker (training: done or diverged) or the evaluation
    stage's result; None while it has none. submitit's result pickle is never read for it: unpickling runs
    whatever the file names, and anyone who can write the sweep directory can write one."""
    if column == "status":  # (requested.yaml, run_dir, plugins)
        status = local.run_status(arguments[1])
        return status if status in ("done", "diverged") else None
    return "done" if local.eval_stage_done(arguments[0], arguments[1]) else None  # (run_dir, stage, plugins)


def _run_log(column: str, arguments: tuple) -> Path:
    return arguments[1] / "train.log" if column == "status" else arguments[0] / "eval.log"


def _kept(column: str, arguments: tuple) -> str:
    """What a stopped run keeps for the next sweep run: its last.pt (training resumes from it) or nothing."""
    if column == "status" and (arguments[1] / "last.pt").is_file():
        return "last.pt kept, the next sweep run resumes from it"
    return "the next sweep run starts it again"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _how_it_ended(job: JobState) -> str:
    """Slurm's exit code and signal in words: ``exit code 137 (128+9: SIGKILL)``."""
    if job.signal:
        return f"killed by {_signal_name(job.signal)}"
    if job.exit_code is None:
        return "exit code unknown"
    if job.exit_code > 128:
        return f"exit code {job.exit_code} (128+{job.exit_code - 128}: {_signal_name(job.exit_code - 128)})"
    return f"exit code {job.exit_code}"


def _effective(job: JobState, seen: str | None, started: bool) -> JobState:
    """What a job Slurm no longer knows (GONE) had become, from the state the sweep saw last: Slurm drops an
    array task cancelled while pending at once (scancel 7_1 leaves no record of it, not even in scontrol), and
    forgets every ended job after MinJobAge on a cluster without accounting."""
    if job.state != "GONE":
        return job
    if seen == "PENDING" and not started:
        return JobState("CANCELLED")
    return JobState(seen) if seen in ENDED else job


def _outcome(folder: Path, job_id: str, job: JobState, column: str, arguments: tuple,
             seen: str | None = None) -> str:
    """What a job that ended says: the run's own record, else Slurm's state in Slurm's words, with the log to
    read where there is one (a job that never started has none, and none is named). ``seen``: the state the
    sweep saw last, which tells a pending array task that Slurm dropped (cancelled) from one it forgot."""
    finished = _finished(column, arguments)
    if finished is not None:
        return finished
    logfile = _log_path(folder, job_id)
    started = os.path.lexists(logfile)
    job = _effective(job, seen, started)
    state = job.state
    see = f", see {logfile}" if started else ""
    after = f" after {job.elapsed}" if job.elapsed and started else ""
    kept = _kept(column, arguments)
    if state == "COMPLETED":  # the job ran its command, which did not finish the run: the run's log says why
        return f"failed (slurm job {job_id} COMPLETED without finishing the run, see {_run_log(column, arguments)})"
    if state == "CANCELLED":
        when = f"{after}; {kept}" if started else " while pending; it never started"
        return f"cancelled (slurm job {job_id} CANCELLED{when})"
    if state == "TIMEOUT":
        return f"time limit (slurm job {job_id} TIMEOUT: stopped at its time limit{after}; {kept}{see})"
    if state == "FAILED":
        return f"failed (slurm job {job_id} FAILED, {_how_it_ended(job)}{see})"
    if state == "OUT_OF_MEMORY":
        return f"out of memory (slurm job {job_id} OUT_OF_MEMORY{after}: raise mem_gb; {kept}{see})"
    if state in ("NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
        return f"{state.lower().replace('_', ' ')} (slurm job {job_id} {state}{after}; {kept}{see})"
    if state == "GONE":
        return (f"gone (slurm job {job_id}: Slurm no longer knows it (it ended more than MinJobAge ago, or was "
                f"cancelled while pending) and the run has not finished; "
                + (f"{kept}{see})" if started else "it never started)"))
    return f"failed (slurm job {job_id} {state}{see})"


class _Quiet(logging.Filter):
    """submitit's own sacct polling says "Bypassing sacct error ..., status may be inaccurate" on every call
    on a cluster without accounting; the sweep says that once, in its own words (:class:`_Queries`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


def _quiet_submitit() -> None:
    import submitit.core.logger  # noqa: F401  (creates submitit's logger, which holds its own handlers)

    logger = logging.getLogger("submitit")
    if not any(isinstance(existing, _Quiet) for existing in logger.filters):
        logger.addFilter(_Quiet())


def submit(sweep, todo: list[tuple], index: pd.DataFrame, column: str, job, write_index) -> None:
    """Run ``todo`` (rows of ``index``, as sweep._launch gives them) as Slurm jobs; outcomes into ``column``.
    Training jobs run :func:`train_task`, evaluation jobs ``job`` (robust_sparse.studies.local.run_evaluation)."""
    submitit = _submitit()
    checked = _named(sweep.slurm, sweep.out_dir)
    debug = checked.pop("debug", False)
    poll = float(checked.pop("poll_seconds", POLL_SECONDS))
    stage = STAGES[column]
    if stage == "eval":
        checked = _single_task(checked)
    function = train_task if stage == "train" else job
    folder = sweep.out_dir / "slurm"
    threads = int(checked.get("cpus_per_task", checked.get("slurm_cpus_per_task", 1)) or 1)
    if debug:  # in this process, one job after the other; nothing to record
        executor = submitit.AutoExecutor(folder=str(folder), cluster="debug")
        for row, *arguments in todo:
            index.loc[row, column] = executor.submit(function, *arguments, "auto", threads).result()
            write_index()
        return
    check_submission(checked, out_dir=sweep.out_dir)
    _quiet_submitit()
    queries = _Queries(sweep.out_dir)
    records = _Records(folder)
    recorded = {row: records.get(stage, index.loc[row, "run_id"]) for row, *_ in todo}
    ids = [entry["job_id"] for entry in recorded.values() if entry]
    states = queries.states(ids) if ids else {}
    waiting: dict[int, tuple[str, tuple]] = {}  # row -> (job id, the job's arguments)
    fresh = []
    for row, *arguments in todo:
        run, entry = index.loc[row, "run_id"], recorded[row]
        state = states[entry["job_id"]].state if entry else None
        if state == "UNKNOWN":  # no Slurm command answers: it may still train, so no second job
            index.loc[row, column] = (f"unknown (slurm job {entry['job_id']}: neither sacct, scontrol nor squeue "
                                      f"answers; not submitted again, remove it from {records.path} to resubmit)")
            log.warning("%s: %s", run, index.loc[row, column])
            continue
        if state in ACTIVE:  # never a second job for a run whose job is queued or training: wait on it
            log.info("%s: slurm job %s is %s; waiting on it, not submitting it again", run, entry["job_id"],
                     state.lower())
            index.loc[row, column] = f"{state.lower()} (slurm job {entry['job_id']})"
            waiting[row] = (entry["job_id"], tuple(arguments))
            continue
        if entry:  # ended without finishing the run (failed, cancelled, timed out, or the training failed)
            outcome = _outcome(folder, entry["job_id"], states[entry["job_id"]], column, tuple(arguments),
                               records.seen(stage, run))
            resume = ("with --resume from its last.pt" if column == "status" and (arguments[1] / "last.pt").is_file()
                      else "from the start")
            log.warning("%s: previous attempt: %s; submitting the run again, %s", run, outcome, resume)
        fresh.append((row, arguments))
    if fresh:
        executor = _executor_class()(folder)
        executor.parameters = _submission_parameters(checked, sweep.parallel)
        with executor.batch():  # one job array; each job runs the same resumable command as the local backend
            jobs = [(row, executor.submit(function, *arguments, "auto", threads)) for row, arguments in fresh]
        records.put(stage, {index.loc[row, "run_id"]: {"job_id": submitted.job_id,
                                                        "log": str(_log_path(folder, submitted.job_id))}
                            for row, submitted in jobs})
        for (row, submitted), (_, arguments) in zip(jobs, fresh):
            log.info("%s: submitted as slurm job %s", index.loc[row, "run_id"], submitted.job_id)
            index.loc[row, column] = f"submitted (slurm job {submitted.job_id})"
            waiting[row] = (submitted.job_id, tuple(arguments))
    write_index()  # a killed sweep leaves the job ids in runs.csv too
    _wait(waiting, folder, index, column, write_index, queries, poll,
          lambda row, state: records.note(stage, index.loc[row, "run_id"], state))


def _wait(waiting: dict[int, tuple[str, tuple]], folder: Path, index: pd.DataFrame, column: str,
          write_index, queries: _Queries | None = None, poll: float = POLL_SECONDS, note=None) -> None:
    """Until every job has ended: its state into ``column`` (and runs.csv) at each change, its outcome as it
    ends (or as soon as its run has finished). Slurm is asked after :data:`POLL_FIRST` seconds, then at
    intervals that double while nothing changes, up to ``poll`` (the sweep file's ``slurm.poll_seconds``),
    and shrink back at each change: quick answers for short jobs, few queries for long ones. ``note(row,
    state)`` keeps each job's last state in jobs.json, for a rerun after Slurm has forgotten the job."""
    queries = queries or _Queries()
    interval = min(POLL_FIRST, poll)
    seen: dict[int, str] = {}  # row -> the state seen last (a pending array task Slurm drops was cancelled)
    while waiting:
        states = queries.states([job_id for job_id, _ in waiting.values()])
        changed = False
        for row, (job_id, arguments) in list(waiting.items()):
            job = states[job_id]
            if _finished(column, arguments) is not None or job.state not in ACTIVE | {"UNKNOWN"}:
                index.loc[row, column] = _outcome(folder, job_id, job, column, arguments, seen.get(row))
                log.info("%s: %s %s", index.loc[row, "run_id"], column, index.loc[row, column])
                del waiting[row]
                write_index()
                changed = True
            elif index.loc[row, column] != f"{job.state.lower()} (slurm job {job_id})":
                index.loc[row, column] = f"{job.state.lower()} (slurm job {job_id})"
                write_index()
                changed = True
            if job.state not in ("UNKNOWN", "GONE"):
                seen[row] = job.state
            ended = _effective(job, seen.get(row), os.path.lexists(_log_path(folder, job_id))).state
            if note is not None and ended in ENDED | {"PENDING"}:
                note(row, ended)
        if waiting:
            interval = min(POLL_FIRST, poll) if changed else min(interval * 2, poll)
            time.sleep(interval)
