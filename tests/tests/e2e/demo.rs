//! The README's first command, run the way a newcomer runs it but non-interactively: it builds
//! (cached), starts its own control plane and Hub simulator, installs the agent from deploy/,
//! waits until both sample deployments are healthy on the Hub, carries out every request the
//! live view suggests (each printed as a `curl` command) with its outcome, and tears down.

use std::{path::Path, time::Duration};

#[tokio::test]
async fn the_first_command_of_the_readme_runs_the_whole_agent() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let started = std::time::Instant::now();
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(root.join("demo/run.sh"))
        .arg("--check")
        .current_dir(&root)
        .kill_on_drop(true);
    // As from a person's shell: without what cargo set for this test (its package name,
    // manifest directory, version). ring's build script asks cargo to rerun it when those
    // change, so the demo's `cargo build` would rebuild ring, rustls and everything above
    // them, and so would the next build from a shell.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_tests) {
            command.env_remove(name);
        }
    }
    let run = tokio::time::timeout(Duration::from_secs(600), command.output()).await??;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo/run.sh --check failed:\n{stdout}\n{stderr}");
    for expected in [
        "both deployments healthy on the Hub",
        "new values web: healthy",
        "upgrade api: healthy",
        "break it (no such chart version) api: error",
        "uninstall web: uninstalled",
        "grpcurl ListReleases with the operator certificate answered",
        "Try next",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    for line in stdout.lines().filter(|l| l.contains(" after ")) {
        eprintln!("{line}");
    }
    eprintln!("demo/run.sh --check took {:.1?} in all", started.elapsed());
    Ok(())
}

/// The variables `cargo test` sets for a test process (the package's metadata and paths), as
/// opposed to those a person sets (`CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_BUILD_*`).
fn set_by_cargo_for_tests(name: &str) -> bool {
    ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_TARGET_TMPDIR" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

#[test]
fn the_demo_runs_without_the_variables_cargo_sets_for_this_test() {
    assert!(set_by_cargo_for_tests("CARGO_PKG_NAME"));
    assert!(set_by_cargo_for_tests("CARGO_MANIFEST_DIR"));
    assert!(set_by_cargo_for_tests("CARGO_BIN_EXE_demo"));
    assert!(!set_by_cargo_for_tests("CARGO_HOME"));
    assert!(!set_by_cargo_for_tests("CARGO_TARGET_DIR"));
    // This process is one cargo started: the variables ring's build script watches are set.
    assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
}
