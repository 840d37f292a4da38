//! Recipe benchmarks: `recipe bench sweep` (a grid of budgets x variants x seeds, resumable, with
//! tables and cost-quality plots) and `recipe bench speedup` (time-to-accuracy of two recipes).
//!
//! Every cell is a real run in its own folder under the output folder. A cell whose `result.json`
//! exists is never run again, so a sweep stopped for any reason continues where it stopped when
//! the same command is given again; a cell cut off mid-run resumes from its newest checkpoint when
//! the recipe has the `checkpoint` callback, and starts over otherwise.

use crate::load::{load, RecipeArgs};
use crate::plot::{draw, pareto_front, Panel, Series};
use recipe_engine::error::{Error, Result};
use recipe_engine::trainer::{Resume, Trainer};
use recipe_engine::{atomic, checkpoint};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// The recipe file (YAML). Several files are compared as variants of one another (a preset
    /// against its baseline, the first file being the reference), each labelled by its `name`
    /// and crossed with every --vary.
    #[arg(required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Budgets, as scale ratios of the recipe.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1")]
    pub scales: Vec<f64>,
    /// A recipe key and the values to try: `--vary schedule.name=linear,cosine,rex`. A value may
    /// be a YAML block (`--vary 'schedule={name: multistep, milestones: [8ep, 12ep]}'`; commas
    /// inside braces or brackets do not split) and may carry a label: `step@{name: multistep}`.
    /// Several --vary give their product.
    #[arg(long, value_name = "KEY=A,B,C")]
    pub vary: Vec<String>,
    /// Seeds per cell: the recipe's seed, seed + 1, ...
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Override a recipe value in every cell.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Output folder (default: runs/sweeps/<name of the first recipe>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only rebuild the tables and plots from the finished cells.
    #[arg(long)]
    pub report_only: bool,
}

/// One value of one varied key.
#[derive(Debug, Clone, PartialEq)]
struct Variant {
    key: String,
    label: String,
    value: String,
}

/// A cell's result, written to `<cell>/result.json` when it finishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    pub variant: String,
    pub scale: f64,
    pub seed: u64,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub steps: u64,
    pub wall_seconds: f64,
    /// Wall time less the time spent evaluating (absent in results written before it was kept).
    #[serde(default)]
    pub train_seconds: Option<f64>,
    /// CPU time of the process over the cell (training and evaluation, all threads).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    pub stop_reason: Option<String>,
}

impl CellResult {
    fn train_seconds(&self) -> f64 {
        self.train_seconds.unwrap_or(self.wall_seconds)
    }
}

/// One variant of a sweep: a recipe file and the overrides of its --vary values.
struct Combo {
    label: String,
    file: PathBuf,
    seed: u64,
    sets: Vec<String>,
}

/// Splits `a,{b, c},[d, e]` at top-level commas.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out.into_iter().filter(|v| !v.is_empty()).collect()
}

/// A label usable as a folder name.
fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(48);
    let trimmed = out.trim_matches('_').to_string();
    if trimmed.is_empty() {
        "value".into()
    } else {
        trimmed
    }
}

fn parse_vary(spec: &str) -> Result<Vec<Variant>> {
    let (key, values) = spec.split_once('=').ok_or_else(|| {
        Error::msg(format!(
            "--vary {spec}: write KEY=A,B,C, e.g. --vary schedule.name=linear,cosine"
        ))
    })?;
    let key = key.trim();
    let values = split_top(values);
    if key.is_empty() || values.is_empty() {
        return Err(Error::msg(format!(
            "--vary {spec}: needs a key and at least one value"
        )));
    }
    let vs: Vec<Variant> = values
        .iter()
        .map(|v| match v.split_once('@') {
            Some((l, val)) if !l.contains(['{', '[']) => Variant {
                key: key.into(),
                label: slug(l),
                value: val.trim().into(),
            },
            _ => Variant {
                key: key.into(),
                label: slug(v),
                value: v.clone(),
            },
        })
        .collect();
    for (i, v) in vs.iter().enumerate() {
        if vs[..i].iter().any(|w| w.label == v.label) {
            return Err(Error::msg(format!(
                "--vary {spec}: two values have the label `{}`; name them with label@value",
                v.label
            )));
        }
    }
    Ok(vs)
}

