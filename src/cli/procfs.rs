//! What the benchmark reads about its own process from Linux's /proc: memory, CPU time, the CPU.
//! Every reader returns None (or a fallback) elsewhere.

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM` = peak RSS); None off Linux.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU seconds (user + system, every thread) this process has used, from /proc/self/stat; None off
/// Linux. Less disturbed than wall time when other work shares the cores.
pub fn cpu_seconds() -> Option<f64> {
    /// Linux reports these in USER_HZ ticks, 100 per second on every mainstream configuration.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is the 3rd field, utime the 14th, stime the 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

/// Resets the peak-RSS counter (`VmHWM`) so the next reading covers only what follows.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes as MiB for the bench's lines ("n/a" when unknown).
pub fn fmt_bytes(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".to_owned(), |b| format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0)))
}

/// The CPU's model name from /proc/cpuinfo, when there is one.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}
