//! The metrics recorder in a process of its own (this test binary), so that its memory is
//! the test's: histogram samples that nobody scrapes do not pile up.

use std::time::{Duration, Instant};

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Waits until two more upkeeps ran: the first may have begun before the samples.
fn two_upkeeps() {
    let from = termopar_core::metrics::upkeeps();
    let deadline = Instant::now() + Duration::from_secs(30);
    while termopar_core::metrics::upkeeps() < from + 2 {
        assert!(
            Instant::now() < deadline,
            "the recorder's upkeep does not run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn histogram_samples_nobody_scrapes_do_not_pile_up() {
    const ROUNDS: u64 = 7;
    const SAMPLES: u64 = 1_000_000;
    let handle = termopar_core::metrics::prometheus();
    let mut base = 0;
    for round in 0..ROUNDS {
        for i in 0..SAMPLES {
            metrics::histogram!("upkeep_test_seconds").record((i % 1000) as f64 * 1e-5);
        }
        two_upkeeps();
        if round == 1 {
            base = rss_kib();
        }
    }
    // Kept, the last five rounds' samples took ~80 MiB (~16 bytes each; measured by
    // leaving the upkeep out).
    let grown = rss_kib().saturating_sub(base);
    assert!(
        grown < 8 * 1024,
        "the process grew {grown} KiB with histogram samples nobody scraped"
    );
    // Folded into buckets, every sample is still counted.
    let text = handle.render();
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("upkeep_test_seconds_count "))
        .expect("the histogram is rendered");
    assert_eq!(count.trim(), (ROUNDS * SAMPLES).to_string());
}
