//! What the operating system says about this process (Linux `/proc`, POSIX `getrusage`; `None`
//! where neither answers).

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

/// CPU time this process has used so far, user and system, in seconds (every thread). On a
/// shared machine a benchmark's CPU-seconds per image moves far less than its wall time, which
/// other processes stretch.
pub fn cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole rusage into the pointer it is given, which points at
        // one; on failure (non-zero) nothing is read.
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } == 0;
        if !ok {
            return None;
        }
        // SAFETY: getrusage succeeded, so the value is initialised.
        let u = unsafe { u.assume_init() };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Some(secs(u.ru_utime) + secs(u.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}
