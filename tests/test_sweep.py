"""kflo sweep: grid validation, statistics, the scheduler (with a fake, fast ``kflo train``) and one tiny real sweep
on digits (resume of an interrupted cell, skipping of finished cells)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from kflo_cli.errors import KfloError
from kflo_cli.sweep import load_grid, paired_test, run_sweep, summarize, welch_test
from kflo_cli.sweep import runner as sweep_runner
from kflo_cli.sweep.report import expected_config, tables
from kflo_cli.sweep.stats import t_ppf, t_sf
from tests.conftest import scaled_timeout

GRID = """
name = "t"
models = ["lenet5"]
seeds = [0, 1]
[train]
epochs = 1
batch_size = 32
[data.digits]
data = "digits"
[method.vanilla]
[method.kflo]
recipe = "kflo"
"""


def write_grid(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# -- grid validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (("seeds = [0, 1]", "seed = [0, 1]"), "unknown key 'seed' (did you mean 'seeds'?)"),
    (("[method.kflo]\n", "[method.kflo]\nlr = 0.1\n"), "method 'kflo' sets lr, which belongs to the shared schedule"),
    (('recipe = "kflo"', 'recipe = "kflp"'), "unknown recipe 'kflp'; did you mean: kflo"),
    (('recipe = "kflo"', 'recipe = "kflo:depth=one"'), "parameter depth='one' is not a valid int"),
    (('recipe = "kflo"', 'recipes = "kflo"'), "unknown key 'recipes' (did you mean 'recipe'"),
    (("batch_size = 32", "batch_size = 32\nlabel_noise = 0.2"), "[train] cannot set label_noise: data options belong in a [data.NAME] table"),
    (("batch_size = 32", "batch_size = 32\nema = 0.99"), "[train] cannot set ema: it defines a method"),
    (("batch_size = 32", "batch_size = 32\nthreads = 2"), "[train] cannot set threads: the sweep sets --threads"),
    (("batch_size = 32", "batch_size = 32\nlearning_rate = 0.1"), "unknown key 'learning_rate'"),
    (("batch_size = 32", 'batch_size = "big"'), "batch_size = 'big' is not a valid int"),
    (("batch_size = 32", "batch_size = 32\nlr = -1"), "--lr -1.0 must be a number > 0"),
    (("seeds = [0, 1]", 'seeds = "0,1"'), "seeds = '0,1' must be a non-empty list of integers"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "lists a seed twice"),
    (("[method.vanilla]", "[method.plain]"), "baseline 'vanilla' is not a method"),
    (("[data.digits]\n", "[data.digits]\nlabel_noise = 2.0\n"), "--label-noise 2.0 must be in [0, 1]"),
    (("[data.digits]\n", "[data.digits]\nlr = 0.1\n"), "lr is not a data option"),
    (("[method.vanilla]", "[method.vanilla]\nkd_alpha = 0.5"), "kd_alpha only apply to distillation"),
    (("[method.vanilla]", '[method.vanilla]\nteacher = "big"'), "teacher 'big' is not a method"),
    (("[method.vanilla]", '[method.vanilla]\nonly_models = ["resnet*"]'), "only_models 'resnet*' matches none of the models"),
    (("[method.vanilla]", '[method.vanilla]\ninclude = ["features.*"]'), "include/exclude select layers for a recipe"),
    (("[method.vanilla]", '[method.vanilla]\n[method."a/b"]'), "is not a usable name"),
    (('recipe = "kflo"', "recipe = 'kflo'\n[method.a]\nrecipe = 'kflo'\nteacher = {method = 'b', model = 'lenet5'}\n"
      "[method.b]\nrecipe = 'kflo'\nteacher = 'a'"), "loop"),
    (("[train]\nepochs = 1", "[train]"), "[train] has no epochs"),
    (("name = \"t\"", "name = \"t\"\n[[oops]]"), "unknown key 'oops'"),
    (("[data.digits]", "[data.digits0.1]"), "a dot in a table name nests tables in TOML; quote the name"),
])
def test_grid_errors(tmp_path, change, message):
    path = write_grid(tmp_path, GRID.replace(*change))
    with pytest.raises(KfloError) as info:
        load_grid(path, check_models=False)
    text = str(info.value)
    assert message in text, text
    assert str(path) in text and "\n" not in text


def test_grid_unknown_model_and_bad_toml(tmp_path):
    with pytest.raises(KfloError, match="lenet55"):
        load_grid(write_grid(tmp_path, GRID.replace('"lenet5"', '"lenet55"')))
    with pytest.raises(KfloError, match="is not valid TOML"):
        load_grid(write_grid(tmp_path, "models = [", "bad.toml"))
    with pytest.raises(KfloError, match="does not exist"):
        load_grid(tmp_path / "missing.toml")


def test_recipe_file_train_table_is_ignored_and_cells_ordered(tmp_path):
    """A recipe file gives its [[recipe]] tables as spec strings (never --recipe-file, so its [train] table cannot
    reach a run); dependencies come first; a teacher on a model outside `models` is added."""
    path = write_grid(tmp_path, GRID + """
