//! Reading a recipe from the command line, shared by `run`, `show`, `plot`, `bench` and `sweep`:
//! the file, its `--set` overrides, `--scale` (as a `scale_schedule` algorithm, so that the ratio
//! is part of the recipe saved with the run), and the callbacks a command adds.

use recipe_engine::error::{Error, Result};
use recipe_engine::recipe::{entry_name, Recipe, RecipeSource};
use recipe_engine::serde_yaml::{Mapping, Value};
use std::path::PathBuf;

/// Options that select and adjust a recipe.
#[derive(clap::Args, Debug, Clone)]
pub struct RecipeArgs {
    /// The recipe file (YAML).
    pub file: PathBuf,
    /// Shrink (< 1) or stretch (> 1) the whole recipe: run length, LR schedule with its warmup,
    /// and every phase time of every algorithm and callback.
    #[arg(long, value_name = "RATIO")]
    pub scale: Option<f64>,
    /// Override a recipe value: --set optimizer.lr=0.2, --set algorithms.label_smoothing.smoothing=0.2.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Reads a recipe with its overrides and `--scale` (added as a `scale_schedule` algorithm, so the
/// ratio is part of the recipe that is saved with the run). `prepare` runs the transforms.
pub fn load(args: &RecipeArgs, extra_callbacks: &[&str], prepare: bool) -> Result<Recipe> {
    let src = RecipeSource::read(&args.file, &args.sets)?;
    let mut raw = src.raw()?;
    let m = raw
        .as_mapping_mut()
        .ok_or_else(|| Error::msg("a recipe is a YAML mapping"))?;
    if let Some(ratio) = args.scale {
        let mut block = Mapping::new();
        block.insert("name".into(), "scale_schedule".into());
        block.insert("ratio".into(), ratio.into());
        push_entry(m, "algorithms", Value::Mapping(block))?;
    }
    for cb in extra_callbacks {
        // A name (`json_logger`) or a YAML block (`{name: threshold_stopper, ...}`).
        let entry: Value = if cb.starts_with('{') {
            recipe_engine::serde_yaml::from_str(cb)
                .map_err(|e| Error::msg(format!("callback block {cb}: {e}")))?
        } else {
            Value::String(cb.to_string())
        };
        let name = entry_name(&entry).unwrap_or_default().to_string();
        let present = match m.get("callbacks") {
            Some(Value::Sequence(s)) => s.iter().any(|v| entry_name(v) == Some(&name)),
            _ => false,
        };
        if !present || cb.starts_with('{') {
            push_entry(m, "callbacks", entry)?;
        }
    }
    Recipe::from_raw(raw, src, prepare)
}

fn push_entry(m: &mut Mapping, key: &str, entry: Value) -> Result<()> {
    let list = m.entry(key.into()).or_insert(Value::Sequence(Vec::new()));
    if list.is_null() {
        *list = Value::Sequence(Vec::new());
    }
    match list {
        Value::Sequence(s) => {
            s.push(entry);
            Ok(())
        }
        _ => Err(Error::recipe(key, "must be a list")),
    }
}
