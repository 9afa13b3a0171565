//! Drift-repair latency of a running agent, for benches/agent.sh: edits a managed file N
//! times and measures, for each edit, how long until the agent has put the content back.
//!
//! usage: drift_latency FILE EXPECTED_CONTENT N

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, file, expected, n] = &args[..] else {
        eprintln!("usage: drift_latency FILE EXPECTED_CONTENT N");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N is a number");
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        std::fs::write(file, format!("edit {i}\n")).expect("editing the managed file");
        loop {
            if std::fs::read_to_string(file).is_ok_and(|c| &c == expected) {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                eprintln!("edit {i} was not repaired within 30 s");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        took.push(start.elapsed());
        // Let the agent finish its verify pass before the next edit.
        std::thread::sleep(Duration::from_millis(5));
    }
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 * p).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "drift repair over {n} edits: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3
    );
}
