//! The agent's benchmark (`bench/run.sh` starts the control plane for each N, then this).
//!
//! - `bench run --releases N --out-dir DIR`: measures one N in the running test environment,
//!   prints its tables and writes them to `DIR/nN.md`, its figures to `DIR/nN.json`;
//! - `bench summary --out-dir DIR --report FILE`: prints the table comparing the runs in `DIR`
//!   and writes every run's tables and it to `FILE`.

// The tables are the output.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser as _;
use distr_agent_e2e::bench::{self, BenchArgs, Results, report};

#[derive(clap::Parser)]
#[command(name = "bench", about = "Benchmarks the Distr agent against the local control plane")]
enum Command {
    /// Measures one N (needs DISTR_TESTENV, started with DISTR_TESTENV_AUDIT=1).
    Run {
        #[command(flatten)]
        args: BenchArgs,
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Puts the runs of a directory together.
    Summary {
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long)]
        report: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The harness's own logs go to stderr, warnings only: stdout is for the tables.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .try_init();
    match Command::parse() {
        Command::Run { args, out_dir } => {
            let results = bench::run(&args).await?;
            let text = results.markdown();
            println!("{text}");
            std::fs::create_dir_all(&out_dir)?;
            let (markdown, json) = bench::result_files(&out_dir, args.releases);
            std::fs::write(markdown, text)?;
            std::fs::write(json, serde_json::to_vec_pretty(&results)?)?;
        }
        Command::Summary { out_dir, report } => {
            let mut runs = Vec::new();
            for entry in std::fs::read_dir(&out_dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    runs.push(serde_json::from_slice::<Results>(&text)?);
                }
            }
            runs.sort_by_key(|r| r.releases);
            let summary = report::summary(&runs);
            println!("{summary}");
            let sections: Vec<String> = runs.iter().map(Results::markdown).collect();
            std::fs::write(
                &report,
                format!("# Agent benchmark\n\n{}\n{summary}", sections.join("\n")),
            )?;
        }
    }
    Ok(())
}