/// The product of every --vary: each combination as a label and its `--set`s.
fn combinations(vary: &[String]) -> Result<Vec<(String, Vec<String>)>> {
    let mut combos: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    for spec in vary {
        let vs = parse_vary(spec)?;
        combos = combos
            .into_iter()
            .flat_map(|(l, sets)| {
                vs.iter().map(move |v| {
                    let label = if l.is_empty() {
                        v.label.clone()
                    } else {
                        format!("{l}+{}", v.label)
                    };
                    let mut s = sets.clone();
                    s.push(format!("{}={}", v.key, v.value));
                    (label, s)
                })
            })
            .collect();
    }
    if vary.is_empty() {
        combos[0].0 = "recipe".into();
    }
    Ok(combos)
}

fn scale_label(s: f64) -> String {
    format!("scale{s}")
}

/// Runs (or resumes) one cell; returns its summary and whether it resumed a cut-off run.
fn run_cell(
    dir: &Path,
    args: &RecipeArgs,
    interrupt: &Arc<AtomicUsize>,
) -> Result<(recipe_engine::trainer::FitSummary, bool)> {
    let recipe = load(args, &["json_logger"], true)?;
    let cpu = recipe_engine::candle_core::Device::Cpu;
    let mut resumed = false;
    let mut trainer = match checkpoint::latest(dir, &cpu) {
        Ok(c) if dir.join("recipe.yaml").is_file() => {
            eprintln!("  resuming from {}", c.path.display());
            resumed = true;
            Trainer::resume(
                &recipe,
                dir,
                Resume {
                    checkpoint: c,
                    force: false,
                },
            )?
        }
        _ => {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            Trainer::new(&recipe, dir)?
        }
    };
    trainer.set_interrupt(Arc::clone(interrupt));
    Ok((trainer.fit()?, resumed))
}

