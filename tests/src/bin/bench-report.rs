//! `cargo run --release -p syncbridge-tests --bin bench-report [RESULTS_DIR [OUT_DIR]]`: the
//! last step of `make bench`. Reads the benches' result files (default
//! `<target>/bench-results/`, or `$SB_BENCH_RESULTS_DIR`) and writes `REPORT.md` with its
//! PNG plots (default `bench-report/` in the repository, or `$SB_BENCH_REPORT_DIR`).

use std::path::PathBuf;
use std::process::ExitCode;

use syncbridge_tests::bench_report::render;
use syncbridge_tests::bench_results::results_dir;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let results = args.next().map(PathBuf::from).unwrap_or_else(results_dir);
    let out = args
        .next()
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("SB_BENCH_REPORT_DIR").map(PathBuf::from))
        .unwrap_or_else(|| syncbridge_tests::paths::repo_root().join("bench-report"));
    match render(&results, &out) {
        Ok(done) => {
            println!(
                "report: {} ({} plots{})",
                done.report.display(),
                done.images.len(),
                if done.missing.is_empty() {
                    String::new()
                } else {
                    format!("; no results yet for {}", done.missing.join(", "))
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-report: {e:#}");
            ExitCode::FAILURE
        }
    }
}
