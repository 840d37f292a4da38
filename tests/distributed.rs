//! Data-parallel training over MPI, on one machine with 2 or 3 ranks through `mpirun` (built
//! with `--features mpi`; `.ci/run` installs Open MPI): the same run as one process to float
//! rounding, bitwise repeatable, exact resume after SIGTERM, a killed, stopped or stuck rank ends
//! the job (the last two named by the others), and the checks on the batch split and the world
//! size.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// An MLP (no batch norm, so the ranks' shares add up to the whole batch exactly) on the
/// embedded mini set, with a checkpoint every 10 steps.
const DP: &str = "\
name: dp
seed: 11
max_duration: 40ba
eval_interval: 20ba
data:
  name: fashion_mnist_mini
  batch_size: 32
  train_subset: 640
  eval_subset: 203
model:
  name: mlp
  hidden: [32]
optimizer:
  name: sgd
  lr: 0.1
  momentum: 0.9
  weight_decay: 5.0e-4
schedule:
  name: cosine
  t_warmup: 4ba
callbacks:
  - name: checkpoint
    interval: 10ba
";

fn train_ranks(recipe: &Path, run_dir: &Path, n: usize, extra: &[&str]) -> Output {
    let n = n.to_string();
    let mut args = vec!["--nproc", &n];
    args.extend_from_slice(extra);
    // One thread per rank: two ranks on this machine's cores.
    let mut c = recipe_cmd();
    c.env("RAYON_NUM_THREADS", "1");
    c.args([
        "run",
        recipe.to_str().unwrap(),
        "-q",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ])
    .args(&args)
    .output()
    .unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}\n{}", stderr(o), stdout(o));
}

fn weights(run_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(
        run_dir.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
    .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The largest difference between two runs' weights, relative to each tensor's largest value.
fn max_rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    let mut worst = 0f32;
    for ((_, x), (_, y)) in a.iter().zip(b) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

#[test]
fn two_ranks_at_half_the_batch_train_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "dp.yaml", DP);
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    ok(&train(&recipe, &one, &[]));
    ok(&train_ranks(&recipe, &two, 2, &[]));
    let diff = max_rel_diff(&weights(&one), &weights(&two));
    assert!(diff <= 1e-4, "2 ranks against 1 process: {diff}");
    // The same global numbers are logged: the evaluation covers all 203 samples, sharded.
    let (la, lb) = (
        metrics(&one, "eval/accuracy"),
        metrics(&two, "eval/accuracy"),
    );
    assert_eq!(la.len(), 2);
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1.0 / 203.0, "{la:?} {lb:?}");
    }
    let (ta, tb) = (metrics(&one, "train/loss"), metrics(&two, "train/loss"));
    assert_eq!(ta.len(), 40);
    assert_eq!(tb.len(), 40, "rank 0 alone writes the log");
    for (x, y) in ta.iter().zip(&tb) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} {y}");
    }
    // The checkpoints record the world size.
    let ckpt = recipe_engine::checkpoint::latest(&two, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ckpt.meta.world_size, 2);
    assert_eq!(
        ckpt.meta.timestamp.sample,
        40 * 32,
        "samples count globally"
    );
}