fn read_result(path: &Path) -> Option<CellResult> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// `recipe bench sweep`.
pub fn sweep(a: &SweepArgs, interrupt: Arc<AtomicUsize>) -> Result<PathBuf> {
    // Every rank would run the same cells and write the same result files, and on machines
    // without a shared folder each rank would see other cells finished: refused before anything
    // is written.
    if recipe_engine::dist::launched_by_mpi().is_some() {
        return Err(Error::msg(
            "`recipe bench sweep` runs in one process, not under mpirun or srun: every rank would run and write the same cells; start it without the launcher (one recipe can still train data-parallel with `recipe run FILE --nproc N`)",
        ));
    }
    if a.scales.is_empty() || a.scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::msg(
            "--scales: give positive ratios, e.g. 0.1,0.25,0.5,1",
        ));
    }
    if a.seeds == 0 {
        return Err(Error::msg("--seeds must be at least 1"));
    }
    let varied = combinations(&a.vary)?;
    // The variants: each recipe file crossed with each --vary combination. With several files a
    // variant is named by its recipe (and its --vary label).
    let mut combos: Vec<Combo> = Vec::new();
    let mut first_name = String::new();
    let mut runs_dir = PathBuf::new();
    for file in &a.files {
        let base = load(
            &RecipeArgs {
                file: file.clone(),
                scale: None,
                sets: a.sets.clone(),
            },
            &[],
            true,
        )?;
        if combos.is_empty() {
            first_name = base.name.clone();
            runs_dir = base.runs_dir.clone();
        }
        for (label, sets) in &varied {
            let label = match (a.files.len() > 1, a.vary.is_empty()) {
                (false, _) => label.clone(),
                (true, true) => base.name.clone(),
                (true, false) => format!("{}+{label}", base.name),
            };
            if combos.iter().any(|c| c.label == label) {
                return Err(Error::msg(format!(
                    "two variants are both named `{label}` ({} and {}): give the recipes different \
                     `name`s",
                    combos
                        .iter()
                        .find(|c| c.label == label)
                        .map(|c| c.file.display().to_string())
                        .unwrap_or_default(),
                    file.display()
                )));
            }
            let mut s = a.sets.clone();
            s.extend(sets.iter().cloned());
            combos.push(Combo {
                label,
                file: file.clone(),
                seed: base.seed,
                sets: s,
            });
        }
    }
    // Validate every variant at every scale before the first run starts.
    for c in &combos {
        for &scale in &a.scales {
            load(
                &RecipeArgs {
                    file: c.file.clone(),
                    scale: Some(scale),
                    sets: c.sets.clone(),
                },
                &[],
                true,
            )
            .map_err(|e| Error::msg(format!("variant `{}` at scale {scale}: {e}", c.label)))?;
        }
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| runs_dir.join("sweeps").join(&first_name));
    std::fs::create_dir_all(&out).map_err(|e| {
        Error::msg(format!(
            "cannot create the sweep folder {}: {e}; pass --out to a writable folder",
            out.display()
        ))
    })?;
    let total = combos.len() * a.scales.len() * a.seeds as usize;
    let mut results = Vec::new();
    let mut n = 0;
    // Rounds of every variant in turn (seed, then budget, then variant), so that a machine that
    // slows down or speeds up during the sweep moves all variants alike.
    for k in 0..a.seeds {
        for &scale in &a.scales {
            for c in &combos {
                n += 1;
                let seed = c.seed + k;
                let dir = cell_dir(&out, &c.label, scale, seed);
                let result_file = dir.join("result.json");
                if let Some(r) = read_result(&result_file) {
                    results.push(r);
                    continue;
                }
                if a.report_only {
                    continue;
                }
                eprintln!("cell {n}/{total}: {}, scale {scale}, seed {seed}", c.label);
                let mut s = c.sets.clone();
                s.push(format!("seed={seed}"));
                let args = RecipeArgs {
                    file: c.file.clone(),
                    scale: Some(scale),
                    sets: s,
                };
                let cpu0 = recipe_engine::sysinfo::cpu_seconds();
                let (sum, resumed) = run_cell(&dir, &args, &interrupt)?;
                let cpu = recipe_engine::sysinfo::cpu_seconds()
                    .zip(cpu0)
                    .map(|(b, a)| b - a);
                let r = CellResult {
                    variant: c.label.clone(),
                    scale,
                    seed,
                    accuracy: sum.final_eval.map(|e| e.accuracy),
                    loss: sum.final_eval.map(|e| e.loss),
                    steps: sum.batches,
                    wall_seconds: sum.wall_seconds,
                    train_seconds: Some(sum.wall_seconds - sum.eval_seconds),
                    // A resumed cell's CPU time would cover only its last process.
                    cpu_seconds: cpu.filter(|_| !resumed),
                    stop_reason: sum.stop_reason,
                };
                eprintln!(
                    "  {} steps in {:.1}s ({:.1}s training), eval accuracy {}",
                    r.steps,
                    r.wall_seconds,
                    r.train_seconds(),
                    r.accuracy
                        .map_or("-".into(), |x| format!("{:.2}%", 100.0 * x))
                );
                let text = serde_json::to_string_pretty(&r)
                    .map_err(|e| Error::msg(format!("cannot serialize a cell result: {e}")))?;
                atomic::write_atomic(&result_file, text.as_bytes())?;
                results.push(r);
            }
        }
    }
    let labels: Vec<String> = combos.iter().map(|c| c.label.clone()).collect();
    report(&out, &labels, &a.scales, &results)?;
    convergence_report(&out, &labels, &a.scales, &results)?;
    Ok(out)
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom (df >= 1).
fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

/// The half-width of the 95% confidence interval of the mean of `v` (Student's t); NaN for
/// fewer than two values, where there is no interval to give.
pub fn ci95(v: &[f64]) -> f64 {
    let (_, s) = mean_std(v);
    t95(v.len().saturating_sub(1)) * s / (v.len() as f64).sqrt()
}

/// One row of the aggregated table: a variant at a scale, over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    pub variant: String,
    pub scale: f64,
    pub seeds: usize,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    /// Half-width of the 95% confidence interval of the mean accuracy.
    pub accuracy_ci95: f64,
    pub steps: f64,
    /// Training time: wall time less evaluation.
    pub wall_seconds_mean: f64,
    pub wall_seconds_std: f64,
    /// Process CPU seconds per cell (cells that ran in one process only).
    pub cpu_seconds_mean: Option<f64>,
}

