"""Run-directory safety and write failures: run identity on --resume, one process per run directory, quickstart's
output folder, OS write failures as one sentence, leftovers of killed writes, titled curves, Ctrl-C at start-up,
the zoo on `import kflo_cli`, the CPU-only install line of the README."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli._atomic import atomic_path, write_text_atomic
from kflo_cli._lock import LOCK_FILE, DirLock
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.train.quickstart import QUICKSTART
from kflo_cli.train.state import load_state, save_state

from conftest import scaled_timeout

runner = CliRunner()
FAST = ["--data", "digits", "--threads", "1", "--batch-size", "32"]
ROOT = Path(__file__).resolve().parents[1]
HOUR_AGO = time.time() - 3600


def started(run: Path, *recipe: str) -> None:
    """A run stopped after its first step (state saved, exit 130)."""
    args = [a for r in recipe for a in ("--recipe", r)]
    r = runner.invoke(app, ["train", "lenet5", *args, *FAST, "--epochs", "1", "-o", str(run), "--stop-after-steps", "1"])
    assert r.exit_code == 130, r.output


def one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def holder(directory: Path) -> subprocess.Popen:
    """Another process holding ``directory``'s lock until killed."""
    code = ("import sys, time; from kflo_cli._lock import DirLock; DirLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# -- 1. run identity ---------------------------------------------------------------------------------------------------
def test_resume_refuses_a_state_or_config_of_another_run(tmp_path):
    run, doconv, vanilla = tmp_path / "kflo", tmp_path / "doconv", tmp_path / "vanilla"
    started(run, "kflo")
    started(doconv, "doconv")
    started(vanilla)
    config = json.loads((run / "config.json").read_text())
    info = load_state(run)["info"]
    assert len(config["run_id"]) == 32 and config["run_id"] == info["run_id"]
    assert config["fingerprint"] == info["fingerprint"] != load_state(doconv)["info"]["fingerprint"]
    assert kflo.read_metadata(run / "last.safetensors")["extra"]["run_id"] == config["run_id"]

    own_state = (run / "state.safetensors").read_bytes()
    last = (run / "last.safetensors").read_bytes()
    shutil.copy(doconv / "state.safetensors", run / "state.safetensors")
    r = runner.invoke(app, ["train", "--resume", str(run)])
    line = one_error_line(r)
    assert r.exit_code == 2 and "belong to different runs" in line
    assert f"{run / 'state.safetensors'}" in line and f"{run / 'config.json'}" in line and "doconv" in line
    assert (run / "last.safetensors").read_bytes() == last  # nothing trained, nothing written

    (run / "state.safetensors").write_bytes(own_state)
    shutil.copy(vanilla / "config.json", run / "config.json")
    r = runner.invoke(app, ["train", "--resume", str(run)])
    assert r.exit_code == 2 and "belong to different runs" in one_error_line(r) and "without a recipe" in r.stderr


def test_same_run_id_but_another_model_is_refused(tmp_path):
    run = tmp_path / "run"
    started(run, "kflo")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "fingerprint": "0" * 16}))
    r = runner.invoke(app, ["train", "--resume", str(run)])
    assert r.exit_code == 2 and "fingerprints differ" in one_error_line(r)


def test_run_dirs_of_earlier_versions_resume_with_a_note_and_lose_their_leftovers(tmp_path):
    run = tmp_path / "run"
    started(run, "kflo")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("run_id", "fingerprint")}))
    state = load_state(run)
    save_state(run, model=state["model"], optimizer=state["optimizer"], ema=state["ema"], scaler=state["scaler"],
               rng=state["rng"], info={k: v for k, v in state["info"].items() if k not in ("run_id", "fingerprint")})
    stale = run / ".ema.safetensors.abcdefgh.tmp"  # a write of an earlier run killed with kill -9
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"partial")
    os.utime(stale, (HOUR_AGO, HOUR_AGO))
    r = runner.invoke(app, ["train", "--resume", str(run), "--stop-after-steps", "2"])
    assert r.exit_code == 130, r.output
    assert "without run ids" in r.output and load_state(run)["info"]["global_step"] == 2
    assert not stale.exists()


