//! The `recipe` command line: `run` (with `--resume`), `export`, `show`, `list`, `bench`.

use crate::load::{load, RecipeArgs};
use clap::{Parser, Subcommand};
use recipe_engine::checkpoint::{self, Checkpoint};
use recipe_engine::error::{Error, Result};
use recipe_engine::registry::{registered, Kind};
use recipe_engine::run_dir::new_run_dir;
use recipe_engine::trainer::{Resume, Trainer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "recipe",
    version,
    about = "Train models from YAML recipes; shrink a whole recipe consistently with --scale.",
    after_help = "Examples:\n  recipe run recipes/quickstart.yaml\n  recipe run recipes/fashion_mnist_resnet.yaml --scale 0.25\n  recipe show recipes/resnet50_imagenet.yaml --scale 0.5\n  recipe run recipes/quickstart.yaml --set optimizer.lr=0.2 --set max_duration=3ep\n  recipe run recipes/fashion_mnist_resnet.yaml --resume latest\n  recipe run recipes/fashion_mnist_resnet.yaml --nproc 2   (data parallel; a build with --features mpi)\n  recipe export runs/fashion_mnist_resnet-1 --to resnet20.safetensors\n  recipe plot schedule recipes/fashion_mnist_resnet.yaml --scales 0.25,0.5,1\n  recipe list\n\nLogging: -v for debug traces of event dispatch (RUST_LOG overrides)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More output: -v shows which algorithms ran at which event (debug), -vv everything.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a recipe. Writes recipe.yaml, metrics.jsonl and model.safetensors into a run folder
    /// (and checkpoints/ with the `checkpoint` callback). Ctrl-C or SIGTERM finishes the step,
    /// writes a checkpoint and exits with code 75; a second Ctrl-C quits at once.
    Run {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// The run folder (default: a new folder <run_dir>/<name>-<n>).
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
        /// No progress bar and no per-epoch lines.
        #[arg(long, short)]
        quiet: bool,
        /// Continue from a checkpoint: a .ckpt file, a run folder (its newest good checkpoint),
        /// or `latest` (the newest run folder of this recipe, or --run-dir). The run goes on in
        /// the checkpoint's run folder and ends bitwise identical to an uninterrupted one.
        #[arg(long, value_name = "PATH|latest")]
        resume: Option<String>,
        /// Resume even though the recipe, the --set overrides or the scale ratio differ from
        /// the checkpoint's (they are listed as warnings).
        #[arg(long, requires = "resume")]
        force: bool,
        /// Start a new run in a --run-dir that holds another run's files, removing them (its
        /// recipe, logs, weights and checkpoints). Without it such a folder is refused.
        #[arg(long, requires = "run_dir", conflicts_with = "resume")]
        overwrite: bool,
        /// Train data-parallel in N local processes, started through `mpirun` (a binary built
        /// with `--features mpi`). The recipe's batch_size stays the global batch. `mpirun -n N
        /// recipe run FILE` and `srun` work as they are.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        /// Data parallel: end the job when one collective (a step's all-reduce) has waited this
        /// long for the other ranks, since one of them is hung or stopped (the error names it);
        /// 0 waits for ever.
        #[arg(long, value_name = "SECONDS", default_value_t = recipe_engine::dist::DEFAULT_COLLECTIVE_TIMEOUT.as_secs())]
        collective_timeout: u64,
    },
    /// Write a checkpoint's model weights as a plain safetensors file, with PyTorch's names
    /// (torchvision's for the ResNets, BatchNorm's num_batches_tracked included).
    Export {
        /// The checkpoint (.ckpt), or a run folder (its newest good checkpoint).
        checkpoint: PathBuf,
        /// The output file (never the checkpoint itself).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Print the resolved recipe and a table of every time parameter: before and after scaling,
    /// in batches, and its policy.
    Show {
        #[command(flatten)]
        recipe: RecipeArgs,
    },
    /// Benchmarks: `recipe bench throughput --model '{name: resnet_cifar, depth: 20}' --input 1x28x28`.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Charts: `recipe plot schedule FILE --scales 0.25,0.5,1`.
    Plot {
        #[command(subcommand)]
        which: PlotCommand,
    },
    /// List every registered algorithm, callback, schedule, optimizer, model and dataset.
    List {
        /// Also print each plugin's example block.
        #[arg(long)]
        examples: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlotCommand {
    /// The learning rate of every step, against steps and against progress, once per scale:
    /// how the schedule (and its warmup) shrinks with --scale. Writes PNG and SVG.
    Schedule {
        /// The recipe file (YAML).
        file: PathBuf,
        /// Scale ratios to draw.
        #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1")]
        scales: Vec<f64>,
        /// Override a recipe value (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Output path without extension (default: plots/<name>-schedule).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Training images/s of one model on synthetic input, with the step split into forward,
    /// backward and optimizer, and the peak memory.
    Throughput(crate::bench::ThroughputArgs),
    /// Images/s of the input pipeline (read, decode, RandomResizedCrop, flip, normalise, batch)
    /// on a folder of JPEGs, or of the JPEG decoder alone (--decode-only); with CPU-ms per image.
    /// `benches/data_side_by_side.py` runs it beside torchvision.
    Data(crate::bench_data::DataArgs),
    /// A grid of budgets (scales) x variants (--vary, or several recipe files) x seeds: each cell
    /// a real run, resumable (finished cells are never re-run); writes results.csv/.json, tables
    /// of accuracy, training time and time to the first variant's accuracy, and
    /// accuracy-against-cost plots with the Pareto frontier.
    Sweep(crate::sweep::SweepArgs),
    /// Time-to-accuracy of a baseline and a candidate recipe over seeds, the speedup with its
    /// spread, and the curves.
    Speedup(crate::sweep::SpeedupArgs),
}

/// Entry point of the `recipe` binary (and of any plugin crate's binary).
pub fn main() -> ExitCode {
    crate::alloc::keep_freed_memory();
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    // Under an MPI launcher this process is one rank of a job: MPI runs (and is finalised when
    // the guard drops, at the end of main) around the whole command.
    let _job = match crate::job::join() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let world = recipe_engine::dist::world();
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Interrupted {
            signal,
            batch,
            checkpoint,
        }) => {
            // Every rank of a job stops at the same batch; rank 0 wrote the checkpoint.
            if world.rank() == 0 {
                eprintln!(
                    "\ninterrupted by {signal} after batch {batch}; checkpoint written to {}\nresume with: {}",
                    checkpoint.display(),
                    resume_command(&checkpoint)
                );
            }
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) if world.size() > 1 => {
            // The other ranks may be waiting for this one in a collective: end the whole job.
            eprintln!("error on rank {} of {}: {e}", world.rank(), world.size());
            world.abort(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The exit code of a run stopped by SIGINT or SIGTERM after writing its checkpoint
/// (EX_TEMPFAIL: try again, with --resume).
pub const EXIT_INTERRUPTED: u8 = 75;

/// This process's command line with `--resume <checkpoint>` in place of any earlier --resume;
/// a benchmark (which resumes its cells by itself) is simply given again.
fn resume_command(checkpoint: &std::path::Path) -> String {
    if std::env::args().nth(1).as_deref() == Some("bench") {
        let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
        return format!("recipe {} (finished cells are kept)", args.join(" "));
    }
    let mut out = vec!["recipe".to_string()];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--resume" {
            args.next();
        } else if !a.starts_with("--resume=") {
            out.push(shell_quote(&a));
        }
    }
    out.push("--resume".into());
    out.push(shell_quote(&checkpoint.display().to_string()));
    // A job started with --nproc is resumed the same way; one started by a launcher, under it.
    let world = recipe_engine::dist::world();
    if let Some(n) = std::env::var(crate::job::NPROC_ENV)
        .ok()
        .filter(|_| world.size() > 1)
    {
        out.push("--nproc".into());
        out.push(n);
    } else if world.size() > 1 {
        return format!("mpirun -n {} {}", world.size(), out.join(" "));
    }
    out.join(" ")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// SIGINT/SIGTERM set the returned flag to the signal's number (the trainer then finishes the
/// step, checkpoints and stops); a second signal ends the process at once with code 130.
fn install_signal_handlers() -> Result<Arc<AtomicUsize>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let which = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        let reg = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&seen))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&seen)))
            .and_then(|_| signal_hook::flag::register_usize(sig, Arc::clone(&which), sig as usize));
        reg.map_err(|e| Error::msg(format!("cannot install the signal handler: {e}")))?;
    }
    Ok(which)
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "recipe_engine=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: escape codes in a log file or a pipe are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

