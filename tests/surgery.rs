//! Module surgery: algorithms that rewrite the model's modules before training (BlurPool,
//! SqueezeExcite, GhostBatchNorm, WeightStandardization, StochasticDepth), the generic paths a
//! rewritten tree runs through, and what the checkpoint records of it.

mod common;
use common::*;
use recipe_engine::candle_core::{DType, Device, Tensor};
use recipe_engine::model::{Model, ModelConfig, Module, Param};
use recipe_engine::models::ResNetCifarConfig;
use recipe_engine::plugin::BindContext;
use recipe_engine::trainer::Trainer;

const RESNET: &str = "\
name: surgery
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
  width: 0.5
optimizer:
  name: sgd
  lr: 0.05
  momentum: 0.9
";

/// Delegates to the module it wraps: the parent no longer sees a plain layer, so the fused
/// kernels step aside for it.
struct Opaque(Box<dyn Module>);

impl Module for Opaque {
    fn kind(&self) -> &'static str {
        "Opaque"
    }
    fn forward(&self, x: &Tensor, train: bool) -> recipe_engine::Result<Tensor> {
        self.0.forward(x, train)
    }
    fn own_params(&self) -> Vec<Param> {
        self.0.own_params()
    }
}

fn resnet8() -> Box<dyn Model> {
    let ctx = BindContext::standalone(&Device::Cpu, [1, 12, 12], 10, 7);
    ResNetCifarConfig {
        depth: 8,
        width: 0.5,
        zero_init_residual: false,
    }
    .build(&ctx)
    .unwrap()
}