[method.ck-fc]
recipe_file = "expandnet-ck-fc-r4"
[method.kd]
teacher = { method = "vanilla", model = "smallnet_k7" }
kd_alpha = 0.7
[method.ema]
ema = 0.99
""")
    grid = load_grid(path, check_models=False)
    ck = grid.methods["ck-fc"]
    assert [s.split(":")[0] for s in ck.recipes] == ["expandnet-ck", "expandnet-fc"]
    assert "lr" in dict(ck.ignored_train)["expandnet-ck-fc-r4"]
    assert any("ck-fc" in n and "ignored" in n for n in grid.ignored_notes())
    cells = grid.cells()
    labels = [c.label for c in cells]
    assert len(cells) == 2 * 5 + 2  # 5 methods x 2 seeds on lenet5, and the teacher on smallnet_k7 for 2 seeds
    assert labels.index("smallnet_k7/digits/vanilla/seed0") < labels.index("lenet5/digits/kd/seed0")
    assert [c.auxiliary for c in cells if c.model == "smallnet_k7"] == [True, True]
    train_keys = {k for k, v in grid.options(cells[0]).items()}
    for cell in cells:  # one schedule for every cell: the ck-fc recipe file's lr 0.01 / batch 128 never appear
        opts = grid.options(cell)
        assert opts["epochs"] == 1 and opts["batch_size"] == 32 and "lr" not in opts and "recipe_file" not in opts
    kd = next(c for c in cells if c.method == "kd")
    assert grid.options(kd)["kd_alpha"] == 0.7
    assert grid.options(next(c for c in cells if c.method == "ema"))["collapse_from"] == "ema"
    assert "source" in train_keys


def test_the_documented_example_grid_parses(tmp_path):
    text = (Path(__file__).parent.parent / "docs" / "sweep.md").read_text()
    example = text.split("## A grid with every method of the reproduction")[1].split("```toml\n")[1].split("```")[0]
    grid = load_grid(write_grid(tmp_path, example))
    cells = grid.cells()
    assert len(grid.methods) == 17 and grid.data["fm-noise40"].options["label_noise"] == 0.4
    labels = [c.label for c in cells]
    init = labels.index("smallnet_k7/fm/expandnet-ck-fc-init/seed0")
    assert labels.index("smallnet_k7/fm/ck-fc-nonlinear/seed0") < init
    assert labels.index("smallnet_k9/fm/vanilla/seed0") < labels.index("smallnet_k7/fm/kd/seed0")
    assert not any(c.method == "kd" and c.model == "lenet5" for c in cells)


# -- statistics --------------------------------------------------------------------------------------------------------
def test_t_distribution_without_scipy():
    assert t_ppf(0.975, 3, use_scipy=False) == pytest.approx(3.1824463052837078, abs=1e-9)
    assert t_ppf(0.975, 4, use_scipy=False) == pytest.approx(2.7764451051977934, abs=1e-9)
    assert t_ppf(0.995, 9, use_scipy=False) == pytest.approx(3.249835541592126, abs=1e-9)
    assert t_sf(2.0, 5, use_scipy=False) == pytest.approx(0.050969739414929174, abs=1e-12)
    assert t_ppf(0.975, 1, use_scipy=False) == pytest.approx(12.706204736174698, rel=1e-9)  # Cauchy: tan(0.475 pi)


def test_summary_and_paired_test_known_values():
    method = {0: 91.0, 1: 92.0, 2: 93.5, 3: 90.1}
    base = {0: 90.0, 1: 90.5, 2: 92.0, 3: 90.3}
    s = summarize(list(method.values()))
    assert (s.n, s.mean) == (4, pytest.approx(91.65))
    assert s.std == pytest.approx(1.457166199626295)
    assert (s.ci_low, s.ci_high) == (pytest.approx(89.3313234059075), pytest.approx(93.96867659409251))
    c = paired_test(method, base)
    # scipy.stats.ttest_rel(method, base): t = 2.36884, p = 0.098607; differences 1.0, 1.5, 1.5, -0.2
    assert (c.n, c.mean, c.t, c.p) == (4, pytest.approx(0.95), pytest.approx(2.3688391595316354), pytest.approx(0.09860748163918769))
    assert (c.ci_low, c.ci_high) == (pytest.approx(0.95 - 3.1824463052837078 * c.std / 2), pytest.approx(0.95 + 3.1824463052837078 * c.std / 2))
    assert c.verdict == "within noise"
    assert c.welch_p == pytest.approx(0.3168353193316251)  # scipy.stats.ttest_ind(equal_var=False)
    worse = paired_test({0: 80.0, 1: 81.0, 2: 79.5}, {0: 90.0, 1: 90.2, 2: 89.9})
    assert worse.verdict == "worse" and worse.p < 0.05
    # two pairs: no verdict (one degree of freedom)
    assert paired_test({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5}).verdict == "n/a"
    # identical differences: the t statistic is undefined, the exact sign test decides (n = 3: p = 0.25, n = 6: 0.03125)
    same = paired_test({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.5, 2: 2.5})
    assert same.p == 0.25 and same.verdict == "within noise"
    # accuracies are percentages of a test set: the "same" difference differs in the last bits
    rounded = paired_test({0: 100 * 347 / 359, 1: 100 * 346 / 359, 2: 100 * 348 / 359},
                          {0: 100 * 348 / 359, 1: 100 * 347 / 359, 2: 100 * 349 / 359})
    assert rounded.p == 0.25 and rounded.verdict == "within noise"
    six = paired_test({k: k + 1.0 for k in range(6)}, {k: k + 0.5 for k in range(6)})
    assert six.p == 0.03125 and six.verdict == "better"
    assert paired_test({0: 1.0, 3: 2.0}, {0: 0.5, 1: 1.5}).verdict == "n/a"  # one common seed
    assert summarize([5.0]).std is None and welch_test([1.0], [2.0, 3.0]) == (None, None)


# -- the scheduler, with a fake kflo train ---------------------------------------------------------------------------
FAKE = r'''
import json, os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
plan = json.loads(os.environ["FAKE_PLAN"])
resume = "--resume" in args
run_dir = Path(args[args.index("--resume" if resume else "-o") + 1])
key = str(run_dir)
(run_dir / "ready").write_text("")
if plan.get("sleep"):
    def stop(*_):
        (run_dir / "state.safetensors").write_text("state")
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)
    time.sleep(plan["sleep"])
if any(part in key for part in plan.get("fail", [])):
    print("some output", file=sys.stderr)
    print("error: boom in " + run_dir.parent.name, file=sys.stderr)
    sys.exit(2)
method, seed = run_dir.parent.name, int(run_dir.name[4:])
acc = plan["acc"][method][seed]
(run_dir / "config.json").write_text(json.dumps(plan["configs"][key]))
(run_dir / "last.safetensors").write_text("weights")
with open(run_dir / "args.json", "w") as fh:
    json.dump(args, fh)
(run_dir / "summary.json").write_text(json.dumps({"kind": "vanilla", "final_test_acc": acc, "seconds": 2.0 if method == "vanilla" else 3.0,
                                                  "params_trained": 100, "epochs": 1, "steps": 10}))
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """Replace the kflo train subprocess with a fast script that obeys FAKE_PLAN; returns a function that sets it."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    real = sweep_runner.train_argv

    def argv(grid, cell, root, threads, *, action):
        return [sys.executable, str(script), *real(grid, cell, root, threads, action=action)[4:]]

    monkeypatch.setattr(sweep_runner, "train_argv", argv)

    def set_plan(grid_path: Path, out: Path, **plan):
        grid = load_grid(grid_path, check_models=False)
        plan["configs"] = {str((out / c.relpath).resolve()): expected_config(grid, c) for c in grid.cells()}
        monkeypatch.setenv("FAKE_PLAN", json.dumps(plan))

    return set_plan


