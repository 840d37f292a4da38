//! Nothing lost, nothing silently wrong: a run folder is locked while a process trains in it,
//! every check passes before anything in it changes, a finished run is never overwritten by
//! accident, hyperparameters that cannot train are refused by `show` and `run` alike, and a run
//! that diverges stops with an error instead of writing NaN weights.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// TINY with a checkpoint every 4 batches, keeping two.
fn with_checkpoints() -> String {
    format!("{TINY}callbacks:\n  - {{name: checkpoint, interval: 4ba, keep_last: 2}}\n")
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// A clean failure (exit 2, no panic); returns stderr.
fn fails(o: &std::process::Output) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected a clean error:\n{e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Every file under `dir` with its bytes, to show that a refused command changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with(".recipe.lock") {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_resume_that_fails_its_checks_changes_nothing_in_the_run_folder() {
    // Case 1: a checkpoint of another model, with --force, used to cut metrics.jsonl, replace
    // recipe.yaml and set aside later checkpoints before failing.
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "r.yaml", &with_checkpoints());
    let run_dir = dir.path().join("run");
    ok(&train(&recipe, &run_dir, &[]));
    let before = snapshot(&run_dir);
    let other = write_recipe(
        dir.path(),
        "other.yaml",
        &with_checkpoints().replace("channels: [4, 8]", "channels: [8, 16]"),
    );
    let ckpt = run_dir.join("checkpoints/ep0-ba4.ckpt");
    let o = run(&[
        "run",
        other.to_str().unwrap(),
        "-q",
        "--resume",
        ckpt.to_str().unwrap(),
        "--force",
    ]);
    let e = fails(&o);
    assert!(e.contains("cannot resume") && e.contains("shape"), "{e}");
    assert_eq!(snapshot(&run_dir), before, "the run folder changed");
}

#[test]
fn export_never_replaces_its_checkpoint_or_an_existing_file_unasked() {
    // Case 2.
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "r.yaml", &with_checkpoints());
    let run_dir = dir.path().join("run");
    ok(&train(&recipe, &run_dir, &[]));
    let ckpt = run_dir.join("checkpoints/ep0-ba4.ckpt");
    let bytes = std::fs::read(&ckpt).unwrap();
    let e = fails(&run(&[
        "export",
        ckpt.to_str().unwrap(),
        "--to",
        ckpt.to_str().unwrap(),
    ]));
    assert!(e.contains("is the checkpoint being exported"), "{e}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), bytes);
    let to = dir.path().join("weights.safetensors");
    std::fs::write(&to, b"keep me").unwrap();
    let e = fails(&run(&[
        "export",
        ckpt.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]));
    assert!(e.contains("exists") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(&to).unwrap(), b"keep me");
    ok(&run(&[
        "export",
        ckpt.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
        "--overwrite",
    ]));
    assert_ne!(std::fs::read(&to).unwrap(), b"keep me");
}

#[test]
fn a_finished_run_folder_is_refused_unless_resumed_or_overwritten() {
    // Case 3: a second run into a finished --run-dir overwrote its files and left the old
    // checkpoints beside the new ones.
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "r.yaml", &with_checkpoints());
    let run_dir = dir.path().join("run");
    ok(&train(&recipe, &run_dir, &["--set", "max_duration=12ba"]));
    let before = snapshot(&run_dir);
    let e = fails(&train(&recipe, &run_dir, &[]));
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(snapshot(&run_dir), before, "the refused run changed files");
    ok(&train(&recipe, &run_dir, &["--overwrite"]));
    // Only the new run's checkpoints (batches 4 and 8, keep_last 2), none of the 12-batch run's.
    let names: Vec<String> = recipe_engine::checkpoint::list(&run_dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ep1-ba8.ckpt", "ep0-ba4.ckpt"]);
    // --overwrite is for a new run only.
    let o = train(&recipe, &run_dir, &["--overwrite", "--resume", "latest"]);
    assert!(!o.status.success());
}

#[test]
fn a_run_folder_is_locked_while_a_process_trains_in_it() {
    // Case 4: two runs into one folder interleaved metrics.jsonl; a resume of a running run was
    // not noticed.
    let dir = tempfile::tempdir().unwrap();
    let long = TINY.replace("max_duration: 8ba", "max_duration: 100000ba")
        + "callbacks:\n  - {name: checkpoint, interval: 2ba, keep_last: 2}\n";
    let recipe = write_recipe(dir.path(), "r.yaml", &long);
    let run_dir = dir.path().join("run");
    let mut child = spawn(&recipe, &run_dir, &[]);
    wait_for("a checkpoint", || {
        !recipe_engine::checkpoint::list(&run_dir).is_empty()
    });
    let pid = child.id().to_string();
    let e = fails(&train(&recipe, &run_dir, &["--overwrite"]));
    assert!(e.contains("in use") && e.contains(&pid), "{e}");
    let e = fails(&train(&recipe, &run_dir, &["--resume", "latest"]));
    assert!(e.contains("in use") && e.contains(&pid), "{e}");
    // SIGKILL: the lock goes with the process; a new run may take the folder.
    child.kill().unwrap();
    child.wait().unwrap();
    let short = write_recipe(dir.path(), "short.yaml", TINY);
    ok(&train(&short, &run_dir, &["--overwrite"]));
}

#[test]
fn hyperparameters_that_cannot_train_are_refused_by_show_and_run() {
    // Cases 5 and 6: accepted, then trained to NaN (exit 0); `show` accepted what `run` refused.
    let cases: &[(&str, &str)] = &[
        ("optimizer.momentum=.nan", "optimizer.momentum"),
        ("optimizer.weight_decay=.inf", "optimizer.weight_decay"),
        ("optimizer.momentum=1e308", "optimizer.momentum"),
        ("optimizer.lr=1e30", "optimizer.lr"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("optimizer.lr=.nan", "optimizer.lr"),
        ("model.channels=[]", "model"),
        ("device=tpu", "device"),
        ("schedule.t_warmup=1e308ep", "schedule.t_warmup"),
        ("eval_interval=0ep", "eval_interval"),
        (
            "device_train_microbatch_size=0",
            "device_train_microbatch_size",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let with_ls = format!("{TINY}algorithms:\n  - {{name: label_smoothing, smoothing: 1.5}}\n");
    let bad_ls = write_recipe(dir.path(), "ls.yaml", &with_ls);
    let recipe = write_recipe(dir.path(), "r.yaml", TINY);
    let runs = dir.path().join("runs");
    let mut all: Vec<(Vec<&str>, &str, &Path)> = cases
        .iter()
        .map(|(set, key)| (vec!["--set", *set], *key, recipe.as_path()))
        .collect();
    all.push((vec![], "algorithms[0].smoothing", bad_ls.as_path()));
    let ckpt_zero = format!("{TINY}callbacks:\n  - {{name: checkpoint, interval: 0ba}}\n");
    let ckpt_zero = write_recipe(dir.path(), "ck.yaml", &ckpt_zero);
    all.push((vec![], "callbacks[0].interval", ckpt_zero.as_path()));
    for (sets, key, file) in &all {
        let mut show = vec!["show", file.to_str().unwrap()];
        show.extend(sets);
        let e = fails(&run(&show));
        assert!(e.contains(&format!("key `{key}")), "show {sets:?}: {e}");
        let runs_set = format!("run_dir={}", runs.display());
        let mut r = vec!["run", file.to_str().unwrap(), "-q"];
        r.extend(sets);
        r.extend(["--set", runs_set.as_str()]);
        let e = fails(&run(&r));
        assert!(e.contains(&format!("key `{key}")), "run {sets:?}: {e}");
        // Case 8: no run folder is left behind by a refused run.
        assert!(
            !runs.exists() || std::fs::read_dir(&runs).unwrap().next().is_none(),
            "run {sets:?} left a run folder"
        );
    }
    // The refusal names where the value came from.
    let e = fails(&run(&["show", bad_ls.to_str().unwrap()]));
    assert!(e.contains("ls.yaml:"), "{e}");
}

#[test]
fn a_diverging_run_stops_with_an_error_and_writes_no_nan_weights() {
    // Case 5: training to NaN exited 0. An MLP (no batch norm) at LR 10 diverges in a few steps.
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}callbacks:\n  - {{name: checkpoint, interval: 2ba, keep_last: 0}}\n",
        TINY.replace(
            "model:\n  name: small_cnn\n  channels: [4, 8]",
            "model: {name: mlp}"
        )
        .replace("lr: 0.05", "lr: 10")
        .replace("max_duration: 8ba", "max_duration: 40ba")
    );
    let recipe = write_recipe(dir.path(), "r.yaml", &text);
    let run_dir = dir.path().join("run");
    let e = fails(&train(&recipe, &run_dir, &[]));
    assert!(e.contains("non-finite") && e.contains("at step"), "{e}");
    assert!(e.contains("last good checkpoint"), "{e}");
    assert!(!run_dir.join("model.safetensors").exists());
    // Every checkpoint that was written holds finite weights.
    for p in recipe_engine::checkpoint::list(&run_dir) {
        let c = recipe_engine::checkpoint::Checkpoint::read(
            &p,
            &recipe_engine::candle_core::Device::Cpu,
        )
        .unwrap();
        for (n, t) in c.model_tensors() {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}: {n}", p.display());
        }
    }
}

#[test]
fn messages_name_the_right_file_and_say_what_to_do() {
    // Case 9.
    let dir = tempfile::tempdir().unwrap();
    // A recipe that is not UTF-8: line and byte offset.
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, b"name: x\nseed: 3\nmodel: \xff\n").unwrap();
    let e = fails(&run(&["show", p.to_str().unwrap()]));
    assert!(e.contains("bad.yaml:3:8") && e.contains("UTF-8"), "{e}");
    // A seed too large for any whole number.
    let p = write_recipe(
        dir.path(),
        "seed.yaml",
        &TINY.replace("seed: 3", "seed: 99999999999999999999999"),
    );
    let e = fails(&run(&["show", p.to_str().unwrap()]));
    assert!(e.contains("seed.yaml:2") && e.contains("too large"), "{e}");
    assert!(!e.contains("u128"), "{e}");
    // A data root that is a file.
    let root = write_recipe(dir.path(), "not_a_folder", "x");
    let fm = TINY.replace(
        "name: fashion_mnist_mini",
        &format!("name: fashion_mnist\n  root: {}", root.display()),
    );
    let p = write_recipe(dir.path(), "fm.yaml", &fm);
    let e = fails(&train(&p, &dir.path().join("run"), &[]));
    assert!(e.contains("is a file, not a folder"), "{e}");
    // An out-of-range label names the labels file.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_idx_fixture(&data, 32, 16);
    let labels = data.join("train-labels-idx1-ubyte.gz");
    let mut raw = Vec::new();
    {
        use std::io::Read;
        flate2::read::GzDecoder::new(std::fs::File::open(&labels).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
    }
    raw[8 + 5] = 12;
    {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(&labels).unwrap(),
            flate2::Compression::fast(),
        );
        e.write_all(&raw).unwrap();
        e.finish().unwrap();
    }
    let fm = TINY
        .replace(
            "name: fashion_mnist_mini",
            &format!("name: fashion_mnist\n  root: {}", data.display()),
        )
        .replace("train_subset: 64", "train_subset: 32")
        .replace("eval_subset: 64", "eval_subset: 16");
    let p = write_recipe(dir.path(), "labels.yaml", &fm);
    let e = fails(&train(&p, &dir.path().join("run2"), &[]));
    assert!(
        e.contains("label 12 of sample 5") && e.contains("train-labels-idx1-ubyte"),
        "{e}"
    );
    // No colour codes in a log that is not a terminal.
    let p = write_recipe(dir.path(), "r.yaml", TINY);
    let rd = dir.path().join("run3");
    ok(&train(&p, &rd, &[]));
    let o = train(&p, &rd, &["--overwrite"]);
    let e = stderr(&o);
    assert!(e.contains("WARN") && !e.contains('\u{1b}'), "{e:?}");
    // The final weights are as readable as every other file of the run.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(rd.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("model.safetensors"), mode("metrics.jsonl"));
    }
}

#[test]
fn a_checkpoint_that_cannot_be_written_says_the_previous_one_is_intact() {
    // Case 9: a full disk (here: a folder where the file must go) said nothing of the last
    // good checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{TINY}callbacks:\n  - {{name: checkpoint, interval: 2ba, keep_last: 0}}\n");
    let recipe = write_recipe(dir.path(), "r.yaml", &text);
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(run_dir.join("checkpoints/ep0-ba4.ckpt")).unwrap();
    let e = fails(&train(&recipe, &run_dir, &[]));
    assert!(e.contains("cannot write the checkpoint"), "{e}");
    assert!(
        e.contains("ep0-ba2.ckpt is intact") && e.contains("--resume"),
        "{e}"
    );
    recipe_engine::checkpoint::Checkpoint::read(
        &run_dir.join("checkpoints/ep0-ba2.ckpt"),
        &recipe_engine::candle_core::Device::Cpu,
    )
    .unwrap();
}
