"""The recipe search: a pinned recipe, runs read from their experiment commits with
their params and validation curves and nothing of the test set, shares of the pairs,
successive halving, and a ranking with standard errors and paired 95 % intervals."""

from __future__ import annotations

import json
import subprocess
import sys

import mpmath
import pytest
import yaml

from experiments import search as sr
from helpers import REPO
from stages.common import StageError
from stages.params import read_yaml, read_yaml_text

PARAMS = read_yaml(REPO / "params.yaml")
FIXED = {"train.val_size": 10000, "train.val_seed": 0}
# the params of the next search's candidates, added to params.yaml on another branch
NEW_KEYS = {"interpolation", "bn_recompute", "clean_epochs", "anneal", "norm_decay",
            "swa_epochs", "elastic"}


def a_search(**candidates) -> dict:
    """A search over params.yaml's recipe as it is, with a base and CANDIDATES."""
    recipe = {key: PARAMS["train"][key.removeprefix("train.")]
              for key in sorted(sr.recipe_keys(PARAMS, FIXED))}
    return {"search": "t", "title": "A search", "fixed": dict(FIXED), "recipe": recipe,
            "candidates": {"base": {"params": {}, "why": "the base"},
                           **{name: {"params": params, "why": "a try"}
                              for name, params in candidates.items()}}}


def write_search(tmp_path, search: dict):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


# --- search.yaml: the recipe, pinned ----------------------------------------------

@pytest.mark.xfail(not NEW_KEYS <= set(PARAMS["train"]), strict=True, raises=StageError,
                   reason="search.yaml pins the candidates' params, which params.yaml gains "
                          "with the train stage that implements them")
def test_the_search_pins_every_recipe_key_of_params_yaml():
    search = sr.load_search(sr.SEARCH_FILE, REPO / "params.yaml")
    assert set(search["recipe"]) == sr.recipe_keys(PARAMS, search["fixed"])
    assert search["recipe"]["train.scale"] == 0.1  # step 6's recipe, not whatever comes later
    for name in search["candidates"]:
        args = sr.overrides(search, name, seed=3)
        pinned = dict(arg.split("=", 1) for arg in args[1::2])
        assert args[0::2] == ["-S"] * len(pinned)
        assert set(search["recipe"]) | set(FIXED) | {"train.seed"} == set(pinned)
        assert pinned["train.val_size"] == "10000" and pinned["train.seed"] == "3"


def test_a_recipe_that_lacks_a_key_or_pins_an_unknown_one_is_refused(tmp_path):
    search = a_search(lr3={"train.lr": 0.3})
    assert sr.load_search(write_search(tmp_path, search), REPO / "params.yaml")["candidates"]
    del search["recipe"]["train.scale"]  # a later params.yaml change would move the base
    search["recipe"]["train.colour"] = 1
    with pytest.raises(StageError, match=r"`recipe` must pin every recipe key of .*params.yaml's "
                                         r"train section: it lacks train.scale; .* has no "
                                         r"train.colour$"):
        sr.load_search(write_search(tmp_path, search), REPO / "params.yaml")


@pytest.mark.parametrize("params, message", [
    ({"train.seed": 2}, "candidate c sets train.seed, which is not a recipe key"),
    ({"train.val_size": 5}, "candidate c sets train.val_size, which is not a recipe key"),
    ({"train.lr": -1.0}, "candidate c makes invalid params: params.yaml: train.lr = -1.0 is "
                         "out of range"),
])
def test_a_candidate_sets_recipe_keys_to_allowed_values_only(tmp_path, params, message):
    with pytest.raises(StageError, match=message):
        sr.load_search(write_search(tmp_path, a_search(c=params)), REPO / "params.yaml")


def test_a_candidate_without_why_is_refused(tmp_path):
    search = a_search()
    search["candidates"]["c"] = {"params": {}}
    with pytest.raises(StageError, match="candidate c needs .* `params` \\(a mapping\\) and `why`"):
        sr.load_search(write_search(tmp_path, search), REPO / "params.yaml")


