//! Checkpoints and resume through the `recipe` binary: exact resume at random steps, signals,
//! SIGKILL in the middle of a write, recipe mismatches, damaged files, export.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;

/// Every algorithm and every callback that ships, on a 3-epoch run of 4 batches each, with
/// evaluations that do not line up with epochs and checkpoints at every batch and every epoch.
const FULL: &str = "\
name: full
seed: 11
max_duration: 12ba
eval_interval: 3ba
data:
  name: fashion_mnist_mini
  batch_size: 16
  train_subset: 64
  eval_subset: 32
  augment: {crop_padding: 2, hflip: true}
model:
  name: resnet_cifar
  depth: 8
  width: 0.25
optimizer:
  name: adamw
  lr: 0.003
  weight_decay: 0.01
schedule:
  name: cosine
  t_warmup: 2ba
algorithms:
  - {name: label_smoothing, smoothing: 0.1}
  - {name: progressive_resizing, initial_scale: 0.5, delay: 2ba, finetune: 3ba}
  - {name: autolrs, min_lr: 0.001, max_lr: 0.01, tau: 2ba, tau_max: 4ba, trial_fraction: 0.5, candidates: 2}
  - {name: gradient_clipping, clipping_type: adaptive, clipping_threshold: 0.5}
  - {name: ema, half_life: 3ba, ema_start: 2ba}
  - {name: cutmix, alpha: 1.0}
  - {name: mixup, alpha: 0.2}
  - {name: cutout, length: 0.25}
  - {name: selective_backprop, start: 0.25dur, end: 0.75dur, keep: 0.5}
  - {name: blurpool, min_channels: 4}
  - {name: squeeze_excite, min_channels: 8, latent_channels: 0.5}
  - {name: ghost_batchnorm, ghost_batch_size: 8}
  - weight_standardization
  - {name: stochastic_depth, stochastic_method: sample, drop_rate: 0.3, drop_warmup: 0.25dur}
  - {name: layer_freezing, freeze_start: 0.5}
  - {name: sam, interval: 2}
  - channels_last
  - {name: colout, p_row: 0.1, p_col: 0.1, stop: 10ba}
  - {name: swa, swa_start: 3ba, swa_end: 10ba, update_interval: 1ep, schedule_swa_lr: true, swa_lr: 0.001, anneal_steps: 2, anneal_strategy: cos}
  - {name: randaugment}
  - {name: augmix}
callbacks:
  - {name: checkpoint, interval: 1ba, keep_last: 0}
  - {name: checkpoint, interval: 1ep, folder: epochs, keep_last: 2}
  - {name: early_stopper, monitor: eval/loss, patience: 1dur}
  - {name: threshold_stopper, monitor: eval/accuracy, threshold: 1.01}
  - nan_monitor
  - {name: optimizer_monitor, per_layer: true}
  - runtime_estimator
  - {name: memory_monitor, interval: 2ba}
  - lr_monitor
  - speed_monitor
  - csv_logger
  - {name: budgeted_convergence, interval: 0.5dur, subset: 16}
";

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

fn weights(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("model.safetensors")).unwrap()
}

/// (batch, event) -> train/loss and eval/accuracy of each record, the values a user plots.
fn curves(run_dir: &Path) -> BTreeMap<(u64, String), (Option<f64>, Option<f64>)> {
    let mut out = BTreeMap::new();
    for l in std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let key = (
            v["batch"].as_u64().unwrap(),
            v["event"].as_str().unwrap().to_string(),
        );
        assert!(!out.contains_key(&key), "record {key:?} logged twice");
        out.insert(key, (v["train/loss"].as_f64(), v["eval/accuracy"].as_f64()));
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn resumed_runs_end_bitwise_identical_to_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "full.yaml", FULL);
    let whole = dir.path().join("whole");
    ok(&train(&recipe, &whole, &[]));
    let reference = weights(&whole);
    let reference_curves = curves(&whole);
    // keep_last: 2 of the epoch checkpoints.
    let mut kept: Vec<String> = std::fs::read_dir(whole.join("epochs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["ep2-ba8.ckpt", "ep3-ba12.ckpt"]);

    // A random step, and the boundaries that are easy to get wrong: the last batch of an epoch
    // (before its EPOCH_END) and an epoch checkpoint (after it).
    let random = 1
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
            % 11);
    // Batch 12 is the last step: its checkpoint comes before the last epoch's end and the final
    // evaluation's log line.
    let mut cases: Vec<PathBuf> = [random, 4, 5, 12]
        .iter()
        .map(|&b| checkpoint_at(&whole, b))
        .collect();
    cases.push(whole.join("epochs/ep2-ba8.ckpt"));
    for (i, ckpt) in cases.iter().enumerate() {
        // Resume inside a copy of the run folder, as after a crash: the logs are truncated to the
        // checkpoint and continued.
        let copy = dir.path().join(format!("copy{i}"));
        copy_dir(&whole, &copy);
        std::fs::remove_file(copy.join("model.safetensors")).unwrap();
        let rel = ckpt.strip_prefix(&whole).unwrap();
        let o = run(&[
            "run",
            recipe.to_str().unwrap(),
            "-q",
            "--resume",
            copy.join(rel).to_str().unwrap(),
        ]);
        ok(&o);
        assert!(stderr(&o).contains("resuming full at"), "{}", stderr(&o));
        assert!(
            weights(&copy) == reference,
            "resuming from {} (random step {random}) gave other weights",
            rel.display()
        );
        assert_eq!(
            curves(&copy),
            reference_curves,
            "resuming from {}: the logged curves differ",
            rel.display()
        );
    }
}