pub fn run_command(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run {
            recipe,
            run_dir,
            quiet,
            resume,
            force,
            overwrite,
            nproc,
            collective_timeout,
        } => match nproc {
            Some(n) if recipe_engine::dist::launched_by_mpi().is_none() => crate::job::launch(n),
            _ => {
                recipe_engine::dist::set_collective_timeout(
                    (collective_timeout > 0).then(|| Duration::from_secs(collective_timeout)),
                );
                run(&recipe, run_dir, quiet, resume.as_deref(), force, overwrite)
            }
        },
        Command::Export {
            checkpoint,
            to,
            overwrite,
        } => export(&checkpoint, &to, overwrite),
        Command::Show { recipe } => show(&recipe),
        Command::Bench {
            which: BenchCommand::Data(a),
        } => {
            let r = crate::bench_data::data(&a)?;
            let what = if a.decode_only {
                "decode only".to_string()
            } else {
                format!(
                    "RandomResizedCrop {} + flip + normalise, batch {}, reduced decode {}",
                    a.crop,
                    a.batch,
                    if a.no_reduced_decode { "off" } else { "on" }
                )
            };
            if a.json {
                let v = serde_json::json!({
                    "impl": "recipe",
                    "what": what,
                    "images": r.images,
                    "images_per_sec": r.images_per_sec,
                    "cpu_ms_per_image": r.cpu_ms_per_image,
                });
                println!("{v}");
            } else {
                println!(
                    "{what}: {:.0} images/s over {} images; {} CPU-ms per image",
                    r.images_per_sec,
                    r.images,
                    r.cpu_ms_per_image.map_or("?".into(), |c| format!("{c:.2}"))
                );
            }
            Ok(())
        }
        Command::Bench {
            which: BenchCommand::Throughput(a),
        } if a.nproc.is_some() && recipe_engine::dist::launched_by_mpi().is_none() => {
            crate::job::launch(a.nproc.unwrap_or(1))
        }
        Command::Bench {
            which: BenchCommand::Throughput(a),
        } => {
            let world = recipe_engine::dist::world();
            if a.trainer && world.size() > 1 {
                return Err(Error::msg(
                    "--trainer measures one process: drop --nproc, or train the recipe with `recipe run FILE --nproc N`",
                ));
            }
            let t = crate::bench::throughput(&a)?;
            if world.rank() != 0 {
                return Ok(()); // rank 0 reports the job's figures
            }
            let overhead = match a.trainer {
                true => Some(crate::bench::engine_overhead(&a)?),
                false => None,
            };
            if a.json {
                let mut v = serde_json::json!({
                    "impl": "recipe",
                    "model": a.model,
                    "batch": a.batch,
                    "input": a.input,
                    "threads": rayon_threads(),
                    "images_per_sec": t.images_per_sec,
                    "images_per_cpu_sec": t.images_per_cpu_sec,
                    "forward_ms": t.forward_ms,
                    "backward_ms": t.backward_ms,
                    "optimizer_ms": t.optimizer_ms,
                    "allreduce_ms": t.allreduce_ms,
                    "ranks": t.ranks,
                    "peak_rss_mb": t.peak_rss_mb,
                });
                if let Some(e) = &overhead {
                    v["trainer_ms"] = serde_json::json!(e.trainer_ms);
                    v["bare_ms"] = serde_json::json!(e.bare_ms);
                    v["algorithms"] = serde_json::json!(a.algorithms);
                    v["apply_ms_per_step"] = serde_json::json!(e.apply_ms);
                }
                println!("{v}");
            } else {
                let ranks = match t.ranks {
                    1 => String::new(),
                    n => format!(
                        " on {n} ranks ({} thread(s) each), all-reduce {:.1} ms",
                        rayon_threads(),
                        t.allreduce_ms
                    ),
                };
                println!(
                    "model {} batch {} input {}: {:.1} images/s ({} per CPU-second); per step forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms{ranks}; peak RSS {}",
                    a.model,
                    a.batch,
                    a.input,
                    t.images_per_sec,
                    t.images_per_cpu_sec.map_or("unknown".into(), |c| format!("{c:.1}")),
                    t.forward_ms,
                    t.backward_ms,
                    t.optimizer_ms,
                    t.peak_rss_mb.map_or("unknown".into(), |m| format!("{m:.0} MB"))
                );
            }
            if let Some(e) = &overhead {
                let (bare, trainer, pct) = e.summary();
                let list = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let cbs = match e.callbacks.is_empty() {
                    true => "no callbacks".to_string(),
                    false => e.callbacks.join(", "),
                };
                let own: Vec<String> = e
                    .apply_ms
                    .last()
                    .into_iter()
                    .flatten()
                    .map(|(k, ms)| format!("{k} {ms:.2} ms"))
                    .collect();
                let cbs = match a.algorithms.trim() {
                    "[]" | "" => cbs,
                    algs => format!(
                        "{cbs}; algorithms {algs}, their own time per step: {}",
                        own.join(", ")
                    ),
                };
                println!(
                    "engine: step {trainer:.1} ms in the trainer ({cbs}) against {bare:.1} ms in a bare loop over the same loader: {pct:+.2}% (fastest rounds; all rounds: trainer {} ms; bare {} ms)",
                    list(&e.trainer_ms),
                    list(&e.bare_ms),
                );
            }
            Ok(())
        }
        Command::Bench {
            which: BenchCommand::Sweep(a),
        } => crate::sweep::sweep(&a, install_signal_handlers()?).map(|_| ()),
        Command::Bench {
            which: BenchCommand::Speedup(a),
        } => crate::sweep::speedup(&a, install_signal_handlers()?).map(|_| ()),
        Command::Plot {
            which:
                PlotCommand::Schedule {
                    file,
                    scales,
                    sets,
                    out,
                },
        } => plot_schedule(&file, &scales, &sets, out),
        Command::List { examples } => {
            print!("{}", list(examples));
            Ok(())
        }
    }
}