#[test]
fn with_sync_batchnorm_two_ranks_train_a_resnet_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    // A ResNet: batch norm after every convolution, the running statistics in the weights.
    let text = DP
        .replace(
            "name: mlp\n  hidden: [32]",
            "name: resnet_cifar\n  depth: 8\n  width: 0.25",
        )
        .replace("max_duration: 40ba", "max_duration: 12ba");
    let plain = write_recipe(dir.path(), "bn.yaml", &text);
    let synced = write_recipe(
        dir.path(),
        "sync.yaml",
        &format!("{text}sync_batchnorm: true\n"),
    );
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let per_rank = dir.path().join("per_rank");
    ok(&train(&plain, &one, &[]));
    ok(&train_ranks(&synced, &two, 2, &[]));
    ok(&train_ranks(&plain, &per_rank, 2, &[]));
    let synced_diff = max_rel_diff(&weights(&one), &weights(&two));
    let per_rank_diff = max_rel_diff(&weights(&one), &weights(&per_rank));
    assert!(
        synced_diff <= 1e-4,
        "2 ranks with synchronised batch norm against 1 process: {synced_diff}"
    );
    // The comparison can tell: each rank normalising its own half is another computation.
    assert!(
        per_rank_diff > 10.0 * synced_diff,
        "per-rank statistics {per_rank_diff}, synchronised {synced_diff}"
    );
    // Synchronised runs repeat bitwise.
    let again = dir.path().join("again");
    ok(&train_ranks(&synced, &again, 2, &[]));
    assert_eq!(
        std::fs::read(two.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
}

#[test]
fn sync_batchnorm_refuses_a_last_batch_that_does_not_split_evenly() {
    let dir = tempfile::tempdir().unwrap();
    // 643 samples in batches of 32: a last batch of 3, which plain data parallel splits 1 + 2.
    let text = DP.replace("train_subset: 640", "train_subset: 643") + "sync_batchnorm: true\n";
    let recipe = write_recipe(
        dir.path(),
        "dp.yaml",
        &text.replace("  batch_size: 32", "  batch_size: 32\n  drop_last: false"),
    );
    let run_dir = dir.path().join("run");
    let o = train_ranks(&recipe, &run_dir, 2, &[]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("sync_batchnorm"), "{err}");
    assert!(
        err.contains("do not split evenly between 2 processes"),
        "{err}"
    );
    assert!(!run_dir.join("recipe.yaml").exists());
}

#[test]
fn two_rank_runs_with_batch_norm_are_bitwise_repeatable_and_resume_exactly_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "dp.yaml",
        // With batch norm: its running statistics must be the same on every rank, at every
        // batch, for the checkpoint (rank 0's) to be the whole job's state. Long enough after
        // the first checkpoint (19 of 20 parts of the run) for the SIGTERM below to land before
        // the end: with 1000 batches after one at 100, a faster build once finished first.
        &DP.replace("max_duration: 40ba", "max_duration: 4000ba")
            .replace("interval: 10ba", "interval: 200ba")
            .replace(
                "name: mlp\n  hidden: [32]",
                "name: small_cnn\n  channels: [4, 8]",
            ),
    );
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    ok(&train_ranks(&recipe, &a, 2, &[]));
    ok(&train_ranks(&recipe, &b, 2, &[]));
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
        "same seed, same world size: same bytes"
    );
    // Stopped by SIGTERM to the launcher, resumed with --resume latest.
    let c = dir.path().join("c");
    let child = spawn_ranks_until_a_checkpoint(&recipe, &c, &[]);
    signal("-TERM", child.id());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        !c.join("model.safetensors").exists(),
        "stopped before the end"
    );
    // One report, from rank 0, with the command that starts the same job again.
    assert_eq!(err.matches("interrupted by SIGTERM").count(), 1, "{err}");
    let resume = err
        .lines()
        .find(|l| l.starts_with("resume with: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(resume.contains("--nproc 2"), "{resume}");
    ok(&train_ranks(&recipe, &c, 2, &["--resume", "latest"]));
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(c.join("model.safetensors")).unwrap(),
        "the resumed run ends on the uninterrupted run's bytes"
    );
    // Another world size is refused, with the difference named; --force goes on.
    let o = train(&recipe, &c, &["--resume", "latest"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("data-parallel processes: 2 -> 1"), "{err}");
    ok(&train(&recipe, &c, &["--resume", "latest", "--force"]));
}

#[test]
fn a_killed_rank_ends_the_job_and_leaves_a_loadable_checkpoint() {
    let job = signal_a_rank("-KILL", &[]);
    assert!(!job.status.success(), "{}", job.stderr);
}

/// A rank that stops answering (SIGSTOP: alive, but never reaching the next all-reduce) would
/// hold the other in its collective for ever; the job ends after --collective-timeout, naming
/// the stopped rank's process and saying how to resume.
#[test]
fn a_stopped_rank_ends_the_job_after_the_collective_timeout() {
    let job = signal_a_rank("-STOP", &["--collective-timeout", "3"]);
    assert!(
        job.after_signal >= Duration::from_secs(3),
        "the job ended before the timeout: {:?}",
        job.after_signal
    );
    assert!(!job.status.success());
    let err = &job.stderr;
    assert!(
        err.contains("has waited") && err.contains("--collective-timeout 3"),
        "the error says what waited and for how long: {err}"
    );
    assert!(
        err.contains(&format!("pid {}): has not arrived", job.signalled)),
        "the error names the stopped process ({}): {err}",
        job.signalled
    );
    assert!(err.contains("--resume latest"), "{err}");
}

/// A rank stuck in its own work (its loader opening a training image that never comes: a FIFO,
/// as on a dead network file system) holds the two others at their all-reduce. After
/// --collective-timeout the lowest rank that has waited that long names the stuck rank's process
/// and says it is in its own work; the other waiting rank leaves the report to it.
#[test]
fn a_rank_stuck_in_its_own_work_is_named_by_the_others() {
    use recipe_engine::data::image::{encode_png, Image};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    for (split, n) in [("train", 12), ("val", 2)] {
        for (k, class) in ["a", "b"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let px: Vec<u8> = (0..16 * 16 * 3)
                    .map(|j| ((j + 40 * k + i) % 256) as u8)
                    .collect();
                let png = encode_png(&Image::new(16, 16, 3, px)).unwrap();
                std::fs::write(d.join(format!("{i:02}.png")), png).unwrap();
            }
        }
    }
    let fifo = root.join("train/a/05_never_written.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    let recipe = write_recipe(
        dir.path(),
        "stuck.yaml",
        &format!(
            "\
name: stuck
seed: 3
max_duration: 40ba
data:
  name: image_folder
  root: {}
  batch_size: 6
  train_transforms: [{{center_crop: 16}}]
  eval_transforms: [{{center_crop: 16}}]
model:
  name: small_cnn
  channels: [4]
optimizer:
  name: sgd
  lr: 0.05
",
            root.display()
        ),
    );
    let mut child = spawn_ranks(
        &recipe,
        &dir.path().join("run"),
        3,
        &["--collective-timeout", "3"],
    );
    let mut ranks = Vec::new();
    wait_for("three ranks", || {
        ranks = children(child.id());
        ranks.len() == 3
    });
    let (status, err) = job_end(&mut child, &ranks, "starting the job");
    assert!(!status.success(), "{err}");
    let named: Vec<u32> = ranks
        .iter()
        .copied()
        .filter(|p| {
            err.contains(&format!(
                "pid {p}): has not arrived; it has been in its own work"
            ))
        })
        .collect();
    assert_eq!(
        named.len(),
        1,
        "one rank is named, as stuck in its own work: {err}"
    );
    assert_eq!(
        err.matches("has waited").count(),
        1,
        "one report, from the lowest waiting rank: {err}"
    );
    assert!(
        err.contains("--collective-timeout 3") && err.contains("--resume latest"),
        "{err}"
    );
}