fn aggregate(labels: &[String], scales: &[f64], results: &[CellResult]) -> Vec<Aggregate> {
    let mut out = Vec::new();
    for l in labels {
        for &s in scales {
            let cell: Vec<&CellResult> = results
                .iter()
                .filter(|r| &r.variant == l && r.scale == s)
                .collect();
            if cell.is_empty() {
                continue;
            }
            let acc: Vec<f64> = cell.iter().filter_map(|r| r.accuracy).collect();
            let wall: Vec<f64> = cell.iter().map(|r| r.train_seconds()).collect();
            let cpu: Vec<f64> = cell.iter().filter_map(|r| r.cpu_seconds).collect();
            let (am, asd) = mean_std(&acc);
            let (wm, wsd) = mean_std(&wall);
            out.push(Aggregate {
                variant: l.clone(),
                scale: s,
                seeds: cell.len(),
                accuracy_mean: am,
                accuracy_std: asd,
                accuracy_ci95: ci95(&acc),
                steps: cell.iter().map(|r| r.steps as f64).sum::<f64>() / cell.len() as f64,
                wall_seconds_mean: wm,
                wall_seconds_std: wsd,
                cpu_seconds_mean: (!cpu.is_empty()).then(|| mean_std(&cpu).0),
            });
        }
    }
    out
}

fn write(path: &Path, text: &str) -> Result<()> {
    atomic::write_atomic(path, text.as_bytes())
}

/// Tables (CSV, JSON, a Markdown budget table) and plots (accuracy against wall time and against
/// steps, with the Pareto frontier) from the finished cells.
fn report(out: &Path, labels: &[String], scales: &[f64], results: &[CellResult]) -> Result<()> {
    let agg = aggregate(labels, scales, results);
    let mut csv = String::from(
        "variant,scale,seeds,accuracy_mean,accuracy_std,accuracy_ci95,steps,train_seconds_mean,train_seconds_std,cpu_seconds_mean\n",
    );
    for a in &agg {
        csv.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.0},{:.2},{:.2},{}\n",
            a.variant,
            a.scale,
            a.seeds,
            a.accuracy_mean,
            a.accuracy_std,
            a.accuracy_ci95,
            a.steps,
            a.wall_seconds_mean,
            a.wall_seconds_std,
            a.cpu_seconds_mean
                .map_or(String::new(), |c| format!("{c:.2}"))
        ));
    }
    write(&out.join("results.csv"), &csv)?;
    let json = serde_json::json!({ "cells": results, "aggregates": agg });
    write(
        &out.join("results.json"),
        &serde_json::to_string_pretty(&json).unwrap_or_default(),
    )?;
    let md = tables(out, labels, scales, &agg, results);
    write(&out.join("budget_table.md"), &md)?;
    let mut by_time = Vec::new();
    let mut by_steps = Vec::new();
    let mut all_time = Vec::new();
    let mut all_steps = Vec::new();
    for l in labels {
        let rows: Vec<&Aggregate> = agg.iter().filter(|a| &a.variant == l).collect();
        let t: Vec<(f64, f64)> = rows
            .iter()
            .map(|a| (a.wall_seconds_mean, 100.0 * a.accuracy_mean))
            .collect();
        let st: Vec<(f64, f64)> = rows
            .iter()
            .map(|a| (a.steps, 100.0 * a.accuracy_mean))
            .collect();
        all_time.extend(t.iter().copied());
        all_steps.extend(st.iter().copied());
        let mut s1 = Series::line(l.clone(), t);
        s1.markers = true;
        let mut s2 = Series::line(l.clone(), st);
        s2.markers = true;
        by_time.push(s1);
        by_steps.push(s2);
    }
    by_time.push(Series::line("Pareto frontier", pareto_front(&all_time)));
    by_steps.push(Series::line("Pareto frontier", pareto_front(&all_steps)));
    draw(
        &out.join("accuracy_vs_cost"),
        &[
            Panel {
                title: "accuracy against training time".into(),
                x_label: "training wall time (s, evaluation excluded, mean over seeds)".into(),
                y_label: "eval accuracy (%)".into(),
                series: by_time,
            },
            Panel {
                title: "accuracy against steps".into(),
                x_label: "optimizer steps".into(),
                y_label: "eval accuracy (%)".into(),
                series: by_steps,
            },
        ],
    )?;
    print!("{md}");
    eprintln!(
        "tables: {}/results.csv, results.json, budget_table.md; plots: accuracy_vs_cost.png/.svg",
        out.display()
    );
    Ok(())
}