def test_a_doconv_state_from_before_the_per_channel_layout_is_refused(tmp_path):
    # DO-Conv's W is stored per input channel since 2026-12-03 and the optimizer's momentum follows that storage:
    # a state saved before (no factor_layout) would resume with momentum in the other layout
    run = tmp_path / "run"
    started(run, "doconv")
    state = load_state(run)
    save_state(run, model=state["model"], optimizer=state["optimizer"], ema=state["ema"], scaler=state["scaler"],
               rng=state["rng"], info={k: v for k, v in state["info"].items() if k != "factor_layout"})
    before = (run / "state.safetensors").read_bytes()
    r = runner.invoke(app, ["train", "--resume", str(run)])
    line = one_error_line(r)
    assert r.exit_code == 2 and "stored DO-Conv's factors in another layout" in line and "--overwrite" in line
    assert (run / "state.safetensors").read_bytes() == before
    # the same state with the marker resumes; a KFLO state without it too (its layout never changed)
    other = tmp_path / "kflo"
    started(other, "kflo")
    state = load_state(other)
    save_state(other, model=state["model"], optimizer=state["optimizer"], ema=state["ema"], scaler=state["scaler"],
               rng=state["rng"], info={k: v for k, v in state["info"].items() if k != "factor_layout"})
    r = runner.invoke(app, ["train", "--resume", str(other), "--stop-after-steps", "2"])
    assert r.exit_code == 130, r.output


def test_an_optimizer_state_that_does_not_fit_the_parameters_is_refused(tmp_path):
    run = tmp_path / "run"
    started(run, "kflo")
    state = load_state(run)
    optimizer = state["optimizer"]
    entry = next(v for v in optimizer["state"].values() if getattr(v.get("momentum_buffer"), "ndim", 0) > 1)
    entry["momentum_buffer"] = entry["momentum_buffer"].reshape(-1)  # the same elements in another shape
    save_state(run, model=state["model"], optimizer=optimizer, ema=state["ema"], scaler=state["scaler"],
               rng=state["rng"], info=state["info"])
    r = runner.invoke(app, ["train", "--resume", str(run)])
    line = one_error_line(r)
    assert r.exit_code == 2 and "'momentum_buffer' of shape" in line and "does not belong to this model" in line


def test_collapse_from_best_refuses_a_best_checkpoint_of_another_run(tmp_path):
    from kflo_cli.train.run_dir import check_checkpoint

    kflo.save(kflo.create_model("lenet5"), tmp_path / "best.safetensors", extra={"run_id": "b" * 32})
    run = SimpleNamespace(run_id="a" * 32, run_dir=tmp_path)
    with pytest.raises(KfloError, match="written by run bbbbbbbb, not by run aaaaaaaa"):
        check_checkpoint(run, tmp_path / "best.safetensors")
    check_checkpoint(SimpleNamespace(run_id="b" * 32, run_dir=tmp_path), tmp_path / "best.safetensors")


# -- 2. one process per run directory ----------------------------------------------------------------------------------
def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = holder(run)
    try:
        r = runner.invoke(app, ["train", "lenet5", *FAST, "-o", str(run)])
        line = one_error_line(r)
        assert r.exit_code == 2 and f"{run} is in use by process {proc.pid} on {socket.gethostname()}" in line
        r = runner.invoke(app, ["quickstart", "-o", str(run)])
        assert r.exit_code == 2 and f"in use by process {proc.pid}" in one_error_line(r)
    finally:
        proc.kill()
        proc.wait()
    assert (run / LOCK_FILE).exists()  # the killed holder's record is left, its lock is not
    started(run, "kflo")
    assert not (run / LOCK_FILE).exists() and (run / "state.safetensors").is_file()
    proc = holder(run)
    try:
        r = runner.invoke(app, ["train", "--resume", str(run)])
        assert r.exit_code == 2 and f"in use by process {proc.pid}" in one_error_line(r)
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, monkeypatch):
    from kflo_cli.train import engine, resolve_config, resume, start

    seen = []

    def fit(run, parts, counters, stop_after_steps=None):
        with pytest.raises(KfloError, match=f"in use by process {os.getpid()}") as info:
            DirLock.acquire(run.run_dir)
        seen.append(str(info.value))
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine, "fit", fit)
    run = tmp_path / "run"
    quiet = {"console": Console(file=io.StringIO()), "progress": False}
    with pytest.raises(RuntimeError, match="stop here"):
        start(resolve_config({"source": "lenet5", "epochs": 1, "threads": 1, "batch_size": 32}), run, **quiet)
    with pytest.raises(RuntimeError, match="stop here"):
        resume(run, **quiet)
    assert len(seen) == 2 and not (run / LOCK_FILE).exists()
    DirLock.acquire(run).release()


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    r = runner.invoke(app, ["train", "no_such_model_xyz", *FAST, "-o", str(tmp_path / "new" / "run")])
    assert r.exit_code == 2 and not (tmp_path / "new").exists()