/// How a 2-rank job ended after one of its ranks got a signal.
struct Faulted {
    /// The process id of the rank that got the signal.
    signalled: u32,
    status: std::process::ExitStatus,
    after_signal: Duration,
    stderr: String,
}

/// Starts a long 2-rank job, sends `sig` to its second rank once a checkpoint is written, and
/// checks what every fault must leave: the job ends within 30 s, no rank is left behind, and
/// the last checkpoint loads.
fn signal_a_rank(sig: &str, extra: &[&str]) -> Faulted {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "dp.yaml",
        &DP.replace("max_duration: 40ba", "max_duration: 100000ba"),
    );
    let run_dir = dir.path().join("run");
    let mut child = spawn_ranks_until_a_checkpoint(&recipe, &run_dir, extra);
    let ranks = children(child.id());
    assert_eq!(ranks.len(), 2, "mpirun started two ranks: {ranks:?}");
    signal(sig, ranks[1]);
    let t0 = Instant::now();
    let (status, stderr) = job_end(&mut child, &ranks, &format!("kill {sig} to a rank"));
    let after_signal = t0.elapsed();
    recipe_engine::checkpoint::latest(&run_dir, &candle_core::Device::Cpu)
        .expect("the last checkpoint still loads");
    Faulted {
        signalled: ranks[1],
        status,
        after_signal,
        stderr,
    }
}

#[test]
fn a_batch_that_does_not_split_between_ranks_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "dp.yaml",
        &DP.replace("batch_size: 32", "batch_size: 33"),
    );
    let run_dir = dir.path().join("run");
    let o = train_ranks(&recipe, &run_dir, 2, &[]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("data.batch_size"), "{err}");
    assert!(
        err.contains("does not split evenly between 2 processes"),
        "{err}"
    );
    assert!(err.contains("dp.yaml"), "the error names the file: {err}");
    assert!(!run_dir.join("recipe.yaml").exists());
}

/// Starts an `n`-rank run in the background, one thread per rank (stderr piped).
fn spawn_ranks(recipe: &Path, run_dir: &Path, n: usize, extra: &[&str]) -> std::process::Child {
    recipe_cmd()
        .env("RAYON_NUM_THREADS", "1")
        .args(["run", recipe.to_str().unwrap(), "-q", "--run-dir"])
        .arg(run_dir)
        .args(["--nproc", &n.to_string()])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts a 2-rank run in the background (stderr piped) and waits for its first checkpoint.
fn spawn_ranks_until_a_checkpoint(
    recipe: &Path,
    run_dir: &Path,
    extra: &[&str],
) -> std::process::Child {
    let child = spawn_ranks(recipe, run_dir, 2, extra);
    wait_for("a checkpoint", || {
        !recipe_engine::checkpoint::list(run_dir).is_empty()
    });
    child
}

/// How a job ended after `what`: its status and stderr, once it has exited (within 30 s) and no
/// rank of it is left.
fn job_end(
    child: &mut std::process::Child,
    ranks: &[u32],
    what: &str,
) -> (std::process::ExitStatus, String) {
    let status = wait_for_exit(child, what);
    assert_no_rank_left(ranks);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

/// Sends `sig` (`-KILL`, `-STOP`, ...) to `pid`.
fn signal(sig: &str, pid: u32) {
    let s = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success(), "kill {sig} {pid}");
}

/// The job's exit status; a failure if it still runs 30 s after `what`.
fn wait_for_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the job still runs 30 s after {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every rank process has ended, within 2 s of the launcher (those still there are killed, so
/// that none outlives the test). The grace: the launcher can exit while the kernel is still
/// tearing down a rank it killed (seen once with a SIGSTOPped rank).
fn assert_no_rank_left(ranks: &[u32]) {
    let alive = || -> Vec<u32> {
        ranks
            .iter()
            .copied()
            .filter(|&p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(p))
            .collect()
    };
    let t0 = Instant::now();
    let mut left = alive();
    while !left.is_empty() && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
        left = alive();
    }
    for &p in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    assert!(left.is_empty(), "rank processes {left:?} are left behind");
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, so read after the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid && stat.contains("(recipe") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(true)
}