/// The Markdown tables of a sweep: accuracy (mean ± std over seeds, %) and training time per
/// budget; with several variants, each against the first (accuracy difference in points, time
/// ratio) and the training time each needs to reach the first variant's accuracy at the largest
/// budget (from the evaluations during the run).
fn tables(
    out: &Path,
    labels: &[String],
    scales: &[f64],
    agg: &[Aggregate],
    results: &[CellResult],
) -> String {
    let find = |l: &str, s: f64| agg.iter().find(|a| a.variant == l && a.scale == s);
    let header = |title: &str| {
        let mut h = format!("\n{title}\n\n| variant |");
        for s in scales {
            h.push_str(&format!(" {}% |", s * 100.0));
        }
        h.push_str("\n|---|");
        h.push_str(&"---|".repeat(scales.len()));
        h.push('\n');
        h
    };
    let table = |title: &str, cell: &dyn Fn(&str, f64) -> Option<String>| {
        let mut md = header(title);
        for l in labels {
            md.push_str(&format!("| {l} |"));
            for &s in scales {
                md.push_str(&format!(" {} |", cell(l, s).unwrap_or_else(|| "-".into())));
            }
            md.push('\n');
        }
        md
    };
    let mut md = table(
        "Eval accuracy (%), mean ± std over seeds, per budget (scale of the recipe):",
        &|l, s| {
            find(l, s).map(|a| {
                format!(
                    "{:.2} ± {:.2}",
                    100.0 * a.accuracy_mean,
                    100.0 * a.accuracy_std
                )
            })
        },
    );
    md.push_str(&table(
        "Training wall time (s, evaluation excluded), mean ± std over seeds; CPU seconds of the \
         process per cell (evaluation included) in brackets:",
        &|l, s| {
            find(l, s).map(|a| {
                let cpu = a
                    .cpu_seconds_mean
                    .map_or(String::new(), |c| format!(" [{c:.0}]"));
                format!(
                    "{:.1} ± {:.1}{cpu}",
                    a.wall_seconds_mean, a.wall_seconds_std
                )
            })
        },
    ));
    let Some(reference) = labels.first().filter(|_| labels.len() > 1) else {
        return md;
    };
    md.push_str(&table(
        &format!(
            "Against `{reference}` at the same budget: accuracy difference (points) and training \
             time ratio:"
        ),
        &|l, s| {
            let (a, b) = (find(l, s)?, find(reference, s)?);
            Some(format!(
                "{:+.2} / {:.2}x",
                100.0 * (a.accuracy_mean - b.accuracy_mean),
                a.wall_seconds_mean / b.wall_seconds_mean
            ))
        },
    ));
    let largest = scales.iter().copied().fold(0.0, f64::max);
    let Some(target) = find(reference, largest).map(|a| a.accuracy_mean) else {
        return md;
    };
    let reference_time = find(reference, largest).map_or(f64::NAN, |a| a.wall_seconds_mean);
    md.push_str(&table(
        &format!(
            "Training time to `{reference}`'s accuracy at the {}% budget ({:.2}%, {:.0} s): \
             seconds at the first evaluation that reaches it, mean over the seeds that do (how \
             many of all), and the ratio to {:.0} s:",
            largest * 100.0,
            100.0 * target,
            reference_time,
            reference_time
        ),
        &|l, s| {
            let cells: Vec<&CellResult> = results
                .iter()
                .filter(|r| r.variant == l && r.scale == s)
                .collect();
            if cells.is_empty() {
                return None;
            }
            let hits: Vec<f64> = cells
                .iter()
                .filter_map(|r| {
                    let curve = eval_curve(&cell_dir(out, &r.variant, r.scale, r.seed)).ok()?;
                    curve
                        .iter()
                        .find(|e| e.accuracy >= target)
                        .map(|e| e.train_sec)
                })
                .collect();
            if hits.is_empty() {
                return Some(format!("not reached (0/{})", cells.len()));
            }
            let m = mean_std(&hits).0;
            Some(format!(
                "{m:.0} s ({}/{}), {:.2}x",
                hits.len(),
                cells.len(),
                m / reference_time
            ))
        },
    ));
    md
}

/// The folder of a cell.
fn cell_dir(out: &Path, variant: &str, scale: f64, seed: u64) -> PathBuf {
    out.join("cells")
        .join(variant)
        .join(scale_label(scale))
        .join(format!("seed{seed}"))
}

