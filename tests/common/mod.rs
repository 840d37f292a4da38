#![allow(dead_code)]
//! Helpers shared by the integration tests: run the `recipe` binary, write recipes and fixtures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn recipe_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recipe"));
    c.env_remove("RUST_LOG");
    c
}

pub fn run(args: &[&str]) -> Output {
    recipe_cmd()
        .args(args)
        .output()
        .expect("the recipe binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `recipe run RECIPE -q --run-dir RUN_DIR EXTRA...`, to completion.
pub fn train(recipe: &Path, run_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        recipe.to_str().unwrap(),
        "-q",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Trains the recipe `text` through the library (written to `dir/<run>.yaml`, run in
/// `dir/<run>`, with `--set` overrides and a scale), to completion.
pub fn fit(
    dir: &Path,
    text: &str,
    scale: Option<f64>,
    sets: &[&str],
    run: &str,
) -> (
    recipe_engine::trainer::Trainer,
    recipe_engine::trainer::FitSummary,
) {
    let file = write_recipe(dir, &format!("{run}.yaml"), text);
    let args = recipe::load::RecipeArgs {
        file,
        scale,
        sets: sets.iter().map(|s| s.to_string()).collect(),
    };
    let recipe = recipe::load::load(&args, &["json_logger"], true).unwrap();
    let mut t = recipe_engine::trainer::Trainer::new(&recipe, &dir.join(run)).unwrap();
    let s = t.fit().unwrap();
    (t, s)
}

/// Every value of `key` in a run folder's metrics.jsonl, in order.
pub fn metrics(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap()
                .get(key)
                .and_then(|v| v.as_f64())
        })
        .collect()
}

/// Asserts that two runs ended on the same weights to float rounding.
pub fn assert_same_weights_to_rounding(
    a: &recipe_engine::trainer::Trainer,
    b: &recipe_engine::trainer::Trainer,
) {
    let a = a.state.model.params().flat_values().unwrap();
    let b = b.state.model.params().flat_values().unwrap();
    assert_eq!(a.len(), b.len(), "the models differ in size");
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-5 * scale,
        "max difference {diff} (scale {scale})"
    );
}

/// Writes `text` as a recipe file in `dir`.
pub fn write_recipe(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A tiny recipe on the embedded mini set: 64 training and 64 eval samples, a 2-stage CNN.
pub const TINY: &str = "\
name: tiny
seed: 3
max_duration: 8ba
eval_interval: 4ba
data:
  name: fashion_mnist_mini
  batch_size: 16
  train_subset: 64
  eval_subset: 64
model:
  name: small_cnn
  channels: [4, 8]
optimizer:
  name: sgd
  lr: 0.05
  momentum: 0.9
schedule:
  name: cosine
  t_warmup: 2ba
";

/// Writes Fashion-MNIST-layout idx files (train: the first `n_train` mini images, t10k: the next
/// `n_eval`) into `dir`, gzipped, from the embedded copy in engine/data.
pub fn write_idx_fixture(dir: &Path, n_train: usize, n_eval: usize) {
    use flate2::read::GzDecoder;
    use std::io::{Read, Write};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/data");
    let read = |f: &str| {
        let mut v = Vec::new();
        GzDecoder::new(std::fs::File::open(root.join(f)).unwrap())
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    let images = read("t10k-images-idx3-ubyte.gz");
    let labels = read("t10k-labels-idx1-ubyte.gz");
    let write = |name: &str, header: &[u32], body: &[u8]| {
        let mut bytes = vec![0u8, 0, 8, header.len() as u8];
        for d in header {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(body);
        let f = std::fs::File::create(dir.join(name)).unwrap();
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        e.write_all(&bytes).unwrap();
        e.finish().unwrap();
    };
    let img = |a: usize, b: usize| &images[16 + a * 784..16 + b * 784];
    let lab = |a: usize, b: usize| &labels[8 + a..8 + b];
    write(
        "train-images-idx3-ubyte.gz",
        &[n_train as u32, 28, 28],
        img(0, n_train),
    );
    write(
        "train-labels-idx1-ubyte.gz",
        &[n_train as u32],
        lab(0, n_train),
    );
    write(
        "t10k-images-idx3-ubyte.gz",
        &[n_eval as u32, 28, 28],
        img(n_train, n_train + n_eval),
    );
    write(
        "t10k-labels-idx1-ubyte.gz",
        &[n_eval as u32],
        lab(n_train, n_train + n_eval),
    );
}

/// Starts `recipe run RECIPE -q --run-dir RUN_DIR EXTRA...` in the background (stderr piped).
pub fn spawn(recipe: &Path, run_dir: &Path, extra: &[&str]) -> Child {
    let mut args = vec![
        "run".to_string(),
        recipe.display().to_string(),
        "-q".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    recipe_cmd()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls `f` until it holds, for at most two minutes.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The checkpoint a run wrote at `batch` (`checkpoints/ep<E>-ba<batch>.ckpt`).
pub fn checkpoint_at(run_dir: &Path, batch: u64) -> PathBuf {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_str().unwrap().ends_with(&format!("-ba{batch}.ckpt")))
        .unwrap_or_else(|| panic!("no checkpoint at batch {batch} in {}", run_dir.display()))
}