def test_overrides_read_back_as_the_pinned_values():
    search = a_search(tiny={"train.weight_decay": 1e-05, "train.nesterov": False})
    args = sr.overrides(search, "tiny", seed=7)
    ran = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[1::2])}
    assert ran == sr.settings(search, "tiny", 7)  # 1e-05 is not PyYAML's string '1e-05'
    assert ran["train.weight_decay"] == 1e-05 and ran["train.nesterov"] is False


# --- one run, read from a commit that holds test metrics too ----------------------

def git(root, *args) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def tsv(metric: str, values: list[float]) -> str:
    return f"step\t{metric}\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values, 1))


TEST_ACC, TEST_LOSS = 99.87, 0.0123  # numbers that appear in no validation file


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository to commit runs in: each as a train stage writes them, with a
    test history and summary beside the validation history (as runs before item 1 of
    the split had them). The working directory for the test."""
    for var in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{var}_NAME", "t")
        monkeypatch.setenv(f"GIT_{var}_EMAIL", "t@localhost")
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    monkeypatch.chdir(root)
    return root


def commit_run(root, params: dict, val_acc: list[float], val_loss: list[float]) -> str:
    """Commit one run that ran PARAMS ({dotted key: value} over params.yaml)."""
    raw = read_yaml(REPO / "params.yaml")
    for key, value in params.items():
        section, leaf = key.split(".", 1)
        raw[section][leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    live = root / "metrics/train"
    for split, acc, loss in (("val", val_acc, val_loss),
                             ("test", [99.1, 99.5, TEST_ACC], [0.03, 0.02, TEST_LOSS]),
                             ("train", [97.0, 98.0, 99.0], [0.1, 0.07, 0.05])):
        (live / "plots/metrics" / split).mkdir(parents=True, exist_ok=True)
        (live / "plots/metrics" / split / "acc.tsv").write_text(tsv("acc", acc))
        (live / "plots/metrics" / split / "loss.tsv").write_text(tsv("loss", loss))
    (live / "metrics.json").write_text(json.dumps({
        "test": {"acc": TEST_ACC, "loss": TEST_LOSS}, "val": {"acc": val_acc[-1]},
        "best": {"test_acc": TEST_ACC, "test_epoch": 3}}))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a run")
    return git(root, "rev-parse", "HEAD").strip()


def test_a_run_is_read_with_its_params_and_curve_and_nothing_of_the_test_set(repo):
    rev = commit_run(repo, {"train.val_size": 10000, "train.seed": 3},
                     [98.5, 99.2, 99.31], [0.05, 0.03, 0.0202])
    result = sr.run_result(rev)
    assert result["val_acc"] == 99.31 and result["val_loss"] == 0.0202
    assert result["epochs"] == 3 and result["commit"] == rev
    assert result["curve"] == {"val_acc": [98.5, 99.2, 99.31], "val_loss": [0.05, 0.03, 0.0202]}
    ran = read_yaml_text((repo / "params.yaml").read_text(), "params.yaml")
    assert result["params"] == {**{f"train.{k}": v for k, v in ran["train"].items()},
                                **{f"runtime.{k}": v for k, v in ran["runtime"].items()}}
    assert result["params"]["train.seed"] == 3 and result["params"]["train.val_size"] == 10000
    text = json.dumps(result)  # the commit holds test metrics; the record must not
    assert "test" not in text and str(TEST_ACC) not in text and str(TEST_LOSS) not in text


def test_each_recorded_run_keeps_the_params_it_ran_and_other_params_are_refused(repo):
    search = a_search(lr3={"train.lr": 0.3})
    revs = {("base", 1): commit_run(repo, sr.settings(search, "base", 1), [99.0, 99.4], [.03, .02]),
            ("lr3", 1): commit_run(repo, sr.settings(search, "lr3", 1), [99.1, 99.5], [.03, .01])}
    entry = sr.current({}, search)
    sr.record_runs(entry, search, revs, "a CPU, 2 cores")
    for (name, seed), rev in revs.items():
        run = entry["runs"][name][str(seed)]
        assert run["commit"] == rev and run["machine"] == "a CPU, 2 cores"
        for key, value in sr.settings(search, name, seed).items():
            assert run["params"][key] == value
    assert entry["runs"]["lr3"]["1"]["params"]["train.lr"] == 0.3
    assert entry["runs"]["base"]["1"]["params"]["train.lr"] == PARAMS["train"]["lr"]
    sr.check_record(entry, search)
    # the same name with another recipe: a run that ran other params is not recorded...
    stale = commit_run(repo, sr.settings(search, "lr3", 2) | {"train.lr": 0.25}, [99.0], [.02])
    with pytest.raises(StageError, match=r"experiment search-lr3-s2 \(\w{7}\) ran other params "
                                         r"than search.yaml pins for it: train.lr 0.25 "
                                         r"\(pinned: 0.3\)"):
        sr.record_runs(entry, search, {("lr3", 2): stale}, None)
    # ...and a record made before a candidate's params changed is refused
    search["candidates"]["lr3"]["params"]["train.lr"] = 0.4
    with pytest.raises(StageError, match=r"lr3's seed 1 ran other params than search.yaml pins "
                                         r"now \(train.lr 0.3 \(pinned: 0.4\)\); give the changed "
                                         r"candidate a new name"):
        sr.check_record(entry, search)


def test_collect_records_the_search_experiments_on_a_baseline(repo, tmp_path, monkeypatch):
    """After `make exp-pull`, the experiments that other machines ran are refs like this
    machine's own: collect records each of the search's on the baseline, once."""
    search = a_search(lr3={"train.lr": 0.3})
    monkeypatch.setattr(sr, "SEARCH_FILE", write_search(tmp_path, search))
    baseline = git(repo, "rev-parse", "HEAD").strip()
    rev = commit_run(repo, sr.settings(search, "lr3", 2), [99.0], [0.02])
    base = commit_run(repo, sr.settings(search, "base", 2), [98.9], [0.03])
    git(repo, "checkout", "-q", baseline)
    for name, commit in (("search-lr3-s2", rev), ("search-base-s2", base),
                         ("search-gone-s1", rev), ("seed-1", rev)):  # the last two: not ours
        git(repo, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", commit)
    git(repo, "update-ref", f"refs/exps/{rev[:2]}/{rev[2:]}/search-base-s1", rev)  # elsewhere
    assert sr.search_experiments(search, baseline) == {("lr3", 2): rev, ("base", 2): base}
    for _ in range(2):  # the second time, nothing is new
        monkeypatch.setattr(sys, "argv", ["search", "collect", "--machine", "m2"])
        sr.main()
    entry = json.loads((repo / sr.SEARCH_JSON).read_text())["searches"]["t"]
    assert {name: list(runs) for name, runs in entry["runs"].items()} == {"base": ["2"],
                                                                          "lr3": ["2"]}
    assert entry["runs"]["lr3"]["2"]["params"]["train.lr"] == 0.3
    assert entry["batches"] == [{"pairs": {"base": [2], "lr3": [2]}, "wall_s": None,
                                 "jobs": None, "machine": "m2", "code": baseline[:7],
                                 "collected": True}]


def test_run_records_params_and_curves_of_the_pairs_it_ran(repo, tmp_path, monkeypatch, capsys):
    """`run --seeds 1-2 --only lr3 --share 2/2` with DVC's queue replaced: the pairs it
    queues are its share, and search.json gets each run's params and curve."""
    search = a_search(lr3={"train.lr": 0.3})
    monkeypatch.setattr(sr, "SEARCH_FILE", write_search(tmp_path, search))
    queued, revs = {}, {}

    def run_queued(runs, jobs, targets):
        queued.update(runs)
        for name, args in runs.items():
            settings = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[1::2])}
            revs[name] = commit_run(repo, settings, [99.0, 99.45], [0.03, 0.02])

    monkeypatch.setattr(sr, "run_queued", run_queued)
    monkeypatch.setattr(sr, "experiment_rev", lambda name, baseline: revs[name])
    monkeypatch.setattr(sys, "argv", ["search", "run", "--seeds", "1-2", "--only", "lr3",
                                      "--share", "2/2"])
    sr.main()
    assert list(queued) == ["search-lr3-s2"]  # share 2 of (lr3, 1), (lr3, 2)
    doc = json.loads((repo / sr.SEARCH_JSON).read_text())
    run = doc["searches"]["t"]["runs"]["lr3"]["2"]
    assert run["params"]["train.lr"] == 0.3 and run["params"]["train.seed"] == 2
    assert run["curve"]["val_acc"] == [99.0, 99.45]
    assert doc["searches"]["t"]["batches"][0]["pairs"] == {"lr3": [2]}
    assert doc["searches"]["t"]["batches"][0]["share"] == "2/2"
    out = capsys.readouterr().out
    assert "| 1 | lr3 | `train.lr: 0.3` | 1 | 99.450 | — | — |" in out
    assert "The base, as `experiments/search.yaml` pins it for every run: `train." in out


