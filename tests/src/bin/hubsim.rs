//! The Hub simulator as a process of its own, with one target and an HTTP admin interface
//! (see `distr_agent_e2e::hubsim::admin`), for the demo and for trying the agent by hand.
//!
//! It writes what a client needs (the Hub's endpoints, the target id and secret, the admin
//! URL) as JSON to `--info-file`, then serves until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use distr_agent_e2e::hubsim::{HubSim, HubSimOptions, Route, admin};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "hubsim", about = "A Distr Hub simulator with one deployment target")]
struct Args {
    /// Address of the admin interface.
    #[arg(long, env = "HUBSIM_ADMIN_ADDR", default_value = "127.0.0.1:0")]
    admin_addr: SocketAddr,
    /// Where to write the endpoints, the target's id and secret, and the admin URL (JSON).
    #[arg(long, env = "HUBSIM_INFO_FILE")]
    info_file: PathBuf,
    /// The namespace the Hub names for the target's deployments.
    #[arg(long, env = "HUBSIM_NAMESPACE")]
    namespace: Option<String>,
    /// Lifetime of the JWTs it issues, in seconds.
    #[arg(long, env = "HUBSIM_TOKEN_LIFETIME_SECONDS", default_value_t = 3600)]
    token_lifetime_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = HubSimOptions {
        token_lifetime: Duration::from_secs(args.token_lifetime_seconds),
        ..Default::default()
    };
    let sim = Arc::new(HubSim::start(options).await?);
    let (target, secret) = sim.add_target();
    sim.set_namespace(target, args.namespace.as_deref());

    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding {}", args.admin_addr))?;
    let admin_url = format!("http://{}", listener.local_addr()?);
    let endpoints: serde_json::Map<String, serde_json::Value> = Route::ALL
        .iter()
        .map(|r| (r.env_var().to_owned(), json!(sim.url(*r))))
        .collect();
    let info = json!({
        "hubUrl": sim.base_url(),
        "adminUrl": admin_url,
        "targetId": target,
        "targetSecret": secret,
        "endpoints": endpoints,
    });
    let tmp = args.info_file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&info)?)?;
    std::fs::rename(&tmp, &args.info_file)?;
    eprintln!(
        "hubsim: Hub at {}, admin at {admin_url}, target {target}",
        sim.base_url()
    );

    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    axum::serve(listener, admin::router(sim.clone(), target))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
