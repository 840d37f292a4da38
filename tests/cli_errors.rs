//! Bad input never panics: each case exits with status 2 and a message that says what is wrong,
//! where (file, line, key), and what to do.

mod common;
use common::*;

/// Runs `recipe show` on a recipe text, expects failure, returns stderr.
fn show_fails(text: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write_recipe(dir.path(), "bad.yaml", text);
    let mut args = vec!["show", p.to_str().unwrap()];
    args.extend(extra);
    let o = run(&args);
    let e = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected a clean error, got {:?}\n{e}",
        o.status
    );
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn malformed_yaml_gives_line_and_column() {
    let e = show_fails(
        "name: x\nmax_duration: 3ep\ndata: {name: fashion_mnist_mini\nmodel: mlp\n",
        &[],
    );
    assert!(
        e.contains("bad.yaml:") && e.contains("malformed YAML"),
        "{e}"
    );
    assert!(e.contains(":4:") || e.contains(":3:"), "{e}");
}

#[test]
fn unknown_top_level_key_names_the_nearest_one() {
    let e = show_fails(&TINY.replace("max_duration:", "max_durration:"), &[]);
    assert!(
        e.contains("unknown key `max_durration`") && e.contains("did you mean `max_duration`"),
        "{e}"
    );
    assert!(e.contains("bad.yaml:3"), "{e}");
}

#[test]
fn unknown_key_in_a_plugin_block_names_file_line_and_nearest_key() {
    let e = show_fails(&TINY.replace("  momentum: 0.9", "  momentun: 0.9"), &[]);
    assert!(
        e.contains("optimizer.momentun") && e.contains("did you mean `momentum`"),
        "{e}"
    );
    assert!(e.contains("bad.yaml:16"), "{e}");
}

#[test]
fn unknown_key_in_the_data_block_suggests_loader_keys_too() {
    let e = show_fails(&TINY.replace("  batch_size: 16", "  batchsize: 16"), &[]);
    assert!(
        e.contains("data.batchsize") && e.contains("did you mean `batch_size`"),
        "{e}"
    );
}

#[test]
fn unknown_plugin_name_lists_the_registered_ones() {
    let e = show_fails(&TINY.replace("name: cosine", "name: cosin"), &[]);
    assert!(
        e.contains("unknown schedule `cosin`") && e.contains("did you mean `cosine`"),
        "{e}"
    );
    assert!(e.contains("linear") && e.contains("rex"), "{e}");
    assert!(e.contains("bad.yaml:18"), "{e}");
}

#[test]
fn bad_time_strings_are_explained() {
    for bad in ["5", "5 epochs", "-1ep", "1.5dur", "ep"] {
        let e = show_fails(
            &TINY.replace("t_warmup: 2ba", &format!("t_warmup: {bad}")),
            &[],
        );
        assert!(e.contains("schedule.t_warmup"), "{bad}: {e}");
        assert!(
            e.contains("bad time") || e.contains("no unit"),
            "{bad}: {e}"
        );
    }
    let e = show_fails(
        &TINY.replace("max_duration: 8ba", "max_duration: 0.5dur"),
        &[],
    );
    assert!(e.contains("max_duration") && e.contains("fraction"), "{e}");
}

