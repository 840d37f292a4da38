//! Real images through the `recipe` binary: folders of JPEG and PNG files that the tests encode
//! themselves (several sizes and aspect ratios, grey and RGB), the ImageNet recipe end to end,
//! batches independent of the worker count, exact resume mid-epoch, and a clear error for each
//! kind of bad folder.

mod common;
use common::{checkpoint_at, run, stderr, train, write_recipe};
use recipe_engine::data::image::{encode_jpeg, encode_png, Image};
use std::path::{Path, PathBuf};

const CLASSES: [&str; 3] = ["ant", "bee", "cat"];

/// A picture of class `k`: a colour ramp whose direction and tint depend on the class, with the
/// sample's own offset, of any size.
fn picture(k: usize, i: usize, w: usize, h: usize, channels: usize) -> Image {
    let mut data = Vec::with_capacity(w * h * channels);
    for y in 0..h {
        for x in 0..w {
            let t = match k {
                0 => x * 255 / w,
                1 => y * 255 / h,
                _ => (x + y) * 255 / (w + h),
            };
            for c in 0..channels {
                data.push(((t + i * 13 + c * 40 * (k + 1)) % 256) as u8);
            }
        }
    }
    Image::new(w, h, channels, data)
}

/// Writes `root/<split>/<class>/` folders: per class `n` files cycling through JPEG and PNG,
/// RGB and grey, landscape, portrait and square sizes, one with an upper-case extension.
fn write_split(root: &Path, split: &str, n: usize) {
    let sizes = [(48, 36), (30, 52), (40, 40), (64, 24)];
    for (k, class) in CLASSES.iter().enumerate() {
        let dir = root.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let (w, h) = sizes[(i + k) % sizes.len()];
            let channels = if i % 3 == 2 { 1 } else { 3 };
            let img = picture(k, i, w, h, channels);
            let (bytes, ext) = match i % 4 {
                0 | 1 => (encode_jpeg(&img, 90.0).unwrap(), "jpg"),
                2 => (encode_png(&img).unwrap(), "png"),
                _ => (encode_jpeg(&img, 75.0).unwrap(), "JPEG"),
            };
            std::fs::write(dir.join(format!("{class}_{i:03}.{ext}")), bytes).unwrap();
        }
        // Not an image by its extension: ignored, as torchvision's ImageFolder does.
        std::fs::write(dir.join("notes.txt"), "labelled by hand").unwrap();
    }
}

fn folder(dir: &Path) -> PathBuf {
    let root = dir.join("images");
    write_split(&root, "train", 8);
    write_split(&root, "val", 3);
    root
}

fn imagenet_recipe() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/recipes/resnet50_imagenet.yaml"
    )
}

/// A small recipe on an image folder: 24 training images in batches of 4 (6 per epoch).
fn small(root: &Path) -> String {
    format!(
        "\
name: folder
seed: 5
max_duration: 8ba
eval_interval: 4ba
data:
  name: image_folder
  root: {}
  batch_size: 4
  eval_batch_size: 5
  train_transforms: [{{random_resized_crop: {{size: 24}}}}, random_horizontal_flip]
  eval_transforms: [{{resize: 28}}, {{center_crop: 24}}]
model:
  name: small_cnn
  channels: [4, 8]
optimizer:
  name: sgd
  lr: 0.05
  momentum: 0.9
callbacks:
  - name: checkpoint
    interval: 1ba
    keep_last: 0
",
        root.display()
    )
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

fn weights(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("model.safetensors")).unwrap()
}

