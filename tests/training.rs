//! End-to-end training through the library: real files, real steps, real weights on disk.

mod common;
use common::fit as train;
use common::*;
use recipe::load::{load, RecipeArgs};
use recipe_engine::trainer::Trainer;
use std::path::Path;

#[test]
fn loss_falls_on_a_tiny_idx_fixture_and_weights_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fm");
    std::fs::create_dir(&data).unwrap();
    write_idx_fixture(&data, 512, 256);
    let text = format!(
        "name: fixture\nmax_duration: 48ba\neval_interval: 16ba\n\
         data: {{name: fashion_mnist, root: {}, batch_size: 32}}\n\
         model: {{name: small_cnn, channels: [16, 32]}}\n\
         optimizer: {{name: sgd, lr: 0.2, momentum: 0.9, nesterov: true}}\nschedule: {{name: linear, t_warmup: 4ba}}\n",
        data.display()
    );
    let (_, s) = train(dir.path(), &text, None, &[], "run");
    assert_eq!(s.batches, 48);
    assert_eq!(
        s.epochs_completed, 3,
        "512 samples / 32 = 16 batches per epoch"
    );
    let loss = metrics(&s.run_dir, "train/loss");
    assert_eq!(loss.len(), 48);
    let first: f64 = loss[..6].iter().sum::<f64>() / 6.0;
    let last: f64 = loss[42..].iter().sum::<f64>() / 6.0;
    assert!(last < 0.75 * first, "loss did not fall: {first} -> {last}");
    let acc = metrics(&s.run_dir, "eval/accuracy");
    assert_eq!(acc.len(), 3, "evaluated at 16, 32 and 48 batches");
    assert!(s.final_eval.unwrap().accuracy > 0.4, "{:?}", s.final_eval);
    assert!(s.run_dir.join("model.safetensors").is_file());
    assert!(s.run_dir.join("recipe.yaml").is_file());
    // The saved weights load back into the same architecture.
    let w = candle_core::safetensors::load(
        s.run_dir.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(w.contains_key("fc.weight") && w.contains_key("features.1.bn.running_var"));
}

#[test]
fn same_seed_same_weights_bitwise_and_another_seed_differs() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{TINY}algorithms:\n  - {{name: label_smoothing, smoothing: 0.1}}\n  - {{name: progressive_resizing, delay: 2ba, finetune: 2ba}}\ndata_augment_placeholder: 0\n")
        .replace("data_augment_placeholder: 0\n", "")
        .replace("  eval_subset: 64\n", "  eval_subset: 64\n  augment: {crop_padding: 2, hflip: true}\n");
    let (a, _) = train(dir.path(), &text, None, &[], "a");
    let (b, _) = train(dir.path(), &text, None, &[], "b");
    let (c, _) = train(dir.path(), &text, None, &["seed=4"], "c");
    let wa = a.state.model.params().flat_values().unwrap();
    let wb = b.state.model.params().flat_values().unwrap();
    let wc = c.state.model.params().flat_values().unwrap();
    assert!(
        wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "same seed, different weights"
    );
    assert_ne!(wa, wc, "another seed gave the same weights");
}

#[test]
fn scale_halves_the_run_and_the_schedule_follows() {
    let dir = tempfile::tempdir().unwrap();
    // 128 samples / 16 = 8 batches per epoch, so every time resolves to whole batches at both scales.
    let text = TINY
        .replace("max_duration: 8ba", "max_duration: 1ep")
        .replace("t_warmup: 2ba", "t_warmup: 0.25ep");
    let sets = &["callbacks=[lr_monitor]", "data.train_subset=128"];
    let (_, full) = train(dir.path(), &text, None, sets, "full");
    let (_, half) = train(dir.path(), &text, Some(0.5), sets, "half");
    assert_eq!(full.batches, 8);
    assert_eq!(half.batches, 4);
    let lr_full = metrics(&full.run_dir, "lr");
    let lr_half = metrics(&half.run_dir, "lr");
    // a_s(t) = a(t / s): the half run's step k has the full run's LR at step 2k.
    assert_eq!(lr_half.len(), 4);
    for (k, lr) in lr_half.iter().enumerate() {
        assert!(
            (lr - lr_full[2 * k]).abs() < 1e-12,
            "step {k}: {lr} vs {}",
            lr_full[2 * k]
        );
    }
    let saved = std::fs::read_to_string(half.run_dir.join("recipe.yaml")).unwrap();
    assert!(
        saved.contains("scale_schedule") && saved.contains("ratio: 0.5"),
        "the ratio is saved with the run: {saved}"
    );
}