#[test]
fn a_scale_that_is_not_a_positive_number_is_refused() {
    for s in ["0", "-0.5", "nan"] {
        let arg = format!("--scale={s}");
        let e = show_fails(TINY, &[&arg]);
        assert!(e.contains("not a positive number"), "{s}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write_recipe(dir.path(), "r.yaml", TINY);
    let o = run(&["show", p.to_str().unwrap(), "--scale", "half"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--scale"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_overrides_say_how_to_write_them() {
    let e = show_fails(TINY, &["--set", "optimizer.lr"]);
    assert!(
        e.contains("--set optimizer.lr") && e.contains("key.path=value"),
        "{e}"
    );
    let e = show_fails(TINY, &["--set", "optimizer.lr=abc"]);
    assert!(
        e.contains("--set optimizer.lr=abc") && e.contains("optimizer.lr"),
        "{e}"
    );
    let e = show_fails(TINY, &["--set", "algorithms.label_smoothing.smoothing=0.2"]);
    assert!(e.contains("algorithms"), "{e}");
}

#[test]
fn missing_recipe_file_is_named() {
    let o = run(&["show", "/nonexistent/recipe.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/recipe.yaml") && stderr(&o).contains("does not exist")
    );
}

#[test]
fn missing_data_folder_says_to_install_the_package_or_set_root() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace(
        "name: fashion_mnist_mini",
        "name: fashion_mnist\n  root: /nonexistent/fmnist",
    );
    let p = write_recipe(dir.path(), "r.yaml", &text);
    let o = run(&[
        "run",
        p.to_str().unwrap(),
        "-q",
        "--run-dir",
        dir.path().join("run").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("/nonexistent/fmnist")
            && e.contains("apt-get install dataset-fashion-mnist")
            && e.contains("data.root"),
        "{e}"
    );
}

#[test]
fn corrupt_and_truncated_idx_files_are_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fm");
    std::fs::create_dir(&data).unwrap();
    write_idx_fixture(&data, 64, 32);
    let text = TINY.replace(
        "name: fashion_mnist_mini",
        &format!("name: fashion_mnist\n  root: {}", data.display()),
    );
    let p = write_recipe(dir.path(), "r.yaml", &text);
    let run_it = || {
        run(&[
            "run",
            p.to_str().unwrap(),
            "-q",
            "--run-dir",
            dir.path().join("run").to_str().unwrap(),
        ])
    };
    assert!(run_it().status.success(), "{}", stderr(&run_it()));
    // Truncate the gzip stream of the training images.
    let f = data.join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = stderr(&run_it());
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("corrupt"),
        "{e}"
    );
    // A raw file whose header promises more than it holds.
    std::fs::remove_file(&f).unwrap();
    let mut raw = vec![0u8, 0, 8, 3];
    for d in [64u32, 28, 28] {
        raw.extend(d.to_be_bytes());
    }
    raw.extend(vec![0u8; 100]);
    std::fs::write(data.join("train-images-idx3-ubyte"), &raw).unwrap();
    let e = stderr(&run_it());
    assert!(
        e.contains("truncated") && e.contains("train-images-idx3-ubyte"),
        "{e}"
    );
}

#[test]
fn an_unwritable_run_folder_is_reported_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_recipe(dir.path(), "r.yaml", TINY);
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let o = run(&[
        "run",
        p.to_str().unwrap(),
        "-q",
        "--run-dir",
        blocker.join("sub").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not writable") && stderr(&o).contains("--run-dir"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn imagenet_recipe_without_its_folder_fails_clearly_and_runs_on_synthetic_data_when_asked() {
    let recipe = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/recipes/resnet50_imagenet.yaml"
    );
    let dir = tempfile::tempdir().unwrap();
    let rd = dir.path().join("run");
    let o = run(&["run", recipe, "-q", "--run-dir", rd.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("/data/imagenet") && e.contains("does not exist") && e.contains("data.root"),
        "{e}"
    );
    assert!(!rd.exists(), "a refused run leaves no folder");
    // Synthetic stand-in, shrunk so the test stays fast: 64x64 crops, 2 steps of batch 2.
    let o = run(&[
        "run",
        recipe,
        "-q",
        "--run-dir",
        rd.to_str().unwrap(),
        "--set",
        "data.synthetic=true",
        "--set",
        "data.train_transforms=[{random_resized_crop: {size: 64}}, random_horizontal_flip]",
        "--set",
        "data.eval_transforms=[{resize: 72}, {center_crop: 64}]",
        "--set",
        "device_train_microbatch_size=2",
        "--set",
        "data.batch_size=2",
        "--set",
        "data.eval_subset=2",
        "--set",
        "max_duration=2ba",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(rd.join("model.safetensors").is_file());
}

/// Runs `recipe run` on TINY with overrides, expects a clean failure, returns stderr.
fn run_fails(sets: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write_recipe(dir.path(), "r.yaml", TINY);
    let rd = dir.path().join("run");
    let mut args = vec![
        "run",
        p.to_str().unwrap(),
        "-q",
        "--run-dir",
        rd.to_str().unwrap(),
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = run(&args);
    let e = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{sets:?}: expected a clean error, got {:?}\n{e}",
        o.status
    );
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn out_of_range_values_are_refused_before_training() {
    let cases: &[(&[&str], &str)] = &[
        (&["data.prefetch=1000000000000"], "data.prefetch"),
        (
            &["data.augment.crop_padding=4611686018427387904"],
            "crop_padding",
        ),
        (&["data.batch_size=0"], "data.batch_size"),
        (&["data.batch_size=65"], "fewer than one batch"),
        (
            &[
                "data.name=synthetic",
                "data.num_classes=0",
                "data.synthetic=true",
            ],
            "at least one class",
        ),
        (
            &["data.name=synthetic", "data.shape=[0, 8, 8]"],
            "non-empty shape",
        ),
        (&["max_duration=1e300ep"], "more than a run can take"),
        (&["optimizer.lr=-1"], "optimizer.lr"),
        (
            &["optimizer.nesterov=true", "optimizer.momentum=0"],
            "Nesterov",
        ),
        (
            &["schedule.name=polynomial", "schedule.power=0"],
            "schedule.power",
        ),
        (&["model.channels=[]"], "model.channels"),
        (&["device=tpu"], "unknown device"),
        (&["seed=-3"], "seed"),
    ];
    for (sets, want) in cases {
        let e = run_fails(sets);
        assert!(e.contains(want), "{sets:?}: {e}");
    }
}

#[test]
fn a_huge_scale_is_refused_not_run_forever() {
    for s in ["1e300", "1e308"] {
        let e = show_fails(TINY, &["--scale", s]);
        assert!(e.contains("too large") && !e.contains("inf"), "{s}: {e}");
    }
    // Just below the ratio's bound, the resolved run is still checked.
    let e = show_fails(&TINY.replace("8ba", "1e12ba"), &["--scale", "1e6"]);
    assert!(e.contains("more than a run can take"), "{e}");
}

/// Every shipped recipe is valid as written (`recipe show` checks it without its data), and runs a
/// few steps on synthetic data of its dataset's shape (the ImageNet one has its own test above).
#[test]
fn every_shipped_recipe_is_valid_and_runs_on_synthetic_data() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    let tmp = tempfile::tempdir().unwrap();
    for p in names {
        let file = p.to_str().unwrap();
        let o = run(&["show", file]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        if file.ends_with("resnet50_imagenet.yaml") {
            continue;
        }
        let rd = tmp.path().join(p.file_stem().unwrap());
        let o = run(&[
            "run",
            file,
            "-q",
            "--run-dir",
            rd.to_str().unwrap(),
            "--set",
            "data.synthetic=true",
            "--set",
            "max_duration=2ba",
            "--set",
            "data.batch_size=8",
            "--set",
            "data.train_subset=16",
            "--set",
            "data.eval_subset=8",
        ]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        assert!(rd.join("model.safetensors").is_file(), "{file}");
    }
}

#[test]
fn bad_augmentation_settings_name_their_key() {
    for (block, key, what) in [
        (
            "{name: randaugment, severity: 12}",
            "algorithms[0].severity",
            "not in [0, 10]",
        ),
        (
            "{name: randaugment, depth: -2}",
            "algorithms[0].depth",
            "negative",
        ),
        ("{name: augmix, depth: 0}", "algorithms[0].depth", "-1"),
        (
            "{name: augmix, width: 0}",
            "algorithms[0].width",
            "at least 1",
        ),
        (
            "{name: augmix, alpha: 0}",
            "algorithms[0].alpha",
            "positive",
        ),
        (
            "{name: augmix, augmentation_set: most}",
            "augmentation_set",
            "safe",
        ),
    ] {
        let e = show_fails(&format!("{TINY}algorithms:\n  - {block}\n"), &[]);
        assert!(e.contains(key) && e.contains(what), "{block}: {e}");
    }
}

/// Under mpirun (Open MPI's rank variables set; a job of one here) a sweep is refused before it writes
/// anything: every rank would run and write the same cells.
#[test]
fn a_sweep_under_an_mpi_launcher_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_recipe(dir.path(), "tiny.yaml", TINY);
    let out = dir.path().join("sweep");
    let o = recipe_cmd()
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .args([
            "bench",
            "sweep",
            file.to_str().unwrap(),
            "--scales",
            "1",
            "--seeds",
            "1",
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("not under mpirun") && e.contains("--nproc"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
}