/// Budgeted convergence (Li et al., Figure 3): when the cells logged
/// `convergence/full_grad_norm` (the `budgeted_convergence` callback), the full-gradient norm
/// against the fraction of the budget, mean over seeds, one line per variant, for the smallest
/// and the largest budget; and `convergence.csv` with every measurement.
fn convergence_report(
    out: &Path,
    labels: &[String],
    scales: &[f64],
    results: &[CellResult],
) -> Result<()> {
    let mut rows = String::from("variant,scale,seed,batch,progress,full_grad_norm,full_loss\n");
    // (variant, scale) -> progress -> values over seeds
    let mut curves: BTreeMap<(String, u64), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for r in results {
        let Ok(text) = std::fs::read_to_string(
            cell_dir(out, &r.variant, r.scale, r.seed).join("metrics.jsonl"),
        ) else {
            continue;
        };
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let (Some(b), Some(g)) = (
                v.get("batch").and_then(|b| b.as_u64()),
                v.get("convergence/full_grad_norm").and_then(|g| g.as_f64()),
            ) else {
                continue;
            };
            let loss = v
                .get("convergence/full_loss")
                .and_then(|l| l.as_f64())
                .unwrap_or(f64::NAN);
            let p = b as f64 / r.steps.max(1) as f64;
            rows.push_str(&format!(
                "{},{},{},{b},{p:.4},{g},{loss}\n",
                r.variant, r.scale, r.seed
            ));
            curves
                .entry((r.variant.clone(), r.scale.to_bits()))
                .or_default()
                .entry((p * 1000.0).round() as u64)
                .or_default()
                .push(g);
        }
    }
    if curves.is_empty() {
        return Ok(());
    }
    write(&out.join("convergence.csv"), &rows)?;
    let mut panels = Vec::new();
    let mut picked: Vec<f64> = Vec::new();
    for s in [
        scales.iter().copied().fold(f64::INFINITY, f64::min),
        scales.iter().copied().fold(0.0, f64::max),
    ] {
        if picked.contains(&s) {
            continue;
        }
        picked.push(s);
        let series = labels
            .iter()
            .filter_map(|l| {
                let c = curves.get(&(l.clone(), s.to_bits()))?;
                let mut line = Series::line(
                    l.clone(),
                    c.iter()
                        .map(|(p, g)| (*p as f64 / 1000.0, mean_std(g).0))
                        .collect(),
                );
                line.markers = true;
                Some(line)
            })
            .collect();
        panels.push(Panel {
            title: format!("full-gradient norm, budget {}%", s * 100.0),
            x_label: "fraction of the budget".into(),
            y_label: "||grad of the training loss||".into(),
            series,
        });
    }
    draw(&out.join("convergence"), &panels)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Debug, Clone)]
pub struct SpeedupArgs {
    /// The baseline recipe.
    pub baseline: PathBuf,
    /// The candidate recipe.
    pub candidate: PathBuf,
    /// Target eval accuracy (a fraction: 0.92).
    #[arg(long)]
    pub target: f64,
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Override a value in both recipes.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Output folder (default: runs/speedups/<baseline>-vs-<candidate>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// One run's way to the target: the eval curve against training time and steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curve {
    pub recipe: String,
    pub seed: u64,
    /// (training seconds, steps, accuracy) at each evaluation: training time is the run's wall
    /// time less the time spent evaluating (`time/train_sec`).
    pub evals: Vec<(f64, u64, f64)>,
    /// Training seconds to the target.
    pub seconds_to_target: Option<f64>,
    pub steps_to_target: Option<u64>,
    /// Seconds spent evaluating until the target was reached (shown apart).
    #[serde(default)]
    pub eval_seconds_to_target: Option<f64>,
    /// Whether `evals` holds training time (curves written before evaluation time was logged
    /// apart hold wall time; they are read again from the cell's metrics).
    #[serde(default)]
    pub train_time: bool,
}

/// One evaluation of a run, from its metrics.jsonl.
struct EvalPoint {
    train_sec: f64,
    eval_sec: f64,
    batch: u64,
    accuracy: f64,
}

fn eval_curve(run_dir: &Path) -> Result<Vec<EvalPoint>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let eval_sec = v
                .get("time/eval_sec")
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0);
            let train_sec = match v.get("time/train_sec").and_then(|x| x.as_f64()) {
                Some(t) => t,
                None => v.get("time/fit_sec")?.as_f64()? - eval_sec,
            };
            Some(EvalPoint {
                train_sec,
                eval_sec,
                batch: v.get("batch")?.as_u64()?,
                accuracy: v.get("eval/accuracy")?.as_f64()?,
            })
        })
        .collect())
}