#[test]
fn progressive_resizing_grows_the_images_and_label_smoothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{TINY}algorithms:\n  - {{name: label_smoothing, smoothing: 0.1}}\n  - {{name: progressive_resizing, initial_scale: 0.5, delay: 2ba, finetune: 2ba}}\n"
    );
    let (_, s) = train(dir.path(), &text, None, &[], "run");
    let sizes = metrics(&s.run_dir, "progressive_resizing/size");
    // max 8, delay 2, finetune 2: 0.5 until batch 2, then 0.625, 0.75, 0.875 (rounded to multiples of 4), then 1.
    assert_eq!(sizes, vec![16.0, 16.0, 16.0, 16.0, 20.0, 24.0, 28.0, 28.0]);
}

#[test]
fn progressive_resizing_refuses_a_fixed_size_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{TINY}algorithms:\n  - progressive_resizing\n")
        .replace("  name: small_cnn\n  channels: [4, 8]", "  name: mlp");
    let file = write_recipe(dir.path(), "r.yaml", &text);
    let recipe = load(
        &RecipeArgs {
            file,
            scale: None,
            sets: vec![],
        },
        &[],
        true,
    )
    .unwrap();
    let mut t = Trainer::new(&recipe, &dir.path().join("run")).unwrap();
    let e = t.fit().unwrap_err().to_string();
    assert!(
        e.contains("progressive_resizing") && e.contains("any input size"),
        "{e}"
    );
}

/// The real dataset, when Debian's package is installed (CI installs it): both splits load with
/// their true sizes and labels, and a few steps train on it.
#[test]
fn the_full_fashion_mnist_loads_from_the_debian_package_when_present() {
    let root = Path::new("/usr/share/datasets/fashion-mnist");
    if !root.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: apt-get install dataset-fashion-mnist to run this test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = TINY
        .replace("name: fashion_mnist_mini", "name: fashion_mnist")
        .replace("  train_subset: 64\n", "");
    let (t, s) = train(
        dir.path(),
        &text,
        None,
        &["max_duration=2ba", "data.eval_subset=100"],
        "run",
    );
    assert_eq!(t.state.clock.batches_per_epoch, 60_000 / 16);
    assert_eq!(s.final_eval.unwrap().samples, 100);
}