ACC = {"vanilla": [90.0, 91.0, 90.5], "kflo": [92.0, 93.5, 92.4], "kd": [91.0, 91.2, 90.9]}


def test_failed_cell_is_listed_retried_and_blocks_its_dependent(tmp_path, fake_train):
    grid = write_grid(tmp_path, GRID.replace("seeds = [0, 1]", "seeds = [0, 1, 2]") + '[method.kd]\nteacher = "kflo"\n')
    out = tmp_path / "out"
    fake_train(grid, out, acc=ACC, fail=["kflo/seed1"])
    outcome = run_sweep(grid, out, jobs=2, threads=1, console=quiet())
    assert outcome.exit_code == 1
    status = {(r["method"], r["seed"]): r for r in outcome.report["rows"]}
    assert status[("kflo", 1)]["status"] == "failed" and status[("kflo", 1)]["exit_code"] == 2
    assert status[("kflo", 1)]["error"] == "error: boom in kflo"  # the last line of this attempt's stderr
    assert status[("kd", 1)]["status"] == "blocked" and "kflo/seed1" in status[("kd", 1)]["error"]
    assert sum(r["status"] == "done" for r in outcome.report["rows"]) == 7
    # the teacher ran first and its checkpoint was passed on
    kd_args = json.loads((out / "runs/lenet5/digits/kd/seed0/args.json").read_text())
    teacher = kd_args[kd_args.index("--teacher-checkpoint") + 1]
    assert teacher == str((out / "runs/lenet5/digits/kflo/seed0/last.safetensors").resolve())
    assert kd_args[kd_args.index("--threads") + 1] == "1"
    md = (out / "results.md").read_text()
    assert "`kflo` seed 1: failed (exit 2): error: boom in kflo" in md and "`kd` seed 1: blocked" in md
    assert "| kflo | 2/3 |" in md and "paired t-test" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 9 and {r["status"] for r in rows} == {"done", "failed", "blocked"}
    # kflo vs vanilla paired over the seeds both finished (0 and 2): differences 2.0 and 1.9
    kflo = next(m for m in outcome.report["tables"][0]["methods"] if m["method"] == "kflo")
    assert kflo["comparison"]["seeds"] == [0, 2] and kflo["comparison"]["mean"] == pytest.approx(1.95)
    assert kflo["cost_ratio"] == pytest.approx(1.5)
    # the next invocation retries the failed cell (and its dependent) and skips the finished ones
    fake_train(grid, out, acc=ACC, fail=[])
    again = run_sweep(grid, out, jobs=1, threads=1, console=quiet())
    assert again.exit_code == 0 and again.ran == 2 and again.skipped == 7
    record = json.loads((out / "runs/lenet5/digits/kflo/seed1/sweep-cell.json").read_text())
    assert record["attempt"] == 2 and record["status"] == "done"
    table = again.report["tables"][0]
    assert next(m for m in table["methods"] if m["method"] == "kflo")["comparison"]["verdict"] == "better"
    assert json.loads((out / "results.json").read_text())["test"] == "paired t-test over seeds"


