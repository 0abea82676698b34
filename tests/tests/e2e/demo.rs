//! The README's first command, run the way a newcomer runs it but non-interactively: it builds
//! (cached), starts its own control plane and Hub simulator, installs the agent from deploy/,
//! waits until both sample deployments are healthy on the Hub, carries out every request the
//! live view suggests (each printed as a `curl` command) with its outcome, and tears down.

use std::{path::Path, time::Duration};

#[tokio::test]
async fn the_first_command_of_the_readme_runs_the_whole_agent() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let started = std::time::Instant::now();
    let run = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new("bash")
            .arg(root.join("demo/run.sh"))
            .arg("--check")
            .current_dir(&root)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
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