#[test]
fn budgeted_convergence_measures_the_full_training_gradient() {
    use recipe_callbacks::budgeted_convergence::measure;
    use recipe_engine::candle_core::{DType, Tensor};
    use recipe_engine::kernels::{cross_entropy, Targets};
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace(
        "  eval_subset: 64\n",
        "  eval_subset: 64\n  eval_batch_size: 24\n",
    );
    let text = format!(
        "{text}callbacks: [{{name: budgeted_convergence, interval: 0.5dur, subset: 40}}]\n"
    );
    let (t, s) = train(dir.path(), &text, None, &[], "run");
    let st = &t.state;
    // The same gradient, from one forward pass over all 64 training samples at once.
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for b in st.train_in_order.as_ref().unwrap().epoch(0, 0, &st.device) {
        let b = b.unwrap();
        xs.push(b.inputs);
        ys.push(b.labels);
    }
    let full = |n: usize| {
        let x = Tensor::cat(&xs, 0).unwrap().narrow(0, 0, n).unwrap();
        let y = Tensor::cat(&ys, 0).unwrap().narrow(0, 0, n).unwrap();
        let loss = cross_entropy(&st.model.forward(&x, false).unwrap(), &Targets::Hard(y)).unwrap();
        let grads = loss.backward().unwrap();
        let mut g2 = 0.0f64;
        for p in st.model.params().trainable() {
            let g = grads.get(p.var.as_tensor()).unwrap();
            g2 += g
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
        }
        (
            g2.sqrt(),
            loss.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
        )
    };
    for limit in [None, Some(40)] {
        let (g, l, w) = measure(st, limit).unwrap();
        let (g_ref, l_ref) = full(limit.unwrap_or(64));
        assert!(
            (g - g_ref).abs() / g_ref < 1e-4,
            "{limit:?}: {g} vs {g_ref}"
        );
        assert!(
            (l - l_ref).abs() / l_ref < 1e-5,
            "{limit:?}: {l} vs {l_ref}"
        );
        assert!(w > 0.0);
    }
    // Logged at the start, halfway and at the end.
    let g = metrics(&s.run_dir, "convergence/full_grad_norm");
    assert_eq!(g.len(), 3, "{g:?}");
}

#[test]
fn autolrs_searches_then_exploits_and_reports_its_search_steps() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace("max_duration: 8ba", "max_duration: 40ba")
        + "algorithms:\n  - {name: autolrs, min_lr: 0.001, max_lr: 0.1, tau: 4ba, tau_max: 8ba, trial_fraction: 0.5, candidates: 3}\n";
    let (_, s) = train(dir.path(), &text, None, &[], "run");
    assert_eq!(s.batches, 40, "trial steps count against the budget");
    let lr = metrics(&s.run_dir, "autolrs/lr");
    let search = metrics(&s.run_dir, "autolrs/search_steps");
    assert_eq!(lr.len(), 40);
    // Stage 0 (tau 4): 3 trials of 2 steps, then 4 steps at the best of them.
    assert_eq!(&search[..6], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let trials = [lr[0], lr[2], lr[4]];
    assert!(lr[1] == lr[0] && lr[3] == lr[2] && lr[5] == lr[4], "{lr:?}");
    assert!(
        trials.iter().all(|l| (0.001..=0.1).contains(l)),
        "{trials:?}"
    );
    assert!(
        trials[0] != trials[1] && trials[1] != trials[2],
        "{trials:?}"
    );
    assert!(
        trials.contains(&lr[6]) && lr[6..10].iter().all(|&l| l == lr[6]),
        "{lr:?}"
    );
    // Stage 1 (tau 8): 3 trials of 4 steps, 8 steps of exploitation; then no room to search.
    assert_eq!(search[10..22].last(), Some(&18.0));
    assert_eq!(
        *search.last().unwrap(),
        18.0,
        "search stops when it no longer fits"
    );
}

/// TINY with an MLP (no batch norm: microbatches then give the whole batch's gradient exactly).
fn tiny_mlp() -> String {
    TINY.replace(
        "model:\n  name: small_cnn\n  channels: [4, 8]",
        "model: {name: mlp}",
    )
}

/// Trains `text` in one pass ("whole") and in microbatches of 5 ("micro").
fn whole_and_microbatched(
    dir: &Path,
    text: &str,
) -> (
    (Trainer, recipe_engine::trainer::FitSummary),
    (Trainer, recipe_engine::trainer::FitSummary),
) {
    (
        train(dir, text, None, &[], "whole"),
        train(
            dir,
            text,
            None,
            &["device_train_microbatch_size=5"],
            "micro",
        ),
    )
}