#[test]
fn autolrs_with_sgd_resumes_in_the_middle_of_its_search() {
    // SGD's state has tensors and no values: the snapshot must still come back from a checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let text = FULL.replace(
        "  name: adamw\n  lr: 0.003\n  weight_decay: 0.01",
        "  name: sgd\n  lr: 0.01\n  momentum: 0.9",
    );
    let recipe = write_recipe(dir.path(), "sgd.yaml", &text);
    let whole = dir.path().join("whole");
    ok(&train(&recipe, &whole, &[]));
    // Batch 1: inside the first stage's search (trials of 1 step); batch 6: inside the second's.
    for b in [1, 6] {
        let run_dir = dir.path().join(format!("from{b}"));
        let o = train(
            &recipe,
            &run_dir,
            &["--resume", checkpoint_at(&whole, b).to_str().unwrap()],
        );
        ok(&o);
        assert!(weights(&run_dir) == weights(&whole), "resumed at {b}");
    }
}

#[test]
fn a_run_stopped_early_stays_stopped_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace("max_duration: 8ba", "max_duration: 40ba")
        + "callbacks:\n  - {name: early_stopper, monitor: train/loss, patience: 3ba, min_delta: 100}\n  - {name: checkpoint, interval: 1ba, keep_last: 0}\n";
    let recipe = write_recipe(dir.path(), "stop.yaml", &text);
    let whole = dir.path().join("whole");
    let o = train(&recipe, &whole, &[]);
    ok(&o);
    assert!(stderr(&o).contains("4 steps"), "{}", stderr(&o));
    let o = train(
        &recipe,
        &dir.path().join("again"),
        &["--resume", checkpoint_at(&whole, 4).to_str().unwrap()],
    );
    ok(&o);
    let e = stderr(&o);
    assert!(e.contains("4 steps") && e.contains("stopped early"), "{e}");
}

#[test]
fn the_csv_log_has_one_row_per_step_and_a_column_per_metric() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "full.yaml", FULL);
    let out = dir.path().join("run");
    ok(&train(&recipe, &out, &[]));
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[..2], &["batch", "epoch"]);
    for col in [
        "train/loss",
        "eval/accuracy",
        "lr",
        "l2_norm/grad/global",
        "l2_norm/param/fc.weight",
        "l2_norm/optimizer/exp_avg",
        "memory/rss_mb",
        "time/remaining_estimate_sec",
        "train/epoch_loss",
    ] {
        assert!(header.contains(&col), "no column {col} in {header:?}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // Row 0 holds what was measured before the first step (budgeted_convergence at FIT_START).
    assert_eq!(rows[0][0], "0");
    let conv = header
        .iter()
        .position(|h| *h == "convergence/full_grad_norm")
        .unwrap();
    assert!(!rows[0][conv].is_empty());
    let rows = &rows[1..];
    assert_eq!(rows.len(), 12, "one row per step");
    let loss = header.iter().position(|h| *h == "train/loss").unwrap();
    let acc = header.iter().position(|h| *h == "eval/accuracy").unwrap();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), header.len());
        assert_eq!(r[0], (i + 1).to_string());
        assert!(r[loss].parse::<f64>().unwrap() > 0.0);
        assert_eq!(!r[acc].is_empty(), (i + 1) % 3 == 0, "eval every 3 batches");
    }
}

fn signal(child: &Child, sig: &str) {
    let s = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

fn logged_batches(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|t| t.matches("\"batch_end\"").count())
        .unwrap_or(0)
}