# --- shares and the plan ------------------------------------------------------------

def test_the_shares_cover_each_pair_exactly_once():
    pairs = sr.pair_list({"a": [1, 2, 3], "b": [1, 2], "c": [4, 5, 6, 7]})
    assert pairs[:3] == [("a", 1), ("b", 1), ("a", 2)]  # seed by seed
    for n in range(1, 12):
        shares = [sr.share(pairs, k, n) for k in range(1, n + 1)]
        assert sorted(p for s in shares for p in s) == sorted(pairs)  # all, none twice
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert sr.parse_share("2/3") == (2, 3)
    for text in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(StageError, match=f"--share {text}: expected K/N"):
            sr.parse_share(text)


def runs_of(values: dict[int, float]) -> dict:
    return {str(seed): {"val_acc": acc, "val_loss": 0.02, "commit": "abcdef0123"}
            for seed, acc in values.items()}


def test_successive_halving_keeps_those_within_one_standard_error_of_the_best():
    runs = {"a": runs_of({1: 99.60, 2: 99.50, 3: 99.55, 4: 99.65}),
            "base": runs_of({1: 99.50, 2: 99.40, 3: 99.45, 4: 99.55}),
            "b": runs_of({1: 99.58, 2: 99.52, 3: 99.50, 4: 99.62}),
            "c": runs_of({1: 99.62, 2: 99.45, 3: 99.57, 4: 99.63}),
            "d": runs_of({1: 99.30, 2: 99.20})}
    names = list(runs)
    # first every candidate on seeds 1-4
    assert sr.plan(runs, names) == ({"d": [3, 4]}, [])
    runs["d"] = runs_of({1: 99.30, 2: 99.20, 3: 99.25, 4: 99.35})
    needed, notes = sr.plan(runs, names)
    # best a (mean 99.575). a - b = .02, -.02, .05, .03: gap .020, SD .0294, SE .0147 < gap:
    # b stops. a - c = -.02, .05, -.02, .02: gap .0075, SD .0340, SE .0170 >= gap: c goes on.
    # a - base = .10 every seed: SE 0, but the base always goes on; a - d = .30 every seed.
    assert needed == {"a": [5, 6, 7], "base": [5, 6, 7], "c": [5, 6, 7]}
    assert notes == ["after seeds 1-4: best a; on to seeds 1-7: a, base, c; stopped: "
                     "b (0.020 below, SE 0.015), d (0.300 below, SE 0.000)"]
    for name, later in (("a", 99.6), ("base", 99.5), ("c", 99.0)):
        runs[name].update(runs_of({5: later, 6: later, 7: later}))
    assert sr.plan(runs, names)[0] == {"a": [8, 9, 10], "base": [8, 9, 10]}
    for name in ("a", "base"):
        runs[name].update(runs_of({8: 99.5, 9: 99.5, 10: 99.5}))
    needed, notes = sr.plan(runs, names)
    assert needed == {} and notes[-1] == "finalists, on seeds 1-10: a, base; nothing left to run"