/// Gradient accumulation (`device_train_microbatch_size`): microbatches whose scaled losses add
/// up to the batch's give the batch's gradient, so without batch norm the weights match the
/// one-pass run to float rounding, and label smoothing (which swaps each microbatch's targets)
/// keeps working. With batch norm each microbatch has its own statistics, as in PyTorch.
#[test]
fn microbatches_accumulate_the_gradient_of_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = format!(
        "{}algorithms:\n  - {{name: label_smoothing, smoothing: 0.1}}\n",
        tiny_mlp()
    );
    let ((whole, s1), (micro, s2)) = whole_and_microbatched(dir.path(), &mlp);
    assert_eq!(s1.batches, s2.batches, "times stay in whole batches");
    assert_same_weights_to_rounding(&whole, &micro);
    assert_ne!(
        whole.state.model.params().flat_values().unwrap(),
        micro.state.model.params().flat_values().unwrap(),
        "the microbatches did run apart"
    );
    let (l1, l2) = (s1.final_eval.unwrap().loss, s2.final_eval.unwrap().loss);
    assert!((l1 - l2).abs() < 1e-4 * l1, "{l1} {l2}");
    // A batch-norm model trains in microbatches too, and the recipe says so when shown.
    let (_, s) = train(
        dir.path(),
        TINY,
        None,
        &["device_train_microbatch_size=4"],
        "bn",
    );
    assert!(s.final_eval.unwrap().loss.is_finite());
    let shown = std::fs::read_to_string(dir.path().join("bn/recipe.yaml")).unwrap();
    assert!(shown.contains("device_train_microbatch_size: 4"), "{shown}");
}

/// AFTER_TRAIN_BATCH sees the whole batch's gradient before the step (as in Composer): gradient
/// clipping and the optimizer monitor act on the sum of the microbatches' gradients, so a run in
/// microbatches clips and reports like the one-pass run.
#[test]
fn clipping_and_gradient_norms_see_the_whole_batch_through_microbatches() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = format!(
        "{}algorithms:\n  - {{name: gradient_clipping, clipping_type: norm, clipping_threshold: 0.05}}\ncallbacks:\n  - json_logger\n  - optimizer_monitor\n",
        tiny_mlp()
    );
    let ((whole, _), (micro, _)) = whole_and_microbatched(dir.path(), &mlp);
    let (norms_a, norms_b) = (
        metrics(&dir.path().join("whole"), "gradient_clipping/grad_norm"),
        metrics(&dir.path().join("micro"), "gradient_clipping/grad_norm"),
    );
    assert_eq!(norms_a.len(), 8);
    // The threshold is below every step's norm: every step was clipped.
    assert!(norms_a.iter().all(|n| *n > 0.05), "{norms_a:?}");
    for (a, b) in norms_a.iter().zip(&norms_b) {
        assert!((a - b).abs() <= 1e-4 * a, "{norms_a:?} {norms_b:?}");
    }
    // The monitor reports the clipped gradient: the threshold.
    let monitored = metrics(&dir.path().join("micro"), "l2_norm/grad/global");
    assert!(
        monitored.iter().all(|n| (n - 0.05).abs() < 1e-4),
        "{monitored:?}"
    );
    assert_same_weights_to_rounding(&whole, &micro);
    // A bad threshold is refused with its key.
    let bad = mlp.replace("clipping_threshold: 0.05", "clipping_threshold: -1");
    let p = write_recipe(dir.path(), "bad.yaml", &bad);
    let o = run(&[
        "run",
        p.to_str().unwrap(),
        "-q",
        "--run-dir",
        dir.path().join("bad").to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("algorithms[0].clipping_threshold"),
        "{}",
        stderr(&o)
    );
}