#[test]
fn sigint_and_sigterm_checkpoint_and_the_resumed_run_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace("max_duration: 8ba", "max_duration: 400ba");
    let recipe = write_recipe(dir.path(), "long.yaml", &text);
    let whole = dir.path().join("whole");
    ok(&train(&recipe, &whole, &[]));
    for sig in ["-INT", "-TERM"] {
        let run_dir = dir.path().join(format!("run{sig}"));
        let child = spawn(&recipe, &run_dir, &[]);
        wait_for("a few steps", || logged_batches(&run_dir) >= 3);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(75), "{err}");
        let name = if sig == "-INT" { "SIGINT" } else { "SIGTERM" };
        assert!(err.contains(&format!("interrupted by {name}")), "{err}");
        assert!(err.contains("resume with: recipe run"), "{err}");
        assert!(!run_dir.join("model.safetensors").exists());
        let ckpts = recipe_engine::checkpoint::list(&run_dir);
        assert_eq!(ckpts.len(), 1, "{ckpts:?}");
        // The command it prints is the one to run.
        let cmd = err
            .lines()
            .find_map(|l| l.strip_prefix("resume with: recipe "))
            .unwrap();
        let args: Vec<&str> = cmd.split(' ').collect();
        ok(&run(&args));
        assert!(
            weights(&run_dir) == weights(&whole),
            "{sig}: weights differ"
        );
    }
}

#[test]
fn sigkill_during_checkpoint_writes_leaves_the_last_good_one_loadable() {
    let dir = tempfile::tempdir().unwrap();
    // A wide MLP: every checkpoint is ~130 MB, so most of the run is spent writing them.
    let text = TINY
        .replace("max_duration: 8ba", "max_duration: 30ba")
        .replace(
            "  name: small_cnn\n  channels: [4, 8]",
            "  name: mlp\n  hidden: [4096, 4096]",
        )
        + "callbacks:\n  - {name: checkpoint, interval: 1ba, keep_last: 2}\n";
    let recipe = write_recipe(dir.path(), "wide.yaml", &text);
    let run_dir = dir.path().join("run");
    let mut child = spawn(&recipe, &run_dir, &[]);
    wait_for("the first checkpoint", || {
        !recipe_engine::checkpoint::list(&run_dir).is_empty()
    });
    // Kill while a temporary file is being written.
    let partial = || {
        std::fs::read_dir(run_dir.join("checkpoints"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
    };
    wait_for("a checkpoint write in progress", partial);
    child.kill().unwrap();
    child.wait().unwrap();
    let left = recipe_engine::checkpoint::list(&run_dir);
    assert!(!left.is_empty());
    for p in &left {
        recipe_engine::checkpoint::Checkpoint::read(p, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("a checkpoint left by SIGKILL does not load: {e}"));
    }
    let o = run(&[
        "run",
        recipe.to_str().unwrap(),
        "-q",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--resume",
        "latest",
    ]);
    ok(&o);
    assert!(run_dir.join("model.safetensors").is_file());
    assert!(
        !partial(),
        "the partial file of the killed process is cleaned up"
    );
}

#[test]
fn resuming_under_another_recipe_or_ratio_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "tiny.yaml",
        &format!("{TINY}callbacks: [checkpoint]\n"),
    );
    let run_dir = dir.path().join("run");
    ok(&train(&recipe, &run_dir, &["--set", "max_duration=4ba"]));
    let ckpt = run_dir.join("checkpoints/ep1-ba4.ckpt");
    let c = ckpt.to_str().unwrap();
    let r = recipe.to_str().unwrap();
    let o = run(&[
        "run",
        r,
        "-q",
        "--set",
        "max_duration=4ba",
        "--set",
        "optimizer.lr=0.2",
        "--resume",
        c,
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("ep1-ba4.ckpt") && e.contains("optimizer.lr: 0.05 -> 0.2"),
        "{e}"
    );
    assert!(e.contains("--force"), "{e}");
    let o = run(&[
        "run",
        r,
        "-q",
        "--set",
        "max_duration=4ba",
        "--scale",
        "2",
        "--resume",
        c,
    ]);
    let e = stderr(&o);
    assert!(e.contains("scale ratio: 1 -> 2"), "{e}");
    // Forced: it goes on under the new ratio, from batch 4 to 8.
    let o = run(&[
        "run",
        r,
        "-q",
        "--set",
        "max_duration=4ba",
        "--scale",
        "2",
        "--resume",
        c,
        "--force",
    ]);
    ok(&o);
    assert!(stderr(&o).contains("8 steps"), "{}", stderr(&o));
    assert!(run_dir.join("recipe.before-resume-ba4.yaml").is_file());
}

#[test]
fn damaged_checkpoints_are_named_and_latest_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "tiny.yaml",
        &format!("{TINY}callbacks: [{{name: checkpoint, interval: 4ba}}]\n"),
    );
    let run_dir = dir.path().join("run");
    ok(&train(&recipe, &run_dir, &[]));
    let newest = run_dir.join("checkpoints/ep1-ba8.ckpt");
    let bytes = std::fs::read(&newest).unwrap();
    let r = recipe.to_str().unwrap();
    let resume = |p: &Path| {
        run(&[
            "run",
            r,
            "-q",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--resume",
            p.to_str().unwrap(),
        ])
    };
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let e = stderr(&resume(&newest));
    assert!(
        e.contains("corrupt checkpoint") && e.contains("ep1-ba8.ckpt"),
        "{e}"
    );
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    std::fs::write(&newest, &flipped).unwrap();
    let e = stderr(&resume(&newest));
    assert!(e.contains("checksum mismatch"), "{e}");
    let e = stderr(&resume(&run_dir.join("model.safetensors")));
    assert!(e.contains("not a recipe checkpoint"), "{e}");
    let e = stderr(&resume(&run_dir.join("checkpoints/nope.ckpt")));
    assert!(e.contains("does not exist"), "{e}");
    // `latest` falls back to the older good checkpoint, with a warning naming the bad one.
    let o = resume(Path::new("latest"));
    ok(&o);
    let e = stderr(&o);
    assert!(
        e.contains("ep0-ba4.ckpt") && e.contains("skipped a damaged checkpoint"),
        "{e}"
    );
}

