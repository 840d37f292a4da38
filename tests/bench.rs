//! `recipe bench throughput` measures a real model and reports clean errors for bad arguments.

mod common;
use common::*;

#[test]
fn throughput_reports_rate_split_and_memory() {
    let o = run(&[
        "bench",
        "throughput",
        "--model",
        "{name: small_cnn, channels: [4, 8]}",
        "--input",
        "1x12x12",
        "--batch",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]);
    let s = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        s.contains("images/s")
            && s.contains("forward")
            && s.contains("backward")
            && s.contains("optimizer")
            && s.contains("peak RSS"),
        "{s}"
    );
    let words: Vec<&str> = s.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.starts_with("images/s"))
        .unwrap_or(0);
    let rate: f64 = words
        .get(at.wrapping_sub(1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    assert!(rate > 0.0, "{s}");
}

#[test]
fn bad_benchmark_arguments_are_explained() {
    for (args, want) in [
        (
            vec!["--model", "small_cnn", "--input", "28x28"],
            "channels x height x width",
        ),
        (
            vec!["--model", "nosuchmodel"],
            "unknown model `nosuchmodel`",
        ),
        (
            vec!["--model", "{name: small_cnn, chanels: [4]}"],
            "did you mean `channels`",
        ),
        (vec!["--model", "small_cnn", "--batch", "0"], "at least 1"),
    ] {
        let mut a = vec!["bench", "throughput"];
        a.extend(args.iter());
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}