def test_the_table_lists_the_halvings_decisions_and_what_is_left():
    entry = {"runs": {"a": runs_of({1: 99.60, 2: 99.50, 3: 99.55, 4: 99.65}),
                      "base": runs_of({1: 99.50, 2: 99.40, 3: 99.45, 4: 99.55}),
                      "b": runs_of({1: 99.58, 2: 99.52, 3: 99.50, 4: 99.62}),
                      "c": runs_of({1: 99.62, 2: 99.45, 3: 99.57, 4: 99.63, 5: 99.6})},
             "candidates": {name: {"params": {}, "why": ""} for name in ("base", "a", "b", "c")},
             "recipe": {"train.lr": 0.2}, "fixed": {"train.val_size": 10000}, "batches": []}
    text = sr.search_table("t", entry)
    assert ("Successive halving, from the record:\n\n- after seeds 1-4: best a; on to seeds "
            "1-7: base, a, c; stopped: b (0.020 below, SE 0.015).\n- still to run: base on seeds "
            "5, 6, 7; a on seeds 5, 6, 7; c on seeds 6, 7.\n") in text
    entry["batches"] = [{"pairs": {}, "wall_s": 5400, "code": "abcdef0"},
                        {"pairs": {}, "wall_s": None, "code": "abcdef0"}]
    # on seeds 1-4 (c's seed 5 has no pair): a - base .10 each seed, interval .10 ± 0;
    # b - base .08 .12 .05 .07: mean .08, SD .02944, SE .01472, t(3) 3.182: ± .047;
    # c - base .12 .05 .12 .08: mean .0925 (.09249... in floats), SD .03403, SE .01702: ± .054
    assert sr.summary("t", entry) == (
        "t: 3 candidates against the base, 17 runs on the validation split in 1.5 h of wall "
        "time, successive halving under way (8 runs to go). Those on the most seeds, by their "
        "final validation accuracy's paired difference from the base (± 95 % interval): c "
        "+0.092 ± 0.054 (4 seeds). Above the base: c, a, b.")