#[test]
fn the_imagenet_recipe_trains_on_a_folder_of_jpegs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = folder(dir.path());
    let rd = dir.path().join("run");
    let root_set = format!("data.root={}", root.display());
    let o = run(&[
        "run",
        imagenet_recipe(),
        "-q",
        "--scale",
        "0.5",
        "--run-dir",
        rd.to_str().unwrap(),
        "--set",
        &root_set,
        "--set",
        "model.depth=18",
        "--set",
        "max_duration=6ba",
        "--set",
        "data.batch_size=8",
        "--set",
        "device_train_microbatch_size=4",
        "--set",
        "data.eval_batch_size=4",
        "--set",
        "data.train_transforms=[{random_resized_crop: {size: 32}}, random_horizontal_flip]",
        "--set",
        "data.eval_transforms=[{resize: 36}, {center_crop: 32}]",
        "--set",
        "schedule.t_warmup=2ba",
    ]);
    ok(&o);
    assert_eq!(
        std::fs::read_to_string(rd.join("classes.txt")).unwrap(),
        "ant\nbee\ncat\n"
    );
    assert!(rd.join("model.safetensors").is_file());
    let log = std::fs::read_to_string(rd.join("metrics.jsonl"));
    // The recipe has no json logger: the evaluation reaches the console summary instead.
    let out = format!("{}{}", common::stdout(&o), stderr(&o));
    assert!(
        log.map(|l| l.contains("eval/accuracy")).unwrap_or(false) || out.contains("accuracy"),
        "{out}"
    );
}

#[test]
fn progressive_resizing_decodes_small_batches_in_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let root = folder(dir.path());
    let text = small(&root).replace(
        "callbacks:",
        "algorithms:\n  - {name: progressive_resizing, initial_scale: 0.5, delay: 0.5dur, finetune: 0.25dur, size_increment: 4}\ncallbacks:\n  - json_logger",
    );
    let recipe = write_recipe(dir.path(), "pr.yaml", &text);
    let rd = dir.path().join("run");
    ok(&train(&recipe, &rd, &[]));
    let sizes: Vec<f64> = std::fs::read_to_string(rd.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["progressive_resizing/size"].as_f64()
        })
        .collect();
    assert_eq!(sizes.first(), Some(&12.0), "{sizes:?}");
    assert_eq!(sizes.last(), Some(&24.0), "{sizes:?}");
}

#[test]
fn batches_do_not_depend_on_workers_and_resume_mid_epoch_is_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let root = folder(dir.path());
    let recipe = write_recipe(dir.path(), "r.yaml", &small(&root));
    let one = dir.path().join("one");
    ok(&train(&recipe, &one, &["--set", "data.workers=1"]));
    let three = dir.path().join("three");
    ok(&train(&recipe, &three, &["--set", "data.workers=3"]));
    assert!(
        weights(&one) == weights(&three),
        "the worker count changed the weights"
    );

    // Batch 3 is mid-epoch (6 batches per epoch), batch 7 is in the second epoch.
    resumes_bitwise(&recipe, &one, &[3, 7]);

    // The same run on a folder whose classes changed is refused, naming the difference.
    std::fs::rename(root.join("train/cat"), root.join("train/cow")).unwrap();
    std::fs::rename(root.join("val/cat"), root.join("val/cow")).unwrap();
    let o = run(&[
        "run",
        recipe.to_str().unwrap(),
        "-q",
        "--run-dir",
        dir.path().join("changed").to_str().unwrap(),
        "--resume",
        first_checkpoint(&one).to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("classes differ") && e.contains("`cow`") && e.contains("`cat`"),
        "{e}"
    );
}

/// RandAugment and AugMix on RGB (and grey, converted) JPEG and PNG files: the batches do not
/// depend on the number of loader threads, a resumed run is bitwise the uninterrupted one, and
/// the augmentations change what is trained on.
#[test]
fn randaugment_and_augmix_on_a_folder_do_not_depend_on_workers_and_resume_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let root = folder(dir.path());
    let plain = write_recipe(dir.path(), "plain.yaml", &small(&root));
    let text = small(&root).replace(
        "callbacks:",
        "algorithms:\n  - {name: randaugment}\n  - {name: augmix}\ncallbacks:",
    );
    let recipe = write_recipe(dir.path(), "aug.yaml", &text);
    let one = dir.path().join("one");
    ok(&train(&recipe, &one, &["--set", "data.workers=1"]));
    let four = dir.path().join("four");
    ok(&train(&recipe, &four, &["--set", "data.workers=4"]));
    assert!(
        weights(&one) == weights(&four),
        "the worker count changed the weights"
    );
    let unaugmented = dir.path().join("plain");
    ok(&train(&plain, &unaugmented, &["--set", "data.workers=1"]));
    assert!(weights(&one) != weights(&unaugmented));
    resumes_bitwise(&recipe, &one, &[3]);
}