/// Threads of the global rayon pool, which the CPU kernels run on (RAYON_NUM_THREADS, or one per
/// core).
fn rayon_threads() -> usize {
    recipe_engine::rayon::current_num_threads()
}

fn run(
    args: &RecipeArgs,
    run_dir: Option<PathBuf>,
    quiet: bool,
    resume: Option<&str>,
    force: bool,
    overwrite: bool,
) -> Result<()> {
    let extra: &[&str] = if quiet {
        &["json_logger"]
    } else {
        &["progress_bar", "json_logger"]
    };
    let recipe = load(args, extra, true)?;
    let world = recipe_engine::dist::world();
    // Every check (recipe, data, plugins, the checkpoint's fit) passes before the run folder is
    // created or touched.
    let (bound, dir) = match resume {
        Some(spec) => {
            let (checkpoint, dir) = if world.size() > 1 {
                crate::job::resolve_checkpoint(
                    world.as_ref(),
                    spec,
                    &recipe.runs_dir,
                    &recipe.name,
                    run_dir.as_deref(),
                )?
            } else {
                checkpoint::resolve(spec, &recipe.runs_dir, &recipe.name, run_dir.as_deref())?
            };
            let ts = &checkpoint.meta.timestamp;
            if world.rank() == 0 {
                eprintln!(
                    "resuming {} at epoch {}, batch {} from {}",
                    recipe.name,
                    ts.epoch,
                    ts.batch,
                    checkpoint.path.display()
                );
            }
            (
                Trainer::bind(&recipe, Some(Resume { checkpoint, force }))?,
                dir,
            )
        }
        None => (Trainer::bind(&recipe, None)?, run_dir),
    };
    let dir = match dir {
        Some(d) => d,
        // A job's ranks all train in rank 0's new folder.
        None if world.size() > 1 => PathBuf::from(recipe_engine::dist::agree(
            world.as_ref(),
            match world.rank() {
                0 => new_run_dir(&recipe.runs_dir, &recipe.name)?
                    .display()
                    .to_string(),
                _ => String::new(),
            },
        )?),
        None => new_run_dir(&recipe.runs_dir, &recipe.name)?,
    };
    let mut trainer = bound.start(&dir, overwrite)?;
    trainer.set_interrupt(install_signal_handlers()?);
    let s = trainer.fit()?;
    let eval = match s.final_eval {
        Some(e) => format!(
            "eval accuracy {:.2}% (loss {:.4}) on {} samples",
            100.0 * e.accuracy,
            e.loss,
            e.samples
        ),
        None => "no eval split".into(),
    };
    let stop = s
        .stop_reason
        .map_or(String::new(), |r| format!(" (stopped early: {r})"));
    if world.rank() != 0 {
        return Ok(());
    }
    let ranks = match world.size() {
        1 => String::new(),
        n => format!(" on {n} data-parallel processes"),
    };
    eprintln!(
        "finished {}{ranks}: {} steps in {:.1}s{stop}; {eval}\nrun folder: {} (recipe.yaml, metrics.jsonl, model.safetensors)",
        recipe.name,
        s.batches,
        s.wall_seconds,
        s.run_dir.display()
    );
    Ok(())
}