/// The curve of a finished run towards `target`.
fn curve_of(run_dir: &Path, recipe: &str, seed: u64, target: f64) -> Result<Curve> {
    let evals = eval_curve(run_dir)?;
    let hit = evals.iter().find(|e| e.accuracy >= target);
    Ok(Curve {
        recipe: recipe.to_string(),
        seed,
        seconds_to_target: hit.map(|e| e.train_sec),
        steps_to_target: hit.map(|e| e.batch),
        eval_seconds_to_target: hit.map(|e| e.eval_sec),
        evals: evals
            .iter()
            .map(|e| (e.train_sec, e.batch, e.accuracy))
            .collect(),
        train_time: true,
    })
}

/// `recipe bench speedup`.
pub fn speedup(a: &SpeedupArgs, interrupt: Arc<AtomicUsize>) -> Result<PathBuf> {
    if !(a.target > 0.0 && a.target <= 1.0) {
        return Err(Error::msg(
            "--target is an accuracy as a fraction in (0, 1], e.g. 0.92",
        ));
    }
    if a.seeds == 0 {
        return Err(Error::msg("--seeds must be at least 1"));
    }
    let recipes = [&a.baseline, &a.candidate];
    let names: Vec<String> = recipes
        .iter()
        .map(|f| {
            load(
                &RecipeArgs {
                    file: (*f).clone(),
                    scale: None,
                    sets: a.sets.clone(),
                },
                &[],
                true,
            )
            .map(|r| r.name.clone())
        })
        .collect::<Result<Vec<_>>>()?;
    let tags = if names[0] == names[1] {
        vec![
            format!("{}-baseline", names[0]),
            format!("{}-candidate", names[1]),
        ]
    } else {
        names.clone()
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs/speedups").join(format!("{}-vs-{}", tags[0], tags[1]))
    });
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let stopper = format!(
        "{{name: threshold_stopper, monitor: eval/accuracy, threshold: {}}}",
        a.target
    );
    let mut curves: Vec<Curve> = Vec::new();
    for (file, tag) in recipes.iter().zip(&tags) {
        let base_seed = load(
            &RecipeArgs {
                file: (*file).clone(),
                scale: None,
                sets: a.sets.clone(),
            },
            &[],
            true,
        )?
        .seed;
        for k in 0..a.seeds {
            let seed = base_seed + k;
            let dir = out.join(tag).join(format!("seed{seed}"));
            let curve_file = dir.join("curve.json");
            if let Some(c) = std::fs::read_to_string(&curve_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Curve>(&t).ok())
            {
                let c = match c.train_time {
                    true => c,
                    false => curve_of(&dir, tag, seed, a.target)?,
                };
                curves.push(c);
                continue;
            }
            eprintln!("{tag}, seed {seed}: training to {:.2}%", 100.0 * a.target);
            let mut sets = a.sets.clone();
            sets.push(format!("seed={seed}"));
            let args = RecipeArgs {
                file: (*file).clone(),
                scale: None,
                sets,
            };
            let recipe = load(&args, &["json_logger", stopper.as_str()], true)?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            let mut t = Trainer::new(&recipe, &dir)?;
            t.set_interrupt(Arc::clone(&interrupt));
            t.fit()?;
            let c = curve_of(&dir, tag, seed, a.target)?;
            eprintln!(
                "  {}",
                match (c.seconds_to_target, c.steps_to_target) {
                    (Some(s), Some(b)) => format!(
                        "reached it in {s:.1}s of training ({:.1}s more evaluating), {b} steps",
                        c.eval_seconds_to_target.unwrap_or(0.0)
                    ),
                    _ => "did not reach it".into(),
                }
            );
            atomic::write_atomic(
                &curve_file,
                serde_json::to_string_pretty(&c)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            curves.push(c);
        }
    }
    let summary_of = |tag: &str| {
        let cs: Vec<&Curve> = curves.iter().filter(|c| c.recipe == tag).collect();
        let times: Vec<f64> = cs.iter().filter_map(|c| c.seconds_to_target).collect();
        let evals: Vec<f64> = cs.iter().filter_map(|c| c.eval_seconds_to_target).collect();
        let missed: Vec<String> = cs
            .iter()
            .filter(|c| c.seconds_to_target.is_none())
            .map(|c| c.seed.to_string())
            .collect();
        (times, evals, missed, cs.len())
    };
    let line = |tag: &str| {
        let (t, e, missed, n) = summary_of(tag);
        let mut l = if t.is_empty() {
            format!("{tag}: reached by 0/{n} seeds")
        } else {
            let (m, s) = mean_std(&t);
            let ci = ci95(&t);
            let ci = if ci.is_finite() {
                format!(", 95% CI {:.1}-{:.1} s", (m - ci).max(0.0), m + ci)
            } else {
                String::new()
            };
            format!(
                "{tag}: reached by {}/{n} seeds; training time to the target {m:.1} ± {s:.1} s (mean ± std over those seeds{ci}); evaluation added {:.1} s on average",
                t.len(),
                mean_std(&e).0
            )
        };
        if !missed.is_empty() {
            l.push_str(&format!(
                "; never reached it: seed {} (not in the mean)",
                missed.join(", ")
            ));
        }
        l
    };
    let mut lines = vec![
        format!("target eval accuracy: {:.2}%", 100.0 * a.target),
        line(&tags[0]),
        line(&tags[1]),
    ];
    let (tb, _, missed_b, _) = summary_of(&tags[0]);
    let (tc, _, missed_c, _) = summary_of(&tags[1]);
    if !tb.is_empty() && !tc.is_empty() {
        let ((mb, sb), (mc, sc)) = (mean_std(&tb), mean_std(&tc));
        let ratio = mb / mc;
        // The ratio's 95% interval by the delta method on the two means' standard errors.
        let rel =
            ((sb / mb).powi(2) / tb.len() as f64 + (sc / mc).powi(2) / tc.len() as f64).sqrt();
        let t = t95(tb.len().min(tc.len()).saturating_sub(1));
        let ci = if (t * rel).is_finite() {
            format!(
                ", 95% CI {:.2}-{:.2}x",
                (ratio * (1.0 - t * rel)).max(0.0),
                ratio * (1.0 + t * rel)
            )
        } else {
            " (one seed each: no interval)".to_string()
        };
        let missed = if missed_b.is_empty() && missed_c.is_empty() {
            String::new()
        } else {
            "; seeds that never reached the target are left out, see above".to_string()
        };
        lines.push(format!(
            "speedup of {} over {} in training time: {ratio:.2}x{ci} (ratio of mean times){missed}",
            tags[1], tags[0]
        ));
    } else {
        lines.push("speedup: undefined (a recipe never reached the target)".into());
    }
    let summary = lines.join("\n") + "\n";
    write(&out.join("speedup.txt"), &summary)?;
    write(
        &out.join("curves.json"),
        &serde_json::to_string_pretty(&curves).unwrap_or_default(),
    )?;
    let mut series = Vec::new();
    for c in &curves {
        let mut s = Series::line(
            format!("{} seed {}", c.recipe, c.seed),
            c.evals.iter().map(|e| (e.0, 100.0 * e.2)).collect(),
        );
        s.markers = true;
        series.push(s);
    }
    series.push(Series::line(format!("target {:.2}%", 100.0 * a.target), {
        let tmax = curves
            .iter()
            .flat_map(|c| c.evals.iter().map(|e| e.0))
            .fold(0.0, f64::max);
        vec![(0.0, 100.0 * a.target), (tmax, 100.0 * a.target)]
    }));
    draw(
        &out.join("time_to_accuracy"),
        &[Panel {
            title: "eval accuracy against training time".into(),
            x_label: "training seconds (evaluation excluded)".into(),
            y_label: "eval accuracy (%)".into(),
            series,
        }],
    )?;
    print!("{summary}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vary_values_split_at_top_level_commas_and_take_labels() {
        assert_eq!(
            split_top("a, {b: 1, c: [2, 3]},d"),
            vec!["a", "{b: 1, c: [2, 3]}", "d"]
        );
        let v =
            parse_vary("schedule=trunc@{name: multistep, milestones: [8ep, 12ep]},linear").unwrap();
        assert_eq!(v[0].label, "trunc");
        assert_eq!(v[0].value, "{name: multistep, milestones: [8ep, 12ep]}");
        assert_eq!(v[1].label, "linear");
        assert!(parse_vary("novalues").is_err());
        assert!(parse_vary("k=a@1,a@2").is_err());
        let c = combinations(&["a=1,2".into(), "b=x,y".into()]).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c[3].0, "2+y");
        assert_eq!(c[3].1, vec!["a=2", "b=y"]);
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    }
}