def test_changed_grid_is_refused(tmp_path, fake_train):
    grid = write_grid(tmp_path, GRID)
    out = tmp_path / "out"
    fake_train(grid, out, acc=ACC)
    assert run_sweep(grid, out, jobs=1, threads=1, console=quiet()).exit_code == 0
    grid.write_text(GRID.replace("batch_size = 32", "batch_size = 16"))
    with pytest.raises(KfloError, match="trained with other settings.*batch_size 32 -> 16"):
        run_sweep(grid, out, jobs=1, threads=1, console=quiet())


def test_cell_still_trained_by_an_orphan_is_refused(tmp_path, fake_train):
    grid = write_grid(tmp_path, GRID)
    out = tmp_path / "out"
    run_dir = (out / "runs/lenet5/digits/kflo/seed1").resolve()
    run_dir.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-o", str(run_dir)])
    try:
        (run_dir / "sweep-cell.json").write_text(json.dumps({"status": "running", "pid": orphan.pid}))
        with pytest.raises(KfloError, match=f"still being trained by process {orphan.pid}"):
            run_sweep(grid, out, jobs=1, threads=1, console=quiet())
    finally:
        orphan.kill()
        orphan.wait()
    fake_train(grid, out, acc=ACC)
    live = Console(file=io.StringIO(), force_terminal=True, width=120)
    assert run_sweep(grid, out, jobs=2, threads=1, console=live, live=True).exit_code == 0  # the progress bar
    assert "lenet5/digits/kflo/seed1: done" in live.file.getvalue()