/// `recipe plot schedule`.
fn plot_schedule(
    file: &std::path::Path,
    scales: &[f64],
    sets: &[String],
    out: Option<PathBuf>,
) -> Result<()> {
    use crate::plot::{draw, lr_per_step, Panel, Series};
    if scales.is_empty() {
        return Err(Error::msg(
            "--scales: give at least one ratio, e.g. 0.25,0.5,1",
        ));
    }
    let mut by_step = Vec::new();
    let mut by_progress = Vec::new();
    let mut name = String::new();
    for &scale in scales {
        let args = RecipeArgs {
            file: file.to_path_buf(),
            scale: Some(scale),
            sets: sets.to_vec(),
        };
        let recipe = load(&args, &[], true)?;
        name = recipe.name.clone();
        let lr = lr_per_step(&recipe)?;
        let n = lr.len().max(1) as f64;
        let label = format!("scale {scale} ({} steps)", lr.len());
        by_step.push(Series::line(
            label.clone(),
            lr.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect(),
        ));
        by_progress.push(Series::line(
            label,
            lr.iter()
                .enumerate()
                .map(|(i, &v)| (i as f64 / n, v))
                .collect(),
        ));
    }
    let stem = out.unwrap_or_else(|| PathBuf::from(format!("plots/{name}-schedule")));
    let files = draw(
        &stem,
        &[
            Panel {
                title: format!("{name}: LR per step"),
                x_label: "step".into(),
                y_label: "learning rate".into(),
                series: by_step,
            },
            Panel {
                title: "LR against progress".into(),
                x_label: "fraction of the run".into(),
                y_label: "learning rate".into(),
                series: by_progress,
            },
        ],
    )?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// `recipe export`: the model's weights from a checkpoint, as a plain safetensors file.
fn export(from: &std::path::Path, to: &std::path::Path, overwrite: bool) -> Result<()> {
    let cpu = recipe_engine::candle_core::Device::Cpu;
    let ckpt = if from.is_dir() {
        checkpoint::latest(from, &cpu)?
    } else {
        Checkpoint::read(from, &cpu)?
    };
    let same = |a: &std::path::Path, b: &std::path::Path| matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    if same(&ckpt.path, to) {
        return Err(Error::msg(format!(
            "--to {} is the checkpoint being exported; nothing was written\n  hint: give another file name, e.g. --to model.safetensors",
            to.display()
        )));
    }
    if to.is_dir() {
        return Err(Error::msg(format!(
            "--to {} is a folder; give a file name, e.g. --to {}",
            to.display(),
            to.join("model.safetensors").display()
        )));
    }
    if to.exists() && !overwrite {
        return Err(Error::msg(format!(
            "--to {} exists; nothing was written\n  hint: give another file name, or pass --overwrite to replace it",
            to.display()
        )));
    }
    let n = recipe_engine::export::write_torch_weights(&ckpt, to)?;
    eprintln!(
        "wrote {n} tensors ({} recipe `{}`, epoch {}, batch {}) to {}",
        ckpt.meta
            .recipe
            .get("model")
            .map(recipe_engine::export::model_name)
            .unwrap_or_default(),
        ckpt.meta.recipe_name,
        ckpt.meta.timestamp.epoch,
        ckpt.meta.timestamp.batch,
        to.display()
    );
    Ok(())
}

fn show(args: &RecipeArgs) -> Result<()> {
    let mut before = load(args, &[], false)?;
    let mut after = load(args, &[], true)?;
    // What `run` would refuse, `show` refuses too (all but the data files themselves).
    let model = recipe_engine::trainer::validate(&after)?;
    let yaml = recipe_engine::serde_yaml::to_string(&after.resolved_yaml()).unwrap_or_default();
    println!(
        "# resolved recipe (scale ratio {})\n{yaml}",
        after.scale_ratio
    );
    let clock = after.clock().map_err(|e| after.source.locate(e))?;
    println!(
        "# time parameters: {} batches per epoch of {} samples; run {} batches (scale ratio {})",
        clock.batches_per_epoch,
        clock.samples_per_batch,
        clock.max_batches.unwrap_or(0),
        after.scale_ratio
    );
    let rows_before = before.time_rows();
    let rows_after = after.time_rows();
    let mut table = vec![[
        "key",
        "owner",
        "policy",
        "before",
        "after",
        "after (batches)",
    ]
    .map(String::from)
    .to_vec()];
    for (b, a) in rows_before.iter().zip(&rows_after) {
        let batches = match a.time.to_batches(&clock) {
            Ok(n) => n.to_string(),
            Err(e) => format!("error: {e}"),
        };
        table.push(vec![
            a.key.clone(),
            a.owner.clone(),
            a.policy.to_string(),
            b.time.to_string(),
            a.time.to_string(),
            batches,
        ]);
    }
    print!("{}", format_table(&table));
    println!("\n# model: {} trained parameters", model.trainable);
    for r in &model.rewrites {
        println!("# surgery {r}");
    }
    Ok(())
}

fn format_table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The registry, grouped by kind, one line per plugin.
pub fn list(examples: bool) -> String {
    let mut out = String::new();
    for kind in Kind::ALL {
        out.push_str(&format!("{}s:\n", kind.name()));
        let plugins = registered(kind);
        let w = plugins.iter().map(|p| p.name.len()).max().unwrap_or(0);
        for p in plugins {
            out.push_str(&format!("  {:<w$}  {}\n", p.name, p.description));
            if examples {
                for l in p.example.lines() {
                    out.push_str(&format!("  {:<w$}    {l}\n", ""));
                }
            }
        }
        out.push('\n');
    }
    out
}