/// EMA evaluates with, and ends on, the averaged weights: with a half-life far beyond the run the
/// average stays at the initial weights, so runs at different learning rates end (and evaluate)
/// alike, while without EMA they end apart.
#[test]
fn ema_evaluates_and_saves_the_averaged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = tiny_mlp();
    let with_ema = format!(
        "{mlp}algorithms:\n  - {{name: ema, half_life: 1000000000ba}}\ncallbacks:\n  - json_logger\n"
    );
    let run_at = |text: &str, lr: &str, name: &str| {
        let (t, s) = train(
            dir.path(),
            text,
            None,
            &[&format!("optimizer.lr={lr}")],
            name,
        );
        (
            t.state.model.params().flat_values().unwrap(),
            s.final_eval.unwrap().loss,
        )
    };
    let max_diff =
        |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let (a, la) = run_at(&with_ema, "0.05", "ema_a");
    let (b, lb) = run_at(&with_ema, "0.2", "ema_b");
    assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
    assert!((la - lb).abs() < 1e-5, "{la} {lb}");
    let (c, _) = run_at(&mlp, "0.05", "plain_a");
    let (d, _) = run_at(&mlp, "0.2", "plain_b");
    assert!(max_diff(&c, &d) > 1e-3);
    // Evaluation with the average: the same loss at every evaluation of both runs.
    let ea = metrics(&dir.path().join("ema_a"), "eval/loss");
    let eb = metrics(&dir.path().join("ema_b"), "eval/loss");
    assert_eq!(ea.len(), 2);
    assert!(
        ea.iter().chain(&eb).all(|l| (l - ea[0]).abs() < 1e-5),
        "{ea:?} {eb:?}"
    );
}

/// MixUp and CutMix train through microbatches and compose with label smoothing (which smooths
/// their mixed targets); each changes the training loss, and evaluation is untouched by them.
#[test]
fn mixup_and_cutmix_train_and_compose_with_label_smoothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("{TINY}algorithms:\n  - {{name: label_smoothing, smoothing: 0.1}}\n");
    let (_, plain) = train(dir.path(), &base, None, &[], "plain");
    for (name, block) in [
        ("mixup", "{name: mixup, alpha: 0.4}"),
        ("cutmix", "{name: cutmix}"),
    ] {
        let text = format!("{base}  - {block}\n");
        let (_, s) = train(
            dir.path(),
            &text,
            None,
            &["device_train_microbatch_size=8"],
            name,
        );
        let loss = metrics(&dir.path().join(name), "train/loss");
        let plain_loss = metrics(&dir.path().join("plain"), "train/loss");
        assert_eq!(loss.len(), plain_loss.len());
        assert!(loss.iter().all(|l| l.is_finite()));
        assert_ne!(loss, plain_loss, "{name} changed nothing");
        let e = s.final_eval.unwrap();
        assert!(e.loss.is_finite() && e.samples == plain.final_eval.unwrap().samples);
    }
}

/// RandAugment and AugMix augment the grey Fashion-MNIST pictures (read by the idx reader) in
/// the training loader: each changes the training loss, the same seed gives the same weights bit
/// for bit, and evaluation is untouched by them.
#[test]
fn randaugment_and_augmix_train_on_grey_pictures_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let (_, plain) = train(dir.path(), TINY, None, &[], "plain");
    let plain_loss = metrics(&dir.path().join("plain"), "train/loss");
    for (name, block) in [
        ("randaugment", "{name: randaugment}"),
        ("augmix", "{name: augmix}"),
        (
            "both",
            "{name: randaugment, depth: 1}\n  - {name: augmix, width: 2}",
        ),
    ] {
        let text = format!("{TINY}algorithms:\n  - {block}\n");
        let (a, s) = train(dir.path(), &text, None, &[], name);
        let (b, _) = train(dir.path(), &text, None, &[], &format!("{name}_again"));
        let wa = a.state.model.params().flat_values().unwrap();
        let wb = b.state.model.params().flat_values().unwrap();
        assert!(
            wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: same seed, different weights"
        );
        let loss = metrics(&dir.path().join(name), "train/loss");
        assert_eq!(loss.len(), plain_loss.len());
        assert!(loss.iter().all(|l| l.is_finite()));
        assert_ne!(loss, plain_loss, "{name} changed nothing");
        let e = s.final_eval.unwrap();
        assert!(e.loss.is_finite() && e.samples == plain.final_eval.as_ref().unwrap().samples);
    }
}