def test_ctrl_c_stops_the_runs_and_exits_130(tmp_path, fake_train):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs as a background job
    grid = write_grid(tmp_path, GRID)
    out = tmp_path / "out"
    fake_train(grid, out, acc=ACC, sleep=30)

    def interrupt():
        deadline = time.time() + scaled_timeout(30)
        while time.time() < deadline and len(list(out.glob("runs/*/*/*/*/ready"))) < 2:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    start = time.time()
    outcome = run_sweep(grid, out, jobs=2, threads=1, console=quiet())
    assert time.time() - start < 25
    assert outcome.interrupted and outcome.exit_code == 130
    statuses = sorted(r["status"] for r in outcome.report["rows"])
    assert statuses == ["interrupted", "interrupted", "not run", "not run"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_jobs_and_threads():
    assert sweep_runner.plan_threads(2, None, cores=8) == 4
    assert sweep_runner.plan_threads(3, None, cores=8) == 2
    with pytest.raises(KfloError, match="exceed the 8 CPU cores"):
        sweep_runner.plan_threads(3, 3, cores=8)
    with pytest.raises(KfloError, match="more than the 2 CPU cores"):
        sweep_runner.plan_threads(3, None, cores=2)


def test_report_on_hand_made_rows(tmp_path):
    grid = load_grid(write_grid(tmp_path, GRID), check_models=False)
    rows = []
    for method, accs in (("vanilla", [90.0, 91.0, 92.0]), ("kflo", [93.0, 94.2, 95.1])):
        for seed, acc in enumerate(accs):
            rows.append({"model": "lenet5", "data": "digits", "method": method, "seed": seed, "status": "done",
                         "deployed_test_acc": acc, "trained_test_acc": acc, "total_seconds": 1.0, "params_trained": 5,
                         "params_deployed": 5, "auxiliary": False})
    (table,) = tables(grid, rows)
    kflo = table["methods"][1]
    # differences 3.0, 3.2, 3.1: mean 3.1, sd 0.1, t = 3.1 / (0.1 / sqrt(3)) = 31 sqrt(3) with 2 degrees of freedom,
    # whose two-sided p has the closed form 1 - t / sqrt(t^2 + 2)
    t = 31.0 * math.sqrt(3.0)
    assert kflo["comparison"]["mean"] == pytest.approx(3.1)
    assert kflo["comparison"]["t"] == pytest.approx(t)
    assert kflo["comparison"]["p"] == pytest.approx(2 * t_sf(t, 2)) == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert kflo["comparison"]["verdict"] == "better" and kflo["cost_ratio"] == pytest.approx(1.0)


# -- a real sweep -------------------------------------------------------------------------------------------------------
def test_real_sweep_resumes_an_interrupted_cell_and_skips_finished_ones(tmp_path):
    """2 methods x 2 seeds of LeNet-5 on a fifth of digits, 1 epoch; vanilla seed 1 stops after 2 steps (kflo
    train's hidden --stop-after-steps) and the next invocation resumes it without touching the other runs."""
    grid = write_grid(tmp_path, GRID.replace('data = "digits"', 'data = "digits"\ntrain_fraction = 0.2'))
    out = tmp_path / "out"
    jobs = min(2, sweep_runner.cpu_cores())

    def stop_one(cell, action):
        return ["--stop-after-steps", "2"] if (cell.method, cell.seed, action) == ("vanilla", 1, "start") else []

    first = run_sweep(grid, out, jobs=jobs, threads=1, console=quiet(), extra_args=stop_one)
    rows = {(r["method"], r["seed"]): r for r in first.report["rows"]}
    assert first.exit_code == 1 and rows[("vanilla", 1)]["status"] == "interrupted", rows
    assert [rows[k]["status"] for k in (("vanilla", 0), ("kflo", 0), ("kflo", 1))] == ["done"] * 3
    assert rows[("kflo", 0)]["deployed_from"] == "collapsed (last)"
    assert rows[("kflo", 0)]["params_trained"] > rows[("kflo", 0)]["params_deployed"] == rows[("vanilla", 0)]["params_deployed"]
    assert (out / "runs/lenet5/digits/vanilla/seed1/state.safetensors").is_file()
    for name in ("results.csv", "results.json", "results.md", "results.png", "grid.toml"):
        assert (out / name).is_file(), name
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/*/summary.json")}
    assert len(finished) == 3

    second = run_sweep(grid, out, jobs=jobs, threads=1, console=quiet())
    assert second.exit_code == 0 and second.ran == 1 and second.skipped == 3
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the finished runs were not touched
    record = json.loads((out / "runs/lenet5/digits/vanilla/seed1/sweep-cell.json").read_text())
    assert record["action"] == "resume" and record["status"] == "done" and "--resume" in record["command"]
    summaries = {p.parent.parent.name + p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/*/*/*/summary.json")}
    assert summaries["vanillaseed1"]["steps"] == summaries["vanillaseed0"]["steps"]  # the whole epoch was trained
    csv_rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(csv_rows) == 4 and all(r["status"] == "done" and float(r["deployed_test_acc"]) > 0 for r in csv_rows)
    md = (out / "results.md").read_text()
    assert "| vanilla | 2/2 |" in md and "| kflo | 2/2 |" in md and "baseline" in md


def test_a_run_recorded_before_a_recipe_gained_a_defaulted_parameter_is_not_stale():
    from kflo_cli.sweep.rows import config_differences

    expected = {"recipe": ["kflo:depth=2,width=4.0,mode=auto,decay=composed"], "lr": 0.02}
    # written before KFLO had mode/decay, and an ExpandNet run recorded with the old default mode=kernel
    assert config_differences(expected, {"recipe": ["kflo:depth=2,width=4.0"], "lr": 0.02}) == []
    assert config_differences({"recipe": ["expandnet-ck:rate=4.0,mode=auto"]},
                              {"recipe": ["expandnet-ck:rate=4.0,mode=kernel"]}) == []
    # a real difference stays one: another width, another decay rule, another learning rate
    assert config_differences(expected, {"recipe": ["kflo:depth=2,width=2.0"], "lr": 0.02})
    assert config_differences(expected, {"recipe": ["kflo:depth=2,width=4.0,decay=factors"], "lr": 0.02})
    assert config_differences(expected, {"recipe": ["kflo:depth=2,width=4.0"], "lr": 0.05})