# -- 3. quickstart -----------------------------------------------------------------------------------------------------
def test_quickstart_refuses_an_earlier_run_a_file_and_its_help_says_the_real_epochs(tmp_path):
    out = tmp_path / "qs"
    (out / "kflo-2x4").mkdir(parents=True)
    (out / "kflo-2x4" / "collapsed.safetensors").write_bytes(b"earlier run")
    r = runner.invoke(app, ["quickstart", "-o", str(out), "--epochs", "1"])
    assert r.exit_code == 2 and "--overwrite" in one_error_line(r) and "not empty" in r.stderr
    assert (out / "kflo-2x4" / "collapsed.safetensors").read_bytes() == b"earlier run"
    afile = tmp_path / "file"
    afile.write_text("x")
    r = runner.invoke(app, ["quickstart", "-o", str(afile)])
    assert r.exit_code == 2 and f"{afile} is a file" in one_error_line(r) and afile.read_text() == "x"
    r = runner.invoke(app, ["quickstart", "--help"], env={"COLUMNS": "300"})
    assert f"Epochs of each run (default {QUICKSTART['epochs']})." in r.output and "--overwrite" in r.output


def test_quickstart_without_output_says_nothing_is_kept_and_cleans_up(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "kflo-quickstart-killed"  # a quickstart killed with kill -9
    (stale / "vanilla").mkdir(parents=True)
    os.utime(stale, (HOUR_AGO, HOUR_AGO))
    r = runner.invoke(app, ["quickstart", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "nothing was kept" in r.output and "pass -o DIR to keep them" in r.output
    assert not list(tmp_path.glob("kflo-quickstart-*"))


# -- 4. write failures -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_a_full_disk_is_one_sentence_exit_2_and_keeps_the_old_file(tmp_path, monkeypatch, failure):
    from safetensors import SafetensorError

    import kflo_cli.checkpoint as checkpoint

    out = tmp_path / "out.safetensors"
    kflo.save(kflo.create_model("lenet5"), out)
    before = out.read_bytes()

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        if failure == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "kflo", "-o", str(out)])
    assert r.exit_code == 2
    assert one_error_line(r) == f"error: cannot write {out}: No space left on device; free space or choose another -o"
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_an_immutable_file_and_a_read_only_file_system_are_one_sentence(tmp_path, monkeypatch):
    import tempfile

    target = tmp_path / "a.json"
    target.write_text("old")
    replace = os.replace

    def immutable(src, dst):
        if Path(dst) == target:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(KfloError, match=r"^cannot write .*a.json: Operation not permitted; check the file's permissions"):
        write_text_atomic(target, "new")
    monkeypatch.setattr(os, "replace", replace)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(KfloError, match="a.json: Read-only file system; choose another -o on a writable file system"):
        write_text_atomic(target, "new")


def test_train_on_a_read_only_mount_is_one_sentence(tmp_path, monkeypatch):
    mkdir, open_ = Path.mkdir, os.open

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system")
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    r = runner.invoke(app, ["train", "lenet5", *FAST, "-o", str(tmp_path / "ro" / "run")])
    assert r.exit_code == 2
    assert one_error_line(r) == (f"error: cannot write {tmp_path / 'ro' / 'run'}: Read-only file system; choose "
                                 "another -o on a writable file system")

    def read_only_open(path, flags, *args, **kwargs):  # the mount point exists; creating the lock file fails
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system")
        return open_(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    (tmp_path / "mnt").mkdir()
    r = runner.invoke(app, ["train", "lenet5", *FAST, "-o", str(tmp_path / "mnt")])
    assert r.exit_code == 2 and "Read-only file system; choose another -o" in one_error_line(r)


# -- 5. leftovers of killed writes ---------------------------------------------------------------------------------------
def test_stale_temporaries_are_removed_live_and_unrelated_ones_kept(tmp_path):
    target = tmp_path / "a.json"
    stale_dir = tmp_path / ".a.json.abcdefgh.tmp"
    stale_dir.mkdir()
    (stale_dir / ".tmpQw3rTy").write_bytes(b"safetensors' own temporary")
    stale_file = tmp_path / ".a.json.zyxwvuts.tmp"  # an earlier kflo wrote temporary files, not folders
    stale_file.write_text("partial")
    live = tmp_path / ".a.json.livelive.tmp"
    live.mkdir()
    other = tmp_path / ".a.json.b.abcdefgh.tmp"  # the temporary of a.json.b
    other.mkdir()
    library = tmp_path / ".tmpAbC123"
    library.write_text("not ours")
    for p in (stale_dir, stale_file, live, other, library):
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        write_text_atomic(target, "{}")
    finally:
        proc.kill()
        proc.wait()
    assert target.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, other, library))