/// Resumes `recipe` from `whole`'s checkpoint at each of `batches`, in a new run folder, and
/// checks that it ends with `whole`'s weights, bit for bit.
fn resumes_bitwise(recipe: &Path, whole: &Path, batches: &[u64]) {
    for &b in batches {
        let again = whole.with_file_name(format!("again{b}"));
        ok(&run(&[
            "run",
            recipe.to_str().unwrap(),
            "-q",
            "--run-dir",
            again.to_str().unwrap(),
            "--resume",
            checkpoint_at(whole, b).to_str().unwrap(),
        ]));
        assert!(weights(&again) == weights(whole), "resumed at batch {b}");
    }
}

fn first_checkpoint(run_dir: &Path) -> PathBuf {
    let mut all: Vec<PathBuf> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    all.sort();
    all.remove(0)
}

/// Writes `n_shards` tar shards of `per` samples (`<key>.jpg` + `<key>.cls`) named
/// `<prefix>-000.tar`, ..., as WebDataset writes them.
fn write_shards(dir: &Path, prefix: &str, n_shards: usize, per: usize) {
    for s in 0..n_shards {
        let mut b = tar::Builder::new(
            std::fs::File::create(dir.join(format!("{prefix}-{s:03}.tar"))).unwrap(),
        );
        for i in 0..per {
            let k = (s * per + i) % CLASSES.len();
            let img = picture(k, s * per + i, 40 + 4 * i, 32, 3);
            let key = format!("sample{:06}", s * per + i);
            for (name, bytes) in [
                (format!("{key}.jpg"), encode_jpeg(&img, 90.0).unwrap()),
                (format!("{key}.cls"), k.to_string().into_bytes()),
            ] {
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, &name, &bytes[..]).unwrap();
            }
        }
        b.finish().unwrap();
    }
}

