//! What the operating system says about this process (Linux `/proc`; `None` elsewhere).

fn status_mb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The resident set size of this process now, in MiB.
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

/// The peak resident set size of this process, in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}
