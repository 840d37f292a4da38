//! `recipe bench`: throughput measures a real model, sweep runs a resumable grid of real runs,
//! speedup measures time-to-accuracy; bad arguments get clean errors.

mod common;
use common::*;

/// `--json` gives the figures the side-by-side script reads, and `--trainer` runs the whole
/// trainer against a bare loop over the same loader and reports both step times.
#[test]
fn throughput_json_and_engine_overhead() {
    let o = run(&[
        "bench",
        "throughput",
        "--model",
        "small_resnet",
        "--input",
        "1x10x10",
        "--batch",
        "4",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--json",
        "--trainer",
        "--rounds",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    let first = s.lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(first).expect("a JSON line");
    for key in [
        "images_per_sec",
        "images_per_cpu_sec",
        "forward_ms",
        "backward_ms",
        "optimizer_ms",
        "peak_rss_mb",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {first}");
    }
    assert_eq!(v["model"], "small_resnet");
    let engine = s
        .lines()
        .find(|l| l.starts_with("engine:"))
        .expect("engine line");
    assert!(
        engine.contains("in the trainer (progress_bar, json_logger, lr_monitor, speed_monitor)")
            && engine.contains("bare loop"),
        "{engine}"
    );
    assert_eq!(v["trainer_ms"].as_array().map(Vec::len), Some(1), "{first}");
    // With algorithms, each one's own time in `apply` per step.
    let o = run(&[
        "bench",
        "throughput",
        "--model",
        "small_resnet",
        "--input",
        "1x10x10",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        "--trainer",
        "--rounds",
        "1",
        "--callbacks",
        "none",
        "--algorithms",
        "[{name: mixup}, cutout]",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(s.lines().next().unwrap_or_default()).unwrap();
    let own = &v["apply_ms_per_step"][0];
    for label in ["algorithms[0]:mixup", "algorithms[1]:cutout"] {
        assert!(
            own[label].as_f64().is_some_and(|ms| ms > 0.0),
            "{label} in {s}"
        );
    }
    assert!(s.contains("their own time per step"), "{s}");
}

#[test]
fn throughput_reports_rate_split_and_memory() {
    let o = run(&[
        "bench",
        "throughput",
        "--model",
        "{name: small_cnn, channels: [4, 8]}",
        "--input",
        "1x12x12",
        "--batch",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]);
    let s = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        s.contains("images/s")
            && s.contains("forward")
            && s.contains("backward")
            && s.contains("optimizer")
            && s.contains("peak RSS"),
        "{s}"
    );
    let words: Vec<&str> = s.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.starts_with("images/s"))
        .unwrap_or(0);
    let rate: f64 = words
        .get(at.wrapping_sub(1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    assert!(rate > 0.0, "{s}");
}

#[test]
fn bad_benchmark_arguments_are_explained() {
    for (args, want) in [
        (
            vec!["--model", "small_cnn", "--input", "28x28"],
            "channels x height x width",
        ),
        (
            vec!["--model", "nosuchmodel"],
            "unknown model `nosuchmodel`",
        ),
        (
            vec!["--model", "{name: small_cnn, chanels: [4]}"],
            "did you mean `channels`",
        ),
        (vec!["--model", "small_cnn", "--batch", "0"], "at least 1"),
    ] {
        let mut a = vec!["bench", "throughput"];
        a.extend(args.iter());
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn sweep_runs_the_grid_once_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let r = write_recipe(dir.path(), "t.yaml", TINY);
    let out = dir.path().join("sweep");
    let args = [
        "bench",
        "sweep",
        r.to_str().unwrap(),
        "--scales",
        "0.5,1",
        "--vary",
        "schedule=linear@{name: linear},trunc@{name: multistep, milestones: [4ba], scale_policy: {milestones: fixed}}",
        "--seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("cell ").count(),
        8,
        "2 variants x 2 scales x 2 seeds"
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4);
    assert!(rows[0].starts_with("linear,0.5,2,"), "{csv}");
    // Two seeds a cell: the accuracy's 95% confidence interval is there and finite.
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let ci = header
        .iter()
        .position(|h| *h == "accuracy_ci95")
        .expect("a CI column");
    let v: f64 = rows[0].split(',').nth(ci).unwrap().parse().unwrap();
    assert!(v.is_finite() && v >= 0.0, "{csv}");
    assert!(stdout(&o).contains("| trunc |"), "{}", stdout(&o));
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let steps: Vec<u64> = res["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["steps"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![4, 4, 8, 8, 4, 4, 8, 8]);
    assert!(
        out.join("accuracy_vs_cost.png").is_file() && out.join("accuracy_vs_cost.svg").is_file()
    );
    // Given again, it runs nothing and reports the same table.
    let again = run(&args);
    assert!(again.status.success());
    assert_eq!(
        stderr(&again).matches("cell ").count(),
        0,
        "{}",
        stderr(&again)
    );
    assert_eq!(stdout(&again), stdout(&o));
    // A variant that does not exist is refused before any cell runs.
    let o = run(&[
        "bench",
        "sweep",
        r.to_str().unwrap(),
        "--vary",
        "schedule.name=linear,cosinee",
        "--out",
        dir.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cosinee") && e.contains("did you mean `cosine`"),
        "{e}"
    );
    assert!(!dir.path().join("bad/cells").exists());
}

#[test]
fn sweep_compares_recipe_files_against_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_recipe(dir.path(), "base.yaml", TINY);
    let preset = write_recipe(
        dir.path(),
        "preset.yaml",
        &TINY.replace("name: tiny", "name: tiny_preset").replace(
            "schedule:",
            "algorithms:\n  - name: label_smoothing\n    smoothing: 0.1\nschedule:",
        ),
    );
    let out = dir.path().join("sweep");
    let o = run(&[
        "bench",
        "sweep",
        base.to_str().unwrap(),
        preset.to_str().unwrap(),
        "--scales",
        "0.5,1",
        "--seeds",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Cells run in rounds: every variant at a budget before the next budget.
    let err = stderr(&o);
    let order: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("cell "))
        .map(|l| l.split_once(": ").unwrap().1)
        .collect();
    assert_eq!(
        order,
        [
            "tiny, scale 0.5, seed 3",
            "tiny_preset, scale 0.5, seed 3",
            "tiny, scale 1, seed 3",
            "tiny_preset, scale 1, seed 3"
        ]
    );
    let md = std::fs::read_to_string(out.join("budget_table.md")).unwrap();
    for part in [
        "| tiny_preset |",
        "Training wall time (s, evaluation excluded)",
        "Against `tiny` at the same budget",
        "Training time to `tiny`'s accuracy at the 100% budget",
    ] {
        assert!(md.contains(part), "{part} missing from:\n{md}");
    }
    // The reference against itself: no difference, a ratio of one.
    let against = md.split("Against `tiny`").nth(1).unwrap();
    let row = against.lines().find(|l| l.starts_with("| tiny |")).unwrap();
    assert_eq!(row, "| tiny | +0.00 / 1.00x | +0.00 / 1.00x |", "{md}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for c in res["cells"].as_array().unwrap() {
        let train = c["train_seconds"].as_f64().unwrap();
        assert!(train > 0.0 && train <= c["wall_seconds"].as_f64().unwrap());
        assert!(c["cpu_seconds"].as_f64().unwrap() > 0.0);
    }
    // Two files with one name cannot be told apart.
    let o = run(&[
        "bench",
        "sweep",
        base.to_str().unwrap(),
        base.to_str().unwrap(),
        "--out",
        dir.path().join("same").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("two variants are both named `tiny`"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("same/cells").exists());
}

/// `recipe bench speedup` of TINY against `candidate` (a recipe text) over 2 seeds into
/// `dir/speedup`; returns its stdout after checking that it succeeded.
fn speedup(dir: &std::path::Path, candidate: &str, target: &str) -> String {
    let base = write_recipe(dir, "base.yaml", TINY);
    let cand = write_recipe(dir, "cand.yaml", candidate);
    let out = dir.join("speedup");
    let o = run(&[
        "bench",
        "speedup",
        base.to_str().unwrap(),
        cand.to_str().unwrap(),
        "--target",
        target,
        "--seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

#[test]
fn speedup_reports_time_to_accuracy_of_both_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let s = speedup(
        dir.path(),
        &TINY.replace("name: tiny", "name: tiny_fast"),
        "0.01",
    );
    let out = dir.path().join("speedup");
    assert!(s.contains("tiny: reached by 2/2 seeds"), "{s}");
    assert!(
        s.contains("speedup of tiny_fast over tiny in training time:") && s.contains("95% CI"),
        "{s}"
    );
    let curves: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("curves.json")).unwrap()).unwrap();
    // The first evaluation (batch 4) already reaches 1%, and the threshold stopper ends the run.
    for c in curves.as_array().unwrap() {
        assert_eq!(c["steps_to_target"].as_u64(), Some(4), "{c}");
        assert_eq!(c["evals"].as_array().unwrap().len(), 1);
        // Training time and evaluation time apart.
        assert!(c["eval_seconds_to_target"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["train_time"].as_bool().unwrap(), "{c}");
    }
    assert!(out.join("time_to_accuracy.png").is_file());
    // Every evaluation logs the run's wall time, its evaluation share and the rest (training).
    let metrics = std::fs::read_to_string(out.join("tiny/seed3/metrics.jsonl")).unwrap();
    let eval = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("eval/accuracy").is_some())
        .unwrap();
    let f = |k: &str| {
        eval[k]
            .as_f64()
            .unwrap_or_else(|| panic!("no {k} in {eval}"))
    };
    assert!((f("time/train_sec") + f("time/eval_sec") - f("time/fit_sec")).abs() < 1e-9);
    assert!(
        f("time/eval_sec") > 0.0 && f("time/train_sec") > 0.0,
        "{eval}"
    );
}

#[test]
fn speedup_counts_seeds_that_never_reach_the_target() {
    let dir = tempfile::tempdir().unwrap();
    // LR 0 never learns: it does not reach 99%, and is shown, not averaged away.
    let frozen = TINY
        .replace("name: tiny", "name: frozen")
        .replace("lr: 0.05", "lr: 0");
    let s = speedup(dir.path(), &frozen, "0.99");
    assert!(
        s.contains("frozen: reached by 0/2 seeds") && s.contains("never reached it: seed 3, 4"),
        "{s}"
    );
    assert!(s.contains("speedup: undefined"), "{s}");
}