#[test]
fn tar_shards_stream_through_a_shuffle_buffer_and_resume_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path(), "train", 3, 8);
    write_shards(dir.path(), "val", 1, 5);
    let text = small(Path::new("unused"))
        .replace(
            "  name: image_folder\n  root: unused\n",
            &format!(
                "  name: tar_shards\n  shards: {0}/train-{{000..002}}.tar\n  eval_shards: {0}/val-000.tar\n  shuffle_buffer: 5\n",
                dir.path().display()
            ),
        );
    assert!(text.contains("tar_shards"), "{text}");
    let recipe = write_recipe(dir.path(), "r.yaml", &text);
    let whole = dir.path().join("whole");
    ok(&train(&recipe, &whole, &[]));
    resumes_bitwise(&recipe, &whole, &[3, 7]);
    // A truncated shard is named.
    let p = dir.path().join("train-001.tar");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let o = train(&recipe, &dir.path().join("broken"), &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("train-001.tar"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// Runs the small recipe on a folder broken by `damage`; returns the outcome and its stderr.
fn run_broken(damage: impl Fn(&Path), extra: &[&str]) -> (bool, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = folder(dir.path());
    damage(&root);
    let recipe = write_recipe(dir.path(), "r.yaml", &small(&root));
    let rd = dir.path().join("run");
    let o = train(&recipe, &rd, extra);
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "{e}");
    let kept = dir.keep();
    (o.status.success(), e, kept)
}

#[test]
fn each_kind_of_bad_folder_gets_an_error_that_names_it() {
    let truncate = |root: &Path| {
        let p = root.join("train/bee/bee_000.jpg");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    };
    let (ok, e, d) = run_broken(truncate, &[]);
    assert!(
        !ok && e.contains("bee_000.jpg") && e.contains("truncated"),
        "{e}"
    );
    assert!(e.contains("on_bad_image"), "{e}");
    std::fs::remove_dir_all(d).ok();

    let fake = |root: &Path| std::fs::write(root.join("train/ant/ant_001.jpg"), "<html>").unwrap();
    let (ok, e, d) = run_broken(fake, &[]);
    assert!(
        !ok && e.contains("ant_001.jpg") && e.contains("neither a JPEG nor a PNG"),
        "{e}"
    );
    std::fs::remove_dir_all(d).ok();

    // With on_bad_image: skip the run trains, leaves the file out and counts it.
    let (ok, e, d) = run_broken(
        fake,
        &[
            "--set",
            "data.on_bad_image=skip",
            "--set",
            "callbacks=[json_logger]",
        ],
    );
    assert!(ok, "{e}");
    let log = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert!(log.contains("\"data/skipped_images\""), "{log}");
    std::fs::remove_dir_all(d).ok();

    let empty = |root: &Path| std::fs::create_dir_all(root.join("train/dog")).unwrap();
    let (ok, e, d) = run_broken(empty, &[]);
    assert!(
        !ok && e.contains("train/dog") && e.contains("no JPEG or PNG"),
        "{e}"
    );
    std::fs::remove_dir_all(d).ok();

    let stray = |root: &Path| {
        std::fs::create_dir_all(root.join("val/eel")).unwrap();
        std::fs::copy(root.join("val/ant/ant_000.jpg"), root.join("val/eel/e.jpg")).unwrap();
    };
    let (ok, e, d) = run_broken(stray, &[]);
    assert!(
        !ok && e.contains("val/eel") && e.contains("not among the training split"),
        "{e}"
    );
    std::fs::remove_dir_all(d).ok();

    // ImageNet's validation images as distributed: one flat folder.
    let flat = |root: &Path| {
        for class in CLASSES {
            let dir = root.join("val").join(class);
            for f in std::fs::read_dir(&dir).unwrap().flatten() {
                std::fs::rename(f.path(), root.join("val").join(f.file_name())).unwrap();
            }
            std::fs::remove_dir(dir).unwrap();
        }
    };
    let (ok, e, d) = run_broken(flat, &[]);
    assert!(
        !ok && e.contains("directly in this folder") && e.contains("devkit"),
        "{e}"
    );
    std::fs::remove_dir_all(d).ok();

    let (ok, e, d) = run_broken(|root| std::fs::remove_dir_all(root).unwrap(), &[]);
    assert!(
        !ok && e.contains("does not exist") && e.contains("data.root"),
        "{e}"
    );
    assert!(!d.join("run").exists(), "a refused run leaves no folder");
    std::fs::remove_dir_all(d).ok();

    // Variable-size images with transforms that give no single size.
    let (ok, e, d) = run_broken(|_| {}, &["--set", "data.eval_transforms=[{resize: 28}]"]);
    assert!(
        !ok && e.contains("data.eval_transforms") && e.contains("center_crop"),
        "{e}"
    );
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn bench_data_reports_pipeline_and_decoder_rates_on_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = folder(dir.path());
    let train = root.join("train");
    let base = [
        "bench",
        "data",
        "--images",
        train.to_str().unwrap(),
        "--batch",
        "4",
        "--batches",
        "2",
        "--json",
    ];
    for extra in [
        &["--crop", "16"][..],
        &["--crop", "16", "--no-reduced-decode"],
        &["--decode-only"],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = run(&args);
        ok(&o);
        let line = common::stdout(&o);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert!(v["images_per_sec"].as_f64().unwrap() > 0.0, "{line}");
        assert_eq!(v["images"].as_u64(), Some(8), "{line}");
    }
    // A folder too small for the batches asked is explained, not a panic.
    let o = run(&[
        "bench",
        "data",
        "--images",
        train.to_str().unwrap(),
        "--batch",
        "64",
    ]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("holds 24 images"), "{e}");
}