#[test]
fn export_writes_torch_names_with_num_batches_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "tiny.yaml",
        &format!("{TINY}callbacks: [checkpoint]\n"),
    );
    let run_dir = dir.path().join("run");
    ok(&train(&recipe, &run_dir, &[]));
    let out = dir.path().join("export.safetensors");
    let o = run(&[
        "export",
        run_dir.to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    let cpu = candle_core::Device::Cpu;
    let exported = candle_core::safetensors::load(&out, &cpu).unwrap();
    let trained = candle_core::safetensors::load(run_dir.join("model.safetensors"), &cpu).unwrap();
    for (name, t) in &trained {
        let e = &exported[name];
        assert_eq!(
            e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    let n = &exported["features.0.bn.num_batches_tracked"];
    assert_eq!(n.dtype(), candle_core::DType::I64);
    assert_eq!(n.to_scalar::<i64>().unwrap(), 8);
    assert_eq!(exported.len(), trained.len() + 2, "two batch norms");
}

#[test]
fn stoppers_and_the_nan_monitor_end_runs_with_their_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let long = TINY.replace("max_duration: 8ba", "max_duration: 40ba");
    let r = write_recipe(
        dir.path(),
        "early.yaml",
        &format!("{long}callbacks: [{{name: early_stopper, monitor: train/loss, patience: 3ba, min_delta: 100}}]\n"),
    );
    let o = train(&r, &dir.path().join("early"), &[]);
    ok(&o);
    let e = stderr(&o);
    assert!(
        e.contains("4 steps") && e.contains("early stopping: train/loss"),
        "{e}"
    );
    let r = write_recipe(
        dir.path(),
        "threshold.yaml",
        &format!("{long}callbacks: [{{name: threshold_stopper, monitor: eval/accuracy, threshold: 0.0}}]\n"),
    );
    let o = train(&r, &dir.path().join("threshold"), &[]);
    ok(&o);
    assert!(
        stderr(&o).contains("4 steps") && stderr(&o).contains("eval/accuracy reached"),
        "{}",
        stderr(&o)
    );
    let r = write_recipe(
        dir.path(),
        "nan.yaml",
        &format!("{long}callbacks: [nan_monitor, {{name: checkpoint, interval: 1ba}}]\n"),
    );
    // An MLP (no batch norm) under SGD at LR 10 diverges within a few steps.
    let o = train(
        &r,
        &dir.path().join("nan"),
        &[
            "--set",
            "model={name: mlp}",
            "--set",
            "optimizer={name: sgd, lr: 10, momentum: 0.9}",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("non-finite") && e.contains("at step"), "{e}");
    assert!(e.contains("the last good checkpoint is"), "{e}");
    let good = e
        .split("the last good checkpoint is ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    recipe_engine::checkpoint::Checkpoint::read(Path::new(good), &candle_core::Device::Cpu)
        .unwrap();
}

#[test]
fn patience_scales_with_the_run_and_intervals_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let r = write_recipe(
        dir.path(),
        "full.yaml",
        &FULL.replace("patience: 1dur", "patience: 6ba"),
    );
    let o = run(&["show", r.to_str().unwrap(), "--scale", "0.5"]);
    ok(&o);
    let out = stdout(&o);
    let row = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no row {key} in\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("callbacks[2].patience")[2..6],
        ["scaled", "6ba", "3ba", "3"]
    );
    assert_eq!(row("callbacks[0].interval")[2..5], ["fixed", "1ba", "1ba"]);
}
