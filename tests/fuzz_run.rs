//! Mutations of the shipped recipes through the whole run path (load, validate, bind, start in a
//! run folder, train a few steps, write the weights), not only the parser: one value of the
//! recipe replaced by junk. Every mutation either trains to finite weights or is refused with an
//! error; none panics, and none ends "successfully" with NaN weights.

mod common;

use proptest::prelude::*;
use recipe::load::{load, RecipeArgs};
use recipe_engine::serde_yaml::Value;
use recipe_engine::trainer::Trainer;
use std::path::{Path, PathBuf};

/// The recipes the fuzz mutates, with overrides that keep a run to a few small steps.
const RECIPES: &[(&str, &[&str])] = &[
    (
        "recipes/quickstart.yaml",
        &[
            "max_duration=3ba",
            "eval_interval=2ba",
            "data.batch_size=16",
            "data.train_subset=64",
            "data.eval_subset=32",
        ],
    ),
    (
        "recipes/budget_fashion_mnist.yaml",
        &[
            "max_duration=3ba",
            "data.synthetic=true",
            "data.batch_size=16",
            "data.train_subset=64",
            "data.eval_subset=32",
        ],
    ),
];

/// Values that have broken parsers and trainers before.
const JUNK: &[&str] = &[
    "0", "-1", "1e308", "-1e308", ".nan", ".inf", "-.inf", "''", "0ba", "0ep", "1e308ep", "-3ep",
    "0.5dur", "true", "[]", "{}", "[1, 2]", "abc", "7", "0.0001",
];

/// Every leaf of a YAML tree, as a `--set` key path.
fn leaves(v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if let Some(k) = k.as_str() {
                    let p = if path.is_empty() {
                        k.to_string()
                    } else {
                        format!("{path}.{k}")
                    };
                    leaves(v, p, out);
                }
            }
        }
        Value::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                leaves(v, format!("{path}[{i}]"), out);
            }
        }
        _ => out.push(path),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn leaf_paths(file: &Path) -> Vec<String> {
    let v: Value =
        recipe_engine::serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut out = Vec::new();
    leaves(&v, String::new(), &mut out);
    out
}

/// Loads, binds and (when the mutated run stays short) trains one mutation. `Ok(None)`: refused
/// with an error, as it may be.
fn run_mutation(file: &Path, sets: Vec<String>, dir: &Path) -> Option<PathBuf> {
    let args = RecipeArgs {
        file: file.to_path_buf(),
        scale: None,
        sets,
    };
    let recipe = load(&args, &["json_logger"], true).ok()?;
    recipe_engine::trainer::validate(&recipe).ok()?;
    let bound = Trainer::bind(&recipe, None).ok()?;
    let run_dir = dir.join("run");
    let mut t = bound.start(&run_dir, false).ok()?;
    // A mutation may lengthen the run (`max_duration`): train only short ones.
    if t.state.max_batches() > 6 {
        return None;
    }
    t.fit().ok()?;
    Some(run_dir.join("model.safetensors"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_shipped_recipes_train_or_are_refused_never_nan(
        which in 0..RECIPES.len(),
        leaf in 0usize..1000,
        junk in 0..JUNK.len(),
    ) {
        let (file, limits) = RECIPES[which];
        let file = root().join(file);
        let paths = leaf_paths(&file);
        let key = &paths[leaf % paths.len()];
        let mut sets: Vec<String> = limits.iter().map(|s| s.to_string()).collect();
        sets.push(format!("{key}={}", JUNK[junk]));
        let dir = tempfile::tempdir().unwrap();
        if let Some(weights) = run_mutation(&file, sets.clone(), dir.path()) {
            let w = recipe_engine::candle_core::safetensors::load(
                &weights,
                &recipe_engine::candle_core::Device::Cpu,
            )
            .unwrap();
            for (name, t) in w {
                let v: Vec<f32> = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(recipe_engine::candle_core::DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                prop_assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{sets:?}: the run succeeded with non-finite `{name}`"
                );
            }
        }
    }
}

#[test]
fn the_fuzz_reaches_every_value_of_the_recipes() {
    // The mutations cover the recipes' keys, not one corner of them.
    for (file, _) in RECIPES {
        let paths = leaf_paths(&root().join(file));
        assert!(paths.len() >= 10, "{file}: {paths:?}");
        assert!(paths.iter().any(|p| p == "optimizer.lr"), "{paths:?}");
    }
    // A harmless mutation goes the whole way: trained, weights written.
    let (file, limits) = RECIPES[0];
    let mut sets: Vec<String> = limits.iter().map(|s| s.to_string()).collect();
    sets.push("optimizer.lr=0.0001".into());
    let dir = tempfile::tempdir().unwrap();
    let w = run_mutation(&root().join(file), sets, dir.path()).expect("trained");
    assert!(w.is_file());
}
