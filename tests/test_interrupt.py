"""Ctrl-C (SIGINT) in the middle of a long job leaves no half-written report, plan, scores or heat map.

``headsparse run`` (tiny model, 400-example pool, 2000 epochs of full fine-tuning: minutes of training) is
interrupted once it has clearly started training (after its "base model" line); ``headsparse score`` (MiniLM on
thousands of texts) once its progress bar shows scoring has begun. Then: the process ended with a non-zero status,
and the output folder holds no report/plan file and no temp file; stderr ends in one line saying so, with no
KeyboardInterrupt traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (SIGINT to a subprocess)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 300  # s until the job shows it is working (imports + model build on a slow machine)
END_TIMEOUT = 120  # s for the job to end after SIGINT


class Job:
    """A ``python -m headsparse.recipes.cli`` subprocess; stdout read by a thread, stderr to a file outside the output folder."""

    def __init__(self, argv, cwd, log_dir):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": ROOT}
        self.err_path = os.path.join(log_dir, "stderr.txt")
        self._err = open(self.err_path, "w")
        # A job started in the background by a non-interactive shell (as CI may run the suite) inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler: restore the default in the child.
        self.proc = subprocess.Popen([sys.executable, "-m", "headsparse.recipes.cli", *argv], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out_lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.out_lines.append(line)

    @property
    def stdout(self):
        return "".join(self.out_lines)

    @property
    def stderr(self):
        if not self._err.closed:
            self._err.flush()
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def wait_for(self, where, marker, timeout):
        """True once ``marker`` is in stdout/stderr; False if the process ended or the time ran out first."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if marker in (self.stdout if where == "stdout" else self.stderr):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def interrupt(self):
        """Send SIGINT; return (was it still running when signalled, exit status or None if it did not end)."""
        running = self.proc.poll() is None
        if running:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=END_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        return running, rc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        self._err.close()


def _leftovers(folder, names):
    """Report/plan files and temp files in ``folder`` (recursively; hidden temp files included)."""
    bad = []
    for root, _, files in os.walk(folder):
        for f in files:
            if f in names or ".tmp" in f or f.startswith("."):
                bad.append(os.path.relpath(os.path.join(root, f), folder))
    return sorted(bad)


def _interrupted(tmp_path_factory, argv_of, where, marker, settle):
    base = tmp_path_factory.mktemp("interrupt")
    out, logs = base / "out", base / "logs"
    out.mkdir()
    logs.mkdir()
    job = Job(argv_of(str(base), str(out)), str(base), str(logs))
    try:
        started = job.wait_for(where, marker, START_TIMEOUT)
        if started:
            time.sleep(settle)  # well inside the long phase
        running, rc = job.interrupt()
    finally:
        job.close()
    return dict(out=str(out), started=started, running=running, rc=rc, stdout=job.stdout, stderr=job.stderr)


# ------------------------------------------------------------------ headsparse run
@pytest.fixture(scope="module")
def run_job(tmp_path_factory):
    return _interrupted(
        tmp_path_factory,
        lambda base, out: ["run", "--model", "tiny", "--pool-size", "400", "--targets", "40", "--eval-size", "40",
                           "--epochs", "2000", "--out", out, "--stem", "s", "--no-progress"],
        "stdout", "base model", settle=0.5)  # 2000 epochs: minutes of full fine-tuning even on a fast machine


def test_run_was_interrupted_while_training(run_job):
    assert run_job["started"], f"no 'base model' line within {START_TIMEOUT} s:\n{run_job['stdout'][-2000:]}\n" \
                               f"{run_job['stderr'][-2000:]}"
    assert run_job["running"], "the job had already finished when SIGINT was sent"
    assert "full fine-tuning:" not in run_job["stdout"], "SIGINT came after full fine-tuning ended"


def test_run_leaves_no_report_or_temp_file(run_job):
    assert _leftovers(run_job["out"], {"s.json", "s.md", "s.png"}) == []
    assert "report:" not in run_job["stdout"]


def _require_interrupted(job):
    """A job that was never interrupted must fail the message tests below, not satisfy them."""
    if not (job["started"] and job["running"] and job["rc"] is not None):
        raise RuntimeError("the job was not interrupted mid-run; see the other tests of this module")


# ------------------------------------------------------------------ headsparse score
@pytest.fixture(scope="module")
def score_job(tmp_path_factory):
    try:
        from _hs_models import minilm_dir

        model = str(minilm_dir())
    except Exception as exc:  # pragma: no cover - the dev environment installs the model package
        pytest.skip(f"MiniLM not available: {exc}")

    def argv_of(base, out):
        data = os.path.join(base, "texts.txt")
        with open(data, "w") as f:
            for i in range(6000):
                f.write(f"Sentence number {i} says that heads can be pruned when they are not needed.\n")
        return ["score", "--model", model, "--data", data, "--method", "gradient", "--batch-size", "1",
                "--out", os.path.join(out, "plan.json")]

    # the progress bar (stderr) names the scoring loop once it has started
    return _interrupted(tmp_path_factory, argv_of, "stderr", "scoring heads", settle=1.0)


def test_score_was_interrupted_while_scoring(score_job):
    assert score_job["started"], f"scoring did not start within {START_TIMEOUT} s:\n{score_job['stderr'][-2000:]}"
    assert score_job["running"], "the job had already finished when SIGINT was sent"


def test_score_leaves_no_plan_scores_heatmap_or_temp_file(score_job):
    assert _leftovers(score_job["out"], {"plan.json", "plan.scores.json", "plan.heatmap.png"}) == []
    assert "wrote " not in score_job["stdout"]


# ------------------------------------------------------------------ both verbs
@pytest.fixture(params=["run", "score"])
def job(request):
    return request.param, request.getfixturevalue(f"{request.param}_job")


def test_interrupted_job_ends_with_status_130(job):
    _, j = job
    assert j["rc"] is not None, f"the job did not end within {END_TIMEOUT} s of SIGINT"
    assert j["rc"] == 130


def test_interrupt_message_is_one_line_without_traceback(job):
    verb, j = job
    _require_interrupted(j)
    err = j["stderr"]
    assert "Traceback (most recent call last)" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"headsparse {verb}: interrupted; nothing was written"
