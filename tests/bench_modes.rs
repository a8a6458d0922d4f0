//! `leasehold bench semaphore` and `bench fanout` run end to end against
//! the servers and redis-server they spawn, and their safety and delivery
//! figures hold: no more workers ever believe they hold a permit than the
//! semaphore has, and every watcher gets every change. (Their speed is
//! recorded in documentation/benchmarks.md, never asserted here.)

use std::process::Command;

use serde_json::Value;

/// Runs `leasehold bench ARGS --spawn --json` (bounded by `timeout`) and
/// returns its report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_leasehold"))
        .arg("bench")
        .args(args)
        .args(["--spawn", "--json", "--interleave", "1"])
        .output()
        .expect("run leasehold bench");
    assert!(
        out.status.success(),
        "bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn semaphore_scenario_never_has_more_believed_holders_than_permits() {
    let report = bench(&[
        "semaphore",
        "--permits",
        "4",
        "--workers",
        "16",
        "--hold",
        "2ms",
        "--duration",
        "1s",
    ]);
    let rows = report["rows"].as_array().expect("rows");
    // Exclusive and semaphore rows, on the memory store and on Redis.
    assert_eq!(rows.len(), 4, "{report}");
    for row in rows {
        assert_eq!(row["over_the_limit"], false, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        let limit = if row["permits"] == 0 { 1 } else { 4 };
        let most = row["max_believed_holders"].as_u64().expect("a count");
        // 16 workers holding 2 ms each fill every permit.
        assert_eq!(most, limit, "{row}");
    }
}

#[test]
fn fanout_scenario_delivers_every_change_to_every_watcher() {
    let report = bench(&[
        "fanout",
        "--watchers",
        "50",
        "--event-rate",
        "20",
        "--duration",
        "1s",
    ]);
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{report}");
    for row in rows {
        assert_eq!(row["watchers_failed"], 0, "{row}");
        assert!(row["changes"].as_u64().expect("changes") >= 5, "{row}");
        assert_eq!(row["events_delivered"], row["events_expected"], "{row}");
        assert_eq!(row["states_after_falling_behind"], 0, "{row}");
    }
}

#[test]
fn cycles_scenario_counts_all_the_cpu_of_a_cycle() {
    let report = bench(&[
        "cycles",
        "--workers",
        "4",
        "--keys",
        "1000",
        "--duration",
        "1s",
    ]);
    let rows = report["rows"].as_array().expect("rows");
    let row = |target: &str| {
        rows.iter()
            .find(|r| r["target"].as_str().is_some_and(|t| t.starts_with(target)))
            .unwrap_or_else(|| panic!("no {target} row: {report}"))
    };
    let figure = |r: &Value, k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    for r in rows {
        assert_eq!(r["errors"], 0, "{r}");
        // The load generator works for every target.
        assert!(figure(r, "load_cpu_us_per_cycle") > 0.0, "{r}");
    }
    // Redis runs scripts for the Redis store's cycles and commands for the
    // direct loop; beside the memory store it only answers health pings.
    let (mem, red, direct) = (
        row("leasehold, memory store"),
        row("leasehold, redis store"),
        row("direct redis"),
    );
    assert!(
        figure(red, "redis_cpu_us_per_cycle") > figure(mem, "redis_cpu_us_per_cycle"),
        "{report}"
    );
    assert!(figure(direct, "redis_cpu_us_per_cycle") > 0.0, "{report}");
    let by_cpu = report["ratios"]["redis_over_memory_by_cpu"]
        .as_f64()
        .unwrap_or_else(|| panic!("no CPU-bound ratio: {report}"));
    assert!(by_cpu > 0.0 && by_cpu < 1.0, "{report}");
}

#[test]
fn hot_scenario_reports_the_gaps_between_grants() {
    let report = bench(&["hot", "--workers", "8", "--duration", "1s"]);
    let rows = report["rows"].as_array().expect("rows");
    for r in rows {
        let target = r["target"].as_str().unwrap_or("");
        if !target.starts_with("leasehold") {
            continue;
        }
        assert_eq!(r["errors"], 0, "{r}");
        let handoffs = r["wait"]["count"].as_u64().expect("waits");
        assert!(handoffs > 10, "{r}");
        // Grants come one after another: some gap between two of them.
        let longest = r["longest_grant_gap_ms"].as_f64().expect("longest gap");
        assert!(longest > 0.0, "{r}");
        let over = r["grant_gaps_over_1ms"].as_u64().expect("a count");
        let total = r["grant_gaps_over_1ms_total_ms"].as_f64().expect("a total");
        // Each counted gap is over a millisecond, and none is longer than the longest.
        assert!(
            total >= over as f64 && total <= over as f64 * longest + 1e-9,
            "{r}"
        );
    }
}
