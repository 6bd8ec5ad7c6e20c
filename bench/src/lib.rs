//! Shared pieces of the benchmarks: result tables, percentiles, process memory.

use std::time::Duration;

/// One row of a result table.
pub struct Row {
    /// What was measured.
    pub name: String,
    /// The measured value, formatted.
    pub value: String,
    /// The baseline it is compared with, formatted.
    pub baseline: String,
    /// value / baseline (or the ratio the target is about).
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met (`None` when there is no target).
    pub met: Option<bool>,
}

/// Prints rows as a Markdown table.
pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n## {title}\n");
    println!("| measurement | value | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            r.value,
            r.baseline,
            r.ratio.map_or("".into(), |x| format!("{x:.2}")),
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        );
    }
}

/// The `p`-th percentile (0..=100) of `samples` (sorted here).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// Peak resident memory of a process in MiB (`VmHWM` from /proc).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Formats a rate.
pub fn per_sec(n: f64) -> String {
    format!("{n:.0}/s")
}

/// A binary next to the running one (the release build of another crate).
pub fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (make bench builds every binary)",
        path.display()
    );
    Ok(path)
}