# --- the ranking --------------------------------------------------------------------

def test_standard_errors_and_paired_intervals_on_a_hand_checked_example():
    """By hand:
    base 99.50 99.40 99.45 99.55: mean 99.475; squares of the deviations .000625 .005625
      .000625 .005625, sum .0125, variance .0125/3, SD .06455, SE .06455/2 = .03227.
    c    99.56 99.44 99.47 99.61: mean 99.52; deviations .04 -.08 -.05 .09, squares sum
      .0186, variance .0062, SD .07874, SE .03937.
    c - base .06 .04 .02 .06: mean .045; deviations .015 -.005 -.025 .015, squares sum
      .0011, variance .0011/3, SD .01915, SE .009574; t(0.975, 3) = 3.182, half-width
      .03047: the interval .0145 to .0755, above zero.
    d    99.52 99.30 (99.90 on seed 5, which the base did not run): n 3, mean 99.5733,
      squares of the deviations .002844 .074711 .106711, variance .184267/2, SD .30353,
      SE .17525;
      paired on seeds 1-2 only: d - base .02 -.10, mean -.04, SD .08485, SE .06,
      t(0.975, 1) = 12.706, half-width .7624: the interval includes zero.
    """
    entry = {"runs": {"base": runs_of({1: 99.50, 2: 99.40, 3: 99.45, 4: 99.55}),
                      "c": runs_of({1: 99.56, 2: 99.44, 3: 99.47, 4: 99.61}),
                      "d": runs_of({1: 99.52, 2: 99.30, 5: 99.90}),
                      "e": runs_of({1: 99.70})},
             "candidates": {"base": {"params": {}, "why": ""},
                            "c": {"params": {"train.lr": 0.3}, "why": ""},
                            "d": {"params": {"train.warmup": 0.2}, "why": ""},
                            "e": {"params": {"train.dropout": 0.0}, "why": ""}},
             "batches": [{"pairs": {"base": [1, 2, 3, 4]}, "wall_s": 1200, "jobs": 2,
                          "machine": "a CPU, 2 cores", "code": "abcdef0", "share": "1/2"}]}
    rows = {row["candidate"]: row for row in sr.ranking(entry)}
    assert [row["candidate"] for row in sr.ranking(entry)] == ["c", "base", "d", "e"]
    assert rows["base"]["mean"] == pytest.approx(99.475)
    assert rows["base"]["se"] == pytest.approx(0.032275, abs=1e-6)
    assert rows["c"]["mean"] == pytest.approx(99.52)
    assert rows["c"]["se"] == pytest.approx(0.039370, abs=1e-6)
    diff = rows["c"]["diff"]
    assert diff["n"] == 4 and diff["mean"] == pytest.approx(0.045)
    assert diff["half"] == pytest.approx(0.030465, abs=1e-5)
    assert (diff["low"], diff["high"]) == (pytest.approx(0.014535, abs=1e-5),
                                           pytest.approx(0.075465, abs=1e-5))
    assert rows["d"]["n"] == 3 and rows["d"]["mean"] == pytest.approx(99.573333, abs=1e-6)
    assert rows["d"]["diff"]["n"] == 2 and rows["d"]["diff"]["mean"] == pytest.approx(-0.04)
    assert rows["d"]["diff"]["half"] == pytest.approx(0.76236, abs=1e-4)
    assert rows["e"]["se"] is None and rows["e"]["diff"] is None and rows["base"]["diff"] is None
    text = sr.search_table("t", entry)
    assert ("| 1 | c | `train.lr: 0.3` | 4 | 99.520 | 0.039 | +0.045 ± 0.030 (4 seeds) "
            "| 0.0200 |") in text
    assert "| 2 | base | none: the base | 4 | 99.475 | 0.032 | — |" in text
    assert ("| 3 | d | `train.warmup: 0.2` | 3 | 99.573 | 0.175 | -0.040 ± 0.762 (2 seeds) |"
            in text)
    assert ("Verdict, from the record: above the base (its interval above zero): c; not told "
            "apart from the base (its interval includes zero): d; under two seeds shared with "
            "the base, no interval: e.") in text
    assert "The commits are local to the machine that ran them" in text
    assert "| d | 99.52 `abcdef0` | 99.30 `abcdef0` |  |  | 99.90 `abcdef0` |" in text
    assert "| 1 | base s1, 2, 3, 4 (share 1/2) | 20 min | 2 | a CPU, 2 cores | `abcdef0` |" in text