/// Selective backprop trains the selecting steps on `keep` of the batch (every second step with
/// `interrupt: 2`), within its window of the run.
#[test]
fn selective_backprop_trains_on_the_kept_share_inside_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{TINY}algorithms:\n  - {{name: selective_backprop, start: 0dur, end: 0.75dur, keep: 0.5, interrupt: 2}}\n"
    );
    let (_, s) = train(dir.path(), &text, None, &[], "sb");
    let kept = metrics(&dir.path().join("sb"), "selective_backprop/kept");
    // 8 batches of 16; the window is batches 0-5; batches 1, 3, 5 are interrupted.
    assert_eq!(kept, vec![8.0, 8.0, 8.0]);
    assert!(s.final_eval.unwrap().loss.is_finite());
}

#[test]
fn evaluation_logs_top5_beside_top1() {
    let dir = tempfile::tempdir().unwrap();
    let (_, s) = train(dir.path(), TINY, None, &[], "top5");
    let top1 = metrics(&dir.path().join("top5"), "eval/accuracy");
    let top5 = metrics(&dir.path().join("top5"), "eval/accuracy_top5");
    assert_eq!(top1.len(), top5.len());
    assert!(!top5.is_empty());
    for (a, b) in top1.iter().zip(&top5) {
        assert!(b >= a && *b <= 1.0, "top-1 {a}, top-5 {b}");
    }
    let e = s.final_eval.unwrap();
    assert_eq!(e.accuracy_top5, top5.last().copied());
}

/// Logs the LR the trainer holds at each EPOCH_END (a test-only callback).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochEndLrConfig {}

impl recipe_engine::TimeParams for EpochEndLrConfig {}

struct EpochEndLr;

impl recipe_engine::callback::CallbackConfig for EpochEndLrConfig {
    fn build(
        &self,
        _ctx: &recipe_engine::plugin::BindContext,
    ) -> recipe_engine::Result<Box<dyn recipe_engine::Callback>> {
        Ok(Box::new(EpochEndLr))
    }
}

impl recipe_engine::Callback for EpochEndLr {
    fn run_event(
        &mut self,
        event: recipe_engine::Event,
        state: &mut recipe_engine::State,
    ) -> recipe_engine::Result<()> {
        if event == recipe_engine::Event::EpochEnd {
            state.log("test/epoch_end_lr", state.lr);
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    EpochEndLrConfig,
    "test_epoch_end_lr",
    "Logs the LR at EPOCH_END (tests).",
    ""
);

/// A run resumed from the last batch of an epoch (before its EPOCH_END) shows that epoch's end
/// the LR its last batch trained with, as the uninterrupted run does: the checkpoint carries it.
#[test]
fn a_run_resumed_before_an_epoch_end_sees_the_last_batch_lr_there() {
    let dir = tempfile::tempdir().unwrap();
    // 64 samples / 16 = 4 batches per epoch, 8 batches; a linear schedule changes the LR every
    // batch.
    let text = TINY.replace("name: cosine", "name: linear")
        + "callbacks: [test_epoch_end_lr, {name: checkpoint, interval: 1ba, keep_last: 0}]\n";
    let (_, whole) = train(dir.path(), &text, None, &[], "whole");
    let want = metrics(&whole.run_dir, "test/epoch_end_lr");
    assert_eq!(want.len(), 2);
    let args = RecipeArgs {
        file: dir.path().join("whole.yaml"),
        scale: None,
        sets: vec![],
    };
    let recipe = load(&args, &["json_logger"], true).unwrap();
    let checkpoint = recipe_engine::checkpoint::Checkpoint::read(
        &checkpoint_at(&whole.run_dir, 4),
        &recipe_engine::candle_core::Device::Cpu,
    )
    .unwrap();
    let resume = recipe_engine::trainer::Resume {
        checkpoint,
        force: false,
    };
    let run = dir.path().join("resumed");
    let mut t = Trainer::resume(&recipe, &run, resume).unwrap();
    t.fit().unwrap();
    assert_eq!(metrics(&run, "test/epoch_end_lr"), want);
}
