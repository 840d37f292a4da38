//! `precision: amp_bf16` on CPU: convolutions in bf16 with f32 sums (AVX512-BF16), recorded in
//! the model tree and its checkpoints, bitwise deterministic; the errors for what is not built.

mod common;
use common::*;

const RESNET: &str = "\
name: precision
seed: 5
max_duration: 6ba
eval_interval: 3ba
data:
  name: fashion_mnist_mini
  batch_size: 16
  train_subset: 48
  eval_subset: 32
model:
  name: resnet_cifar
  depth: 8
  width: 1
optimizer:
  name: sgd
  lr: 0.05
  momentum: 0.9
callbacks: [{name: checkpoint, interval: 3ba}]
";

fn weights(t: &recipe_engine::trainer::Trainer) -> Vec<u32> {
    let v = t.state.model.params().flat_values().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn amp_bf16_trains_bitwise_reproducibly_and_its_checkpoints_remember_it() {
    if !recipe_engine::kernels::bf16::available() {
        // the refusal on such a CPU is tested below
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bf16 = format!("{RESNET}precision: amp_bf16\n");
    let (a, sa) = fit(dir.path(), &bf16, None, &[], "a");
    let (b, _) = fit(dir.path(), &bf16, None, &[], "b");
    let (f, sf) = fit(dir.path(), RESNET, None, &[], "f");
    assert_eq!(weights(&a), weights(&b), "same seed, same bits");
    assert_ne!(
        weights(&a),
        weights(&f),
        "bf16 products are not the f32 ones"
    );
    // the same training to bf16's precision: evaluation losses within a few percent
    let (la, lf) = (sa.final_eval.unwrap().loss, sf.final_eval.unwrap().loss);
    assert!(
        (la - lf).abs() < 0.05 * lf.abs(),
        "bf16 {la} against f32 {lf}"
    );
    // `recipe show` lists the conversion; every convolution says bf16
    let file = write_recipe(dir.path(), "bf16.yaml", &bf16);
    let o = run(&["show", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = stdout(&o);
    assert!(
        shown.contains("precision amp_bf16: 9 Conv2d at conv1, layer1.0.conv1, "),
        "{shown}"
    );
    // a bf16 checkpoint does not resume as fp32 (nor the other way), even with --force
    let ckpt = checkpoint_at(&dir.path().join("a"), 3);
    let plain = write_recipe(dir.path(), "fp32.yaml", RESNET);
    let run_dir = dir.path().join("resumed");
    let o = train(
        &plain,
        &run_dir,
        &["--resume", ckpt.to_str().unwrap(), "--force"],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("bf16") && e.contains("precision"), "{e}");
    assert!(
        !run_dir.exists(),
        "nothing written before the checks passed"
    );
    // and resumes in its own precision
    let o = train(&file, &run_dir, &["--resume", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn precisions_that_cannot_run_here_are_refused_with_what_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("amp_bf8", "unknown precision `amp_bf8`"),
        ("amp_fp16", "amp_fp16 is a GPU precision"),
        ("[fp32]", "must be a name"),
    ];
    for (value, says) in cases {
        let file = write_recipe(
            dir.path(),
            "bad.yaml",
            &format!("{RESNET}precision: {value}\n"),
        );
        let o = run(&["show", file.to_str().unwrap()]);
        assert!(!o.status.success(), "{value} accepted");
        let e = stderr(&o);
        assert!(e.contains(says) && e.contains("precision"), "{value}: {e}");
        assert!(
            e.contains("bad.yaml:"),
            "the error names the file and line: {e}"
        );
    }
    let file = write_recipe(
        dir.path(),
        "bf16.yaml",
        &format!("{RESNET}precision: amp_bf16\n"),
    );
    let o = run(&["show", file.to_str().unwrap()]);
    if recipe_engine::kernels::bf16::available() {
        assert!(o.status.success(), "{}", stderr(&o));
    } else {
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains("AVX512-BF16"), "{e}");
    }
}