def test_the_t_table_is_students_t():
    def quantile(df: int) -> float:
        def cdf(x):
            return 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True) / 2
        return float(mpmath.findroot(lambda x: cdf(x) - 0.975, (1.9, 13.0), solver="illinois"))

    for df in range(1, 31):
        assert sr.t975(df) == pytest.approx(quantile(df), abs=5e-4), df
    for df in (31, 40, 60, 120, 1000):
        assert sr.t975(df) == pytest.approx(quantile(df), abs=1e-3), df
    with pytest.raises(ValueError):
        sr.t975(0)


def test_the_record_of_the_first_search_is_kept_as_it_ran():
    doc = json.loads((REPO / sr.SEARCH_JSON).read_text())
    first = doc["searches"]["step-6"]
    assert first["runs"]["scale"]["1"] == {"commit": "e7daed73236f2e10f3ec0dc5249258ac2c560063",
                                           "epochs": 15, "val_acc": 99.51, "val_loss": 0.017589}
    assert not any("curve" in run or "params" in run
                   for by_seed in first["runs"].values() for run in by_seed.values())
    text = sr.table(doc)
    assert ("| 1 | scale | `train.scale: 0.1` | 3 | 99.507 | 0.015 | +0.060 ± 0.215 (3 seeds) |"
            in text)
    assert "holds each run's final epoch only" in text