/// Loss, every gradient and every running statistic after one training forward and backward.
fn one_step(m: &dyn Model, x: &Tensor) -> Vec<Vec<f32>> {
    let y = m.forward(x, true).unwrap();
    let loss = (y.sqr().unwrap().mean_all().unwrap() + y.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let mut out = vec![loss.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
    for p in m.params().iter() {
        let v = match grads.get(p.var.as_tensor()) {
            Some(g) => g.clone(),
            None => p.var.as_tensor().clone(),
        };
        out.push(v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

/// The fused CPU kernels and the generic module calls compute the same function: a ResNet whose
/// every convolution and batch norm is hidden behind a wrapper gives the plain one's loss,
/// gradients and running statistics to float rounding.
#[test]
fn a_rewritten_tree_computes_what_the_fused_one_does() {
    let x = Tensor::randn(0f32, 1.0, (6, 1, 12, 12), &Device::Cpu).unwrap();
    let plain = resnet8();
    let mut hidden = resnet8();
    let net = hidden.network_mut().unwrap();
    let replaced = net
        .replace(
            "test",
            |_, m| matches!(m.kind(), "Conv2d" | "BatchNorm2d"),
            |_, m| Ok(Box::new(Opaque(m))),
        )
        .unwrap();
    // conv1/bn1 of the stem, 2 + 2 per block of three blocks, 2 projection shortcuts.
    assert_eq!(replaced.len(), 2 + 3 * 4 + 2 * 2, "{replaced:?}");
    assert!(replaced.contains(&"layer2.0.downsample.0".to_string()));
    assert_eq!(
        plain.params().iter().map(|p| &p.name).collect::<Vec<_>>(),
        hidden.params().iter().map(|p| &p.name).collect::<Vec<_>>(),
        "a wrapper keeps the parameters' names"
    );
    let a = one_step(plain.as_ref(), &x);
    let b = one_step(hidden.as_ref(), &x);
    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
        let scale = u.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        let diff = u.iter().zip(v).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "tensor {i}: max difference {diff} (scale {scale})"
        );
    }
    let record = net_records(hidden.as_ref());
    assert!(
        record.starts_with(&format!("test: {} Opaque at conv1, bn1, ", replaced.len())),
        "{record}"
    );
}

/// RESNET trained with `algos` (a YAML list) in `dir/name`.
fn with_algorithms(dir: &std::path::Path, algos: &str, name: &str) -> Trainer {
    fit(
        dir,
        &format!("{RESNET}algorithms: {algos}\n"),
        None,
        &[],
        name,
    )
    .0
}

/// The values of the parameter `name`.
fn value(t: &Trainer, name: &str) -> Vec<f32> {
    t.state
        .model
        .params()
        .get(name)
        .unwrap()
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn net_records(m: &dyn Model) -> String {
    m.network().unwrap().rewrites().join("\n")
}

fn names(t: &Trainer) -> Vec<String> {
    t.state
        .model
        .params()
        .iter()
        .map(|p| p.name.clone())
        .collect()
}

/// Each surgery algorithm trains end to end; the layers it keeps keep their names (and so load
/// into torchvision's model), new modules add names under the layer they extend, and the rest
/// of the model starts from the same values as without it.
#[test]
fn surgery_algorithms_train_and_keep_names_and_initial_values() {
    let dir = tempfile::tempdir().unwrap();
    let init = |algos: &str, run: &str| {
        let text = format!("{RESNET}algorithms: {algos}\n")
            .replace("max_duration: 6ba", "max_duration: 2ba");
        fit(dir.path(), &text, None, &[], run)
    };
    let (plain, _) = init("[]", "plain");
    // At LR 0 the trained weights stay their initial values: the layers the surgery kept start
    // bitwise where they start without it.
    let at_lr0 = |algos: &str, run: &str| {
        let text = format!("{RESNET}algorithms: {algos}\n");
        fit(
            dir.path(),
            &text,
            None,
            &["max_duration=1ba", "optimizer.lr=0.0"],
            run,
        )
        .0
    };
    let (p0, s0) = (
        at_lr0("[]", "plain0"),
        at_lr0("[{name: squeeze_excite, min_channels: 16}]", "se0"),
    );
    for p in p0.state.model.params().trainable() {
        assert_eq!(value(&p0, &p.name), value(&s0, &p.name), "{}", p.name);
    }
    let (se, s) = init(
        "[{name: squeeze_excite, min_channels: 16, latent_channels: 0.5}]",
        "se",
    );
    assert!(s.final_eval.is_some());
    let added: Vec<String> = names(&se)
        .into_iter()
        .filter(|n| !names(&plain).contains(n))
        .collect();
    // resnet_cifar width 0.5: stage 3 has 32 channels, stage 2 16; each conv of those stages and
    // the two projection shortcuts get an SE block.
    assert!(
        added.contains(&"layer3.0.conv1.se.fc1.weight".to_string()),
        "{added:?}"
    );
    assert!(
        added.contains(&"layer2.0.downsample.0.se.fc2.weight".to_string()),
        "{added:?}"
    );
    assert!(!added.iter().any(|n| n.starts_with("layer1.")), "{added:?}");
    assert!(added.iter().all(|n| n.contains(".se.")), "{added:?}");

    for algos in [
        "[{name: blurpool, min_channels: 4}]",
        "[{name: ghost_batchnorm, ghost_batch_size: 4}]",
        "[weight_standardization]",
        "[{name: stochastic_depth, stochastic_method: sample, drop_rate: 0.5}]",
        "[{name: stochastic_depth, drop_rate: 0.5, drop_warmup: 0.5dur}]",
        "[{name: blurpool, min_channels: 4}, {name: squeeze_excite, min_channels: 8}, ghost_batchnorm, weight_standardization, stochastic_depth]",
    ] {
        let run = format!("r{}", algos.len());
        let (t, s) = init(algos, &run);
        assert!(s.final_eval.unwrap().loss.is_finite(), "{algos}");
        for n in names(&plain) {
            assert!(names(&t).contains(&n), "{algos} lost `{n}`");
        }
        assert!(!net_records(t.state.model.as_ref()).is_empty(), "{algos}");
    }
}

/// Stochastic depth at rate 0 trains exactly the plain model (the same fused kernels run); at
/// rate 1 in block mode every branch is dropped, so the blocks' convolutions never change.
#[test]
fn stochastic_depth_rates_zero_and_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |algos: &str, name: &str| with_algorithms(dir.path(), algos, name);
    let plain = run("[]", "plain");
    let zero = run("[{name: stochastic_depth, drop_rate: 0.0}]", "zero");
    let a = plain.state.model.params().flat_values().unwrap();
    let b = zero.state.model.params().flat_values().unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let all = run(
        "[{name: stochastic_depth, drop_rate: 1.0, drop_distribution: uniform}]",
        "all",
    );
    let fresh = resnet8_like_recipe(dir.path());
    assert_eq!(
        value(&all, "layer1.0.conv1.weight"),
        fresh[0],
        "a dropped branch trained"
    );
    assert_ne!(
        value(&all, "conv1.weight"),
        fresh[1],
        "the stem did not train"
    );
}

/// The initial values of layer1.0.conv1 and the stem's conv1 of RESNET (seed 5).
fn resnet8_like_recipe(dir: &std::path::Path) -> [Vec<f32>; 2] {
    let (t, _) = fit(
        dir,
        &RESNET.replace("max_duration: 6ba", "max_duration: 1ba"),
        None,
        &["optimizer.lr=0.0"],
        "fresh",
    );
    [
        value(&t, "layer1.0.conv1.weight"),
        value(&t, "conv1.weight"),
    ]
}

/// SAM with a vanishing neighbourhood is plain SGD (the second pass runs at the same weights,
/// and the weights come back exactly); with Composer's rho it trains to another point. (The
/// batch-norm running statistics see both passes, as in Composer, so only the trained weights
/// are compared.)
#[test]
fn sam_with_tiny_rho_is_the_plain_step() {
    let dir = tempfile::tempdir().unwrap();
    let run = |algos: &str, name: &str| with_algorithms(dir.path(), algos, name);
    let plain = run("[]", "plain");
    let tiny = run("[{name: sam, rho: 1.0e-20}]", "tiny");
    let sam = run("[{name: sam, rho: 0.05}]", "sam");
    let trained = |t: &Trainer| -> Vec<f32> {
        t.state
            .model
            .params()
            .trainable()
            .flat_map(|p| {
                p.var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let (a, b, c) = (trained(&plain), trained(&tiny), trained(&sam));
    let diff = |u: &[f32], v: &[f32]| u.iter().zip(v).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff(&a, &b) < 1e-5, "{}", diff(&a, &b));
    assert!(diff(&a, &c) > 1e-4, "{}", diff(&a, &c));
}

/// Layer freezing from the start of the run: by the last epoch the first layers no longer
/// change, the head still does.
#[test]
fn layer_freezing_stops_the_first_layers() {
    let dir = tempfile::tempdir().unwrap();
    // 48 samples / 16 = 3 batches per epoch, 3 epochs; after epoch 1 a third of the layers
    // freeze, after epoch 2 two thirds.
    let text = format!(
        "{RESNET}algorithms: [{{name: layer_freezing, freeze_start: 0.0}}]\ncallbacks: [{{name: checkpoint, interval: 1ep, keep_last: 0}}]\n"
    )
    .replace("max_duration: 6ba", "max_duration: 3ep");
    let (t, _) = fit(dir.path(), &text, None, &[], "run");
    let ckpt = recipe_engine::checkpoint::Checkpoint::read(
        &dir.path().join("run/checkpoints/ep2-ba6.ckpt"),
        &Device::Cpu,
    )
    .unwrap();
    let saved = ckpt.model_tensors();
    let same = |n: &str| {
        let now = value(&t, n);
        let then = saved[n]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        now == then
    };
    assert!(same("conv1.weight"), "the stem changed while frozen");
    assert!(same("layer1.0.conv1.weight"));
    assert!(!same("fc.weight"), "the head stopped training");
    // 19 layers hold parameters: the stem's conv and norm, 4 per block of three, 2 per shortcut
    // of two, the head; all are frozen at the end of the run.
    assert_eq!(
        metrics(&dir.path().join("run"), "layer_freezing/layers_frozen")
            .last()
            .copied(),
        Some(19.0)
    );
}

/// The checkpoint records the rewritten tree: resuming it without the rewrite (even with
/// --force, which lets other recipe changes through) is refused with what differs, and nothing
/// is written.
#[test]
fn a_checkpoint_of_a_rewritten_model_refuses_another_tree() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{RESNET}algorithms: [{{name: blurpool, min_channels: 4}}]\ncallbacks: [{{name: checkpoint, interval: 3ba}}]\n"
    );
    let recipe = write_recipe(dir.path(), "blur.yaml", &text);
    let run_dir = dir.path().join("run");
    let o = train(&recipe, &run_dir, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = checkpoint_at(&run_dir, 3);
    let ckpt = ckpt.to_str().unwrap();
    let plain = write_recipe(
        dir.path(),
        "plain.yaml",
        &text.replace("algorithms: [{name: blurpool, min_channels: 4}]\n", ""),
    );
    let before = std::fs::read_dir(&run_dir).unwrap().count();
    // `recipe show` says what the surgery did.
    let o = run(&["show", recipe.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("# surgery algorithms[0]:blurpool: 4 BlurConv2d at layer2.0.conv1, layer2.0.downsample.0, layer3.0.conv1, layer3.0.downsample.0"),
        "{}",
        stdout(&o)
    );
    let o = train(&plain, &run_dir, &["--resume", ckpt, "--force"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("rewritten differently"), "{e}");
    assert!(e.contains("BlurConv2d"), "{e}");
    assert!(e.contains("blurpool"), "{e}");
    assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), before);
    // With the rewrite it continues.
    let o = train(&recipe, &run_dir, &["--resume", ckpt]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A surgery algorithm on a model it has nothing to rewrite in says so before anything runs.
#[test]
fn surgery_errors_name_the_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{RESNET}algorithms: [stochastic_depth]\n")
        .replace("name: resnet_cifar\n  depth: 8\n  width: 0.5", "name: mlp");
    let r = write_recipe(dir.path(), "r.yaml", &text);
    let o = run(&["show", r.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("algorithms[0]"), "{e}");
    assert!(e.contains("residual"), "{e}");
}