def test_a_write_killed_with_kill_9_leaves_one_folder_that_the_next_command_removes(tmp_path):
    target = tmp_path / "model.safetensors"
    code = ("import sys, time; from kflo_cli._atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half a model'); print('writing', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model.safetensors.") and left.is_dir()
    later = "import sys, kflo_cli as kflo; kflo.save(kflo.create_model('lenet5'), sys.argv[1])"
    subprocess.run([sys.executable, "-c", later, str(target)], check=True, timeout=scaled_timeout(120))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_library_temporaries_land_in_the_private_folder(tmp_path, monkeypatch):
    import kflo_cli.checkpoint as checkpoint

    seen = []
    real = checkpoint.save_file

    def spy(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)  # safetensors writes .tmpXXXXXX beside `path` and renames it
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr(checkpoint, "save_file", spy)
    kflo.save(kflo.create_model("lenet5"), tmp_path / "m.safetensors")
    assert len(seen[0]) == 1 and seen[0][0].startswith(".m.safetensors.") and seen[0][0].endswith(".tmp")
    with atomic_path(tmp_path / "x.txt") as tmp:
        assert tmp.parent != tmp_path and tmp.name == "x.txt"
        tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "x.txt"]


# -- 6. curves ---------------------------------------------------------------------------------------------------------------
def test_curves_name_model_recipe_and_data_and_one_epoch_is_readable(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        figures.append({"title": self._suptitle.get_text() if self._suptitle else "",
                        "xlim": [ax.get_xlim() for ax in self.axes], "ylim": [ax.get_ylim() for ax in self.axes],
                        "legend": [t.get_text() for ax in self.axes for t in ax.get_legend().get_texts()]})
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "lenet5", "--recipe", "kflo:depth=2,width=2", *FAST, "--epochs", "1", "-o", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert fig["title"].startswith("timm:lenet5 + kflo:depth=2,width=2.0") and fig["title"].endswith(" on digits")
    assert all(lo == pytest.approx(0.5) and hi == pytest.approx(1.5) for lo, hi in fig["xlim"])  # not 0.96-1.04
    (loss_lo, _), (acc_lo, acc_hi) = fig["ylim"]
    assert loss_lo == 0.0 and acc_hi - acc_lo >= 10 and 0 <= acc_lo and acc_hi <= 101
    assert any(t.startswith("test: ") for t in fig["legend"])  # the value of a one-epoch run is readable


def test_vanilla_title_and_sweep_plot_titles(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from kflo_cli.sweep.plot import plot
    from kflo_cli.train.plots import run_title

    assert run_title(kflo.create_model("lenet5"), "fashion-mnist") == "timm:lenet5 vanilla on fashion-mnist"
    figures = []
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        figures.append((self._suptitle.get_text(), [(ax.get_title(), ax.get_ylim()) for ax in self.axes if ax.axison]))
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    methods = [{"method": m, "baseline": m == "vanilla", "values": {"0": acc}, "summary": {"n": 1, "mean": acc, "std": None}}
               for m, acc in (("vanilla", 97.2), ("kflo-2x4", 97.5))]
    grid = SimpleNamespace(name="digits-all", baseline="vanilla")
    assert plot(grid, [{"model": "lenet5", "data": "digits", "methods": methods}], tmp_path / "results.png")
    ((title, panels),) = figures
    assert "digits-all" in title and panels[0][0] == "lenet5 · digits"
    lo, hi = panels[0][1]
    assert lo <= 96.2 and hi >= 98.5  # one seed each: points of room, not +-4 % of the value


# -- 7. Ctrl-C at start-up -----------------------------------------------------------------------------------------------
INTERRUPT_ON_IMPORT = """
import sys
MODULE = sys.argv[1]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["kflo", *sys.argv[2:]]
from kflo_cli.__main__ import main
main()
"""


@pytest.mark.parametrize("module, argv", [("typer", ["--help"]), ("torch", ["inspect", "x.safetensors"])],
                         ids=["importing-the-cli", "importing-torch-in-a-command"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(module, argv):
    r = subprocess.run([sys.executable, "-c", INTERRUPT_ON_IMPORT, module, *argv], capture_output=True, text=True,
                       timeout=scaled_timeout(120), cwd=ROOT)
    assert r.returncode == 130 and r.stderr == "interrupted (Ctrl-C)\n", r.stderr


def test_a_real_sigint_during_start_up_prints_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "kflo_cli", "train", "lenet5", *FAST, "--epochs", "1", "-o", str(tmp_path / "run")]
    # SIGINT back to its default in the child: a suite started as a background job of a non-interactive shell
    # inherits SIGINT ignored, and the child would then run to completion instead of being interrupted
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt while torch is being imported (inside the guarded entry point): on Linux, wait until the process has
    # started mapping torch's libraries (a fixed sleep lands before Python's own SIGINT handler on a busy machine)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + scaled_timeout(60)
    if maps.exists():
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if "torch" in maps.read_text():
                    break
            except OSError:
                break
            time.sleep(0.01)
    else:
        time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=scaled_timeout(120))
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    # Under `python -m`, CPython ends the process by SIGINT after a clean exit when the KeyboardInterrupt passed
    # through code a C extension ran with PyRun_String (torch's import does): -2 here, status 130 in a shell.
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert len(lines) == 1 and "interrupted" in lines[0], err


def test_the_console_script_is_the_guarded_entry():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'kflo = "kflo_cli.__main__:main"' in text


# -- 8. the zoo on import kflo_cli ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["kflo_cli", "timm"])
def test_import_kflo_cli_registers_the_zoo_without_importing_timm(first):
    code = f"""
import sys, importlib
importlib.import_module({first!r})
import kflo_cli
if {first!r} == "kflo_cli":
    assert "timm" not in sys.modules and "torch" not in sys.modules, "import kflo_cli loaded torch or timm"
import timm
print(type(timm.create_model("lenet5")).__name__)
assert all(getattr(kflo_cli, n) is not None for n in kflo_cli.__all__)
import kflo_cli.record
assert callable(kflo_cli.record) and kflo_cli.reparam.Recipe is kflo_cli.Recipe
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled_timeout(120), cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ZooNet", r.stderr


# -- 9. README ---------------------------------------------------------------------------------------------------------------
def test_readme_keeps_its_two_commands_and_says_how_to_install_cpu_torch():
    text = (ROOT / "README.md").read_text()
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install . && kflo quickstart\n" in text
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install '.[test]' && python -m pytest -q\n" in text
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in text
    assert text.index("kflo quickstart\n") < text.index("whl/cpu")


def test_the_wheel_ships_every_subpackage():
    # `pip install .` (not editable) installs only the packages pyproject.toml lists: a new subpackage missing there
    # breaks the installed CLI while every test run from the checkout passes
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kflo_cli").rglob("__init__.py")}
    assert on_disk <= listed, on_disk - listed
