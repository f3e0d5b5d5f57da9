//! Tests that need a process of their own, in the one test binary.
//!
//! Every integration test is a module of one crate, so they share one process and run on
//! parallel threads. A test that depends on process-wide state staying still (host-memory
//! counters, the process-wide sum of prefetch counters, the calibration cache, environment
//! variables, the logger, Burn's per-device settings) starts with
//! [`own_process!`](crate::common::own_process): there the test binary runs again, in a child
//! process, with the test's exact name as its only filter, and the test's body runs in that
//! child alone. The parent's test passes only when the child ran exactly that test and it
//! passed. The child's stderr is the parent's (so a skip reason written there shows as
//! before); its stdout, less the test harness's own lines, goes to the parent's (captured)
//! output.

use std::process::{Command, Stdio};

/// The reason of every test that reads `host_memory_stats` (live bytes, allocations).
pub const COUNTS_HOST_MEMORY: &str = "host_memory_stats counts every host buffer in the process";

/// Set in the child process to the name of the one test it runs.
pub const CHILD_ENV: &str = "BURN_OFFLOAD_TEST_CHILD";

/// Runs the calling test in a process of its own; `reason` says which process-wide state it
/// needs for itself (shown if the child fails).
///
/// ```ignore
/// #[test]
/// fn counts_host_memory() {
///     common::own_process!(common::process::COUNTS_HOST_MEMORY);
///     // ... the test's body, run in the child process only
/// }
/// ```
macro_rules! own_process {
    ($reason:expr) => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        if !$crate::common::process::runs_here(path, $reason) {
            return;
        }
    }};
}
pub(crate) use own_process;

/// The test harness's name of the test function at `path` (`it::memory::foo` -> `memory::foo`:
/// the crate's name is not part of it).
pub fn test_name(path: &str) -> &str {
    path.split_once("::").map_or(path, |(_, name)| name)
}

/// True in the child process that runs the test at `path` (the test goes on there); in any
/// other process, runs that child, checks it ran the test and passed, and returns false (the
/// test returns: it has run).
pub fn runs_here(path: &str, reason: &str) -> bool {
    let name = test_name(path);
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the path of this test binary");
    let output = Command::new(exe)
        .args([
            name,
            "--exact",
            "--nocapture",
            "--format=terse",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, name)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{name}: starting its own process ({reason}): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ran = stdout
        .lines()
        .any(|line| line.starts_with("test result: ok. 1 passed;"));
    assert!(
        output.status.success() && ran,
        "{name} failed in its own process ({reason}): {}\n{stdout}",
        output.status
    );
    for line in stdout.lines().filter(|line| !is_harness_line(line)) {
        println!("{line}");
    }
    false
}

/// The lines the test harness prints of its own in the child (terse format: a dot for the
/// test, its summary).
fn is_harness_line(line: &str) -> bool {
    matches!(line, "" | "." | "running 1 test") || line.starts_with("test result: ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_runs_in_a_child_process_that_runs_this_test_alone() {
        own_process!("checks own_process! itself");
        // Only the child gets here: it was started for this test, by name.
        assert_eq!(
            std::env::var(CHILD_ENV).as_deref(),
            Ok(
                "common::process::tests::the_body_runs_in_a_child_process_that_runs_this_test_alone"
            )
        );
    }

    #[test]
    fn a_child_that_ran_no_test_fails_the_parent() {
        // A name no test has: the child runs nothing and exits 0, which must not pass.
        let result = std::panic::catch_unwind(|| {
            runs_here(
                "it::common::process::tests::no_such_test",
                "a test of the check",
            )
        });
        assert!(result.is_err(), "a child that ran no test passed");
    }
}
