//! Mutual TLS on every gRPC call: refusals of callers without the right certificate, each shown
//! with `grpcurl` and with a Rust client, and certificate rotation under load without a failed
//! call or a restart.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agent_executor::pki::{Authority, LeafSpec};
use agent_runtime::tls::{Credentials, Role, TlsFiles};
use distr_agent_e2e::{
    AgentProcess,
    agent::{Agent, AgentOptions, deployment, revision},
    charts,
    install::OperatorCert,
    tools, wait_for,
};
use distr_agent_proto::v1::{self as pb, executor_client::ExecutorClient};
use k8s_openapi::api::core::v1::Secret;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};

const MINUTE: Duration = Duration::from_secs(60);

/// What a client presents: PEM certificate and key, or nothing.
struct ClientCert {
    cert: String,
    key: String,
}

/// Files for grpcurl.
fn write_cert(dir: &Path, name: &str, cert: &ClientCert) -> anyhow::Result<(String, String)> {
    std::fs::create_dir_all(dir)?;
    let cert_file = dir.join(format!("{name}.crt"));
    let key_file = dir.join(format!("{name}.key"));
    std::fs::write(&cert_file, &cert.cert)?;
    std::fs::write(&key_file, &cert.key)?;
    Ok((cert_file.display().to_string(), key_file.display().to_string()))
}

/// A Rust client that trusts `ca_pem`, presents `client` (unchecked, so a bad certificate
/// reaches the server), and expects the executor's identity of `namespace`.
fn raw_client(
    addr: &str,
    ca_pem: &str,
    client: Option<&ClientCert>,
    namespace: &str,
) -> anyhow::Result<ExecutorClient<Channel>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca?)?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client {
        Some(client) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(client.cert.as_bytes()).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(client.key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(Role::Executor.identity(namespace))?.to_owned();
    let addr = addr.to_owned();
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_static("http://executor")
        .timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connect);
    Ok(ExecutorClient::new(channel))
}

fn count(process: &AgentProcess, needle: &str) -> usize {
    process.log_text().lines().filter(|l| l.contains(needle)).count()
}

/// Waits until the process has logged `needle` more than `before` times.
async fn logged_again(process: &AgentProcess, needle: &str, before: usize) -> anyhow::Result<String> {
    wait_for(
        &format!("{} to log {needle:?}", process.name),
        Duration::from_secs(10),
        || async {
            let text = process.log_text();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
            (lines.len() > before).then(|| lines[lines.len() - 1].to_owned())
        },
    )
    .await
}

fn files_of(secret: &Secret) -> TlsFiles {
    let data = secret.data.clone().unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| v.0.clone()).unwrap_or_default();
    TlsFiles {
        cert_chain: get("tls.crt"),
        key: get("tls.key"),
        ca_bundle: get("ca.crt"),
    }
}

/// The README's debugging commands are the ones the tests run: the same `kubectl get secret`
/// and the same grpcurl flags (the tests reach the executor on its own address; the README
/// through a port-forward to localhost:9443).
#[test]
fn the_readme_debugging_commands_are_the_ones_the_tests_run() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let namespace = "<namespace>";
    let request = format!("    kubectl {}\n", OperatorCert::request_args(namespace).join(" "));
    assert!(readme.contains(&request), "README.md lacks the line\n{request}");
    for key in OperatorCert::FILES {
        let args: Vec<String> = OperatorCert::kubectl_args(namespace, key)
            .into_iter()
            .map(|a| if a.contains('{') { format!("'{a}'") } else { a })
            .collect();
        let line = format!("    kubectl {} | base64 -d >{key}\n", args.join(" "));
        assert!(readme.contains(&line), "README.md lacks the line\n{line}");
    }
    let flags = OperatorCert {
        dir: std::path::PathBuf::new(),
    }
    .grpcurl_flags(namespace)
    .join(" ");
    for call in ["list", "distr.agent.v1.Executor/ListReleases"] {
        let line = format!("    grpcurl {flags} localhost:9443 {call}\n");
        assert!(readme.contains(&line), "README.md lacks the line\n{line}");
    }
    Ok(())
}

#[tokio::test]
async fn callers_without_the_right_certificate_are_refused() -> anyhow::Result<()> {
    let test = "mtls-refusals";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let ns = agent.ns.name.clone();
    let dir = distr_agent_e2e::TestEnv::get().test_dir(test).join("certs");
    let addr = agent.executor_addr.clone();

    // The operator: reflection lists the services, read-only calls answer.
    let operator = OperatorCert::fetch(&agent.ns, dir.join("operator")).await?;
    let flags = operator.grpcurl_flags(&ns);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let list = tools::grpcurl(&[&flags[..], &[&addr, "list"]].concat())
        .await?
        .ok("grpcurl list")?;
    assert!(list.stdout.contains("distr.agent.v1.Executor"), "{}", list.stdout);
    let releases = tools::grpcurl(&[&flags[..], &[&addr, "distr.agent.v1.Executor/ListReleases"]].concat())
        .await?
        .ok("ListReleases as the operator")?;
    eprintln!("ListReleases as the operator: {}", releases.stdout.trim());
    // ... but the operator may not drive the executor.
    let sync = tools::grpcurl(&[&flags[..], &["-d", "{}", &addr, "distr.agent.v1.Executor/Sync"]].concat()).await?;
    assert!(!sync.success && sync.stderr.contains("PermissionDenied"), "{sync:?}");

    let ca_pem = std::fs::read_to_string(operator.dir.join("ca.crt"))?;
    let operator_cert = ClientCert {
        cert: std::fs::read_to_string(operator.dir.join("tls.crt"))?,
        key: std::fs::read_to_string(operator.dir.join("tls.key"))?,
    };
    let mut ok = raw_client(&addr, &ca_pem, Some(&operator_cert), &ns)?;
    ok.list_releases(pb::ListReleasesRequest {}).await?;

    // The callers to refuse: no certificate, another CA's, the updater's for Sync, an expired one.
    let stranger_ca = Authority::generate(&ns, Duration::from_secs(86_400), SystemTime::now())?;
    let spec = LeafSpec::for_role(Role::Poller, &ns);
    let stranger = stranger_ca.issue(&spec, Duration::from_secs(3600), SystemTime::now())?;
    let stranger = ClientCert {
        cert: stranger.cert_pem,
        key: stranger.key_pem,
    };
    let ca_secret: Secret = agent.ns.api().get("distr-agent-ca").await?;
    let ca_data = ca_secret.data.unwrap_or_default();
    let text = |k: &str| String::from_utf8(ca_data.get(k).map(|v| v.0.clone()).unwrap_or_default());
    let our_ca = Authority::from_pem(&text("tls.crt")?, &text("tls.key")?)?;
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    let expired = our_ca.issue(&spec, Duration::from_secs(3600), two_days_ago)?;
    let expired = ClientCert {
        cert: expired.cert_pem,
        key: expired.key_pem,
    };
    let updater_dir = &agent.tls_dirs["updater"];
    let updater = ClientCert {
        cert: std::fs::read_to_string(updater_dir.join("tls.crt"))?,
        key: std::fs::read_to_string(updater_dir.join("tls.key"))?,
    };

    let sync_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec![
            // A refused handshake is retried by grpcurl until this runs out.
            "-connect-timeout".into(),
            "2".into(),
            "-cacert".into(),
            operator.dir.join("ca.crt").display().to_string(),
            "-servername".into(),
            format!("distr-agent-executor.{ns}.svc"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([
            "-d".into(),
            "{}".into(),
            addr.clone(),
            "distr.agent.v1.Executor/Sync".into(),
        ]);
        args
    };
    let cases: [(&str, Option<&ClientCert>, &str); 4] = [
        ("no client certificate", None, "TLS handshake refused"),
        ("another CA", Some(&stranger), "refused a client certificate"),
        ("expired", Some(&expired), "refused a client certificate"),
        ("the updater calling Sync", Some(&updater), "refused a gRPC call"),
    ];
    for (case, cert, logged) in cases {
        let extra: Vec<String> = match cert {
            Some(cert) => {
                let (c, k) = write_cert(&dir, &case.replace(' ', "-"), cert)?;
                vec!["-cert".into(), c, "-key".into(), k]
            }
            None => Vec::new(),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let before = count(&agent.executor, logged);
        let args = sync_args(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = tools::grpcurl(&args).await?;
        assert!(!run.success, "grpcurl with {case} was not refused: {run:?}");
        let line = logged_again(&agent.executor, logged, before).await?;
        eprintln!("grpcurl, {case}: {}\n  executor: {line}", run.stderr.trim());

        let before = count(&agent.executor, logged);
        let mut client = raw_client(&addr, &ca_pem, cert, &ns)?;
        let refused = client
            .sync(pb::SyncRequest::default())
            .await
            .expect_err("a refused caller");
        if case == "the updater calling Sync" {
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
            assert!(
                line.contains(&Role::Updater.identity(&ns)),
                "the log names the presented identity: {line}"
            );
        }
        logged_again(&agent.executor, logged, before).await?;
        eprintln!("rust client, {case}: {:?} {}", refused.code(), refused.message());
    }
    // The presented identity is named for certificates that are refused too, never the
    // certificate itself.
    let log = agent.executor.log_text();
    assert!(
        log.contains(&format!("presented={}", Role::Poller.identity(&ns))) || log.contains(&Role::Poller.identity(&ns))
    );
    assert!(!log.contains("BEGIN CERTIFICATE") && !log.contains("PRIVATE KEY"));
    Ok(())
}

#[tokio::test]
async fn certificates_rotate_under_load_without_a_failed_call() -> anyhow::Result<()> {
    let test = "mtls-rotation";
    let lifetime = 30;
    let mut agent = Agent::start(
        test,
        AgentOptions {
            executor_env: vec![
                ("AGENT_TLS_LEAF_LIFETIME_SECONDS", lifetime.to_string()),
                // The CA rotates too: its successor is trusted 5 s before it signs, and the
                // old CA leaves the bundle when it expires.
                ("AGENT_TLS_CA_LIFETIME_SECONDS", "75".into()),
                ("AGENT_TLS_CA_PROPAGATION_SECONDS", "5".into()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let chart = charts::push_web_chart(test, "rotation-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent.wait_status(&revision(&web), "healthy", "", MINUTE).await?;

    // Watch the poller's Secret rotate, and time until the executor sees the new certificate.
    let secrets = agent.ns.api::<Secret>();
    let serial = |secret: &Secret| Credentials::from_files(files_of(secret), &agent.ns.name).map(|c| c.serial);
    let mut current = serial(&secrets.get("distr-agent-poller-tls").await?)?;
    let rotations = 3;
    let mut figures = Vec::new();
    for _ in 0..rotations {
        let started = Instant::now();
        let next = wait_for(
            "the poller certificate to rotate",
            Duration::from_secs(2 * lifetime),
            || async {
                let secret = secrets.get("distr-agent-poller-tls").await.ok()?;
                serial(&secret).ok().filter(|s| *s != current)
            },
        )
        .await?;
        let rotated = Instant::now();
        let needle = format!("serial {next}");
        wait_for(
            "the executor to see the new poller certificate",
            Duration::from_secs(30),
            || async { agent.executor.log_text().contains(&needle).then_some(()) },
        )
        .await?;
        figures.push((rotated - started, rotated.elapsed()));
        current = next;
    }
    // The CA handed over to its successor, and the expired one left the trust bundle.
    for (what, needle) in [
        ("the successor CA to sign", "signs from now on"),
        (
            "the expired CA to leave the bundle",
            "brought the trust bundle up to date",
        ),
    ] {
        wait_for(what, Duration::from_secs(90), || async {
            agent.executor.log_text().contains(needle).then_some(())
        })
        .await?;
    }
    for (i, (wait, in_use)) in figures.iter().enumerate() {
        eprintln!(
            "rotation {}: issued after {wait:?}; the poller's new certificate in use {in_use:?} later",
            i + 1
        );
    }

    // No call failed, and nothing restarted: the poller never reported the executor
    // unreachable, and the Hub saw no error.
    let failures: Vec<String> = agent
        .poller
        .log_text()
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("executor"))
        .map(str::to_owned)
        .collect();
    assert!(failures.is_empty(), "failed calls during rotation: {failures:#?}");
    let errors: Vec<_> = agent
        .statuses(&revision(&web))
        .into_iter()
        .filter(|s| s.status_type == "error")
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(
        count(&agent.poller, "loaded TLS credentials") > rotations,
        "the poller reloaded"
    );
    assert!(
        count(&agent.updater, "loaded TLS credentials") > rotations,
        "the updater reloaded"
    );
    assert!(agent.poller.is_running() && agent.executor.is_running() && agent.updater.is_running());
    Ok(())
}

/// The executor watches its certificate Secrets: one deleted (or altered) by someone is issued
/// again at once, without waiting for the periodic check (an hour here). (That the steady state
/// reads none of them from the API is not shown here: the benchmark's audit of the API
/// server's requests, `tests/src/bench`, counts them.)
#[tokio::test]
async fn a_deleted_certificate_secret_is_issued_again_at_once() -> anyhow::Result<()> {
    let options = AgentOptions {
        executor_env: vec![("AGENT_TLS_CHECK_SECONDS", "3600".to_owned())],
        ..AgentOptions::default()
    };
    let agent = Agent::start("mtls-restore", options).await?;
    let secrets = agent.ns.api::<Secret>();
    let name = "distr-agent-poller-tls";
    let uid_of = |secret: Secret| secret.metadata.uid.unwrap_or_default();
    let before = wait_for("the poller certificate", MINUTE, || async {
        secrets.get_opt(name).await.ok()?.map(uid_of)
    })
    .await?;
    secrets.delete(name, &Default::default()).await?;
    let deleted_at = Instant::now();
    let after = wait_for("the poller certificate issued again", MINUTE, || async {
        secrets
            .get_opt(name)
            .await
            .ok()?
            .map(uid_of)
            .filter(|uid| *uid != before)
    })
    .await?;
    eprintln!(
        "deleted -> issued again: {} ms (periodic check: 3600 s)",
        deleted_at.elapsed().as_millis()
    );
    assert_ne!(after, before);
    Ok(())
}

/// A person gets an operator certificate only by asking (an empty Secret, the README's
/// `kubectl create secret generic`); it lives as long as configured, is not renewed, and its
/// Secret is deleted once it has expired; asking again gives a new one.
#[tokio::test]
async fn the_operator_certificate_is_issued_on_request_and_removed_once_expired() -> anyhow::Result<()> {
    let lifetime = 30;
    let options = AgentOptions {
        executor_env: vec![("AGENT_TLS_OPERATOR_LIFETIME_SECONDS", lifetime.to_string())],
        ..AgentOptions::default()
    };
    let agent = Agent::start("mtls-operator-on-request", options).await?;
    let secrets = agent.ns.api::<Secret>();
    let name = "distr-agent-operator-tls";
    // The harness asked, as a person does: the Secret is filled with a short-lived certificate.
    let issued = wait_for("the requested operator certificate", MINUTE, || async {
        let secret = secrets.get_opt(name).await.ok()??;
        Credentials::from_files(files_of(&secret), &agent.ns.name).ok()
    })
    .await?;
    let left = issued.remaining();
    eprintln!("operator certificate issued, valid for {} s more", left.as_secs());
    assert!(left <= Duration::from_secs(lifetime), "valid for {left:?}");
    assert_eq!(
        agent_runtime::tls::PeerIdentity::from_certificate(&first_der(&issued.files.cert_chain)?, &agent.ns.name).role,
        Some(Role::Operator)
    );

    // Expired: the Secret goes, and nothing issues another one unasked.
    let started = Instant::now();
    wait_for("the expired operator Secret to be deleted", MINUTE, || async {
        secrets.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await?;
    eprintln!("operator Secret deleted {:?} after the wait began", started.elapsed());
    assert!(
        agent
            .executor
            .log_text()
            .contains("the operator certificate expired; removed its Secret"),
        "the executor says why the Secret went"
    );
    // A window, not a condition: the check runs every second here, so three seconds without
    // a new Secret show that an expired certificate is not renewed unasked.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        secrets.get_opt(name).await?.is_none(),
        "an operator certificate was issued unasked"
    );

    // Asking again gives a new certificate.
    OperatorCert::request(&agent.ns.name).await?;
    let again = wait_for("a new operator certificate", MINUTE, || async {
        let secret = secrets.get_opt(name).await.ok()??;
        Credentials::from_files(files_of(&secret), &agent.ns.name).ok()
    })
    .await?;
    assert_ne!(again.serial, issued.serial);
    Ok(())
}

fn first_der(pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    let der = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| anyhow::anyhow!("no certificate"))??;
    Ok(der.to_vec())
}

/// Revoking a leaked leaf: the README's procedure replaces the CA (delete `distr-agent-ca`).
/// The executor makes a new CA and issues every leaf again; once the new bundle is mounted,
/// no call fails, and the old certificates are refused.
#[tokio::test]
async fn replacing_the_ca_revokes_the_old_certificates() -> anyhow::Result<()> {
    let test = "mtls-revoke";
    let mut options = AgentOptions::default();
    // An unchanged status is posted again every 2 s, so a post shows a working call soon.
    options
        .poller_env
        .push(("AGENT_STATUS_REFRESH_SECONDS", "2".to_owned()));
    let agent = Agent::start(test, options).await?;
    let chart = charts::push_web_chart(test, "revoke-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent.wait_status(&revision(&web), "healthy", "", MINUTE).await?;
    // The leaked certificate: the operator's, taken as the README says.
    let leaked_dir = distr_agent_e2e::TestEnv::get().test_dir(test).join("leaked");
    let leaked = OperatorCert::fetch(&agent.ns, leaked_dir).await?;
    let leaked_ca = std::fs::read_to_string(leaked.dir.join("ca.crt"))?;
    let leaked_cert = ClientCert {
        cert: std::fs::read_to_string(leaked.dir.join("tls.crt"))?,
        key: std::fs::read_to_string(leaked.dir.join("tls.key"))?,
    };
    let addr = agent.executor_addr.clone();
    raw_client(&addr, &leaked_ca, Some(&leaked_cert), &agent.ns.name)?
        .list_releases(pb::ListReleasesRequest::default())
        .await?;

    // The README's procedure.
    let deleted = Instant::now();
    let args = ["-n", agent.ns.name.as_str(), "delete", "secret", "distr-agent-ca"];
    distr_agent_e2e::install::kubectl(&args, None)
        .await?
        .ok("kubectl delete secret distr-agent-ca")?;

    // The new bundle reaches the poller's and the updater's mounts, and each loads it.
    let mut settled = Vec::new();
    for role in ["poller", "updater"] {
        let dir = agent.tls_dirs[role].clone();
        wait_for(
            &format!("the new trust bundle in the {role}'s mount"),
            MINUTE,
            || async {
                let bundle = std::fs::read_to_string(dir.join("ca.crt")).ok()?;
                (bundle != leaked_ca).then_some(())
            },
        )
        .await?;
        settled.push((role, deleted.elapsed()));
    }
    let poller_log_at = agent.poller.log_text().len();
    let (poller_loaded, updater_loaded) = (
        count(&agent.poller, "loaded TLS credentials"),
        count(&agent.updater, "loaded TLS credentials"),
    );
    logged_again(&agent.poller, "loaded TLS credentials", poller_loaded.saturating_sub(1)).await?;
    logged_again(
        &agent.updater,
        "loaded TLS credentials",
        updater_loaded.saturating_sub(1),
    )
    .await?;

    // From then on the poller's calls succeed: a status posted after the new bundle was in
    // place is healthy, and the poller logged no failed call to the executor meanwhile.
    let since = chrono::Utc::now();
    agent.wait_status(&revision(&web), "healthy", "", MINUTE).await?;
    wait_for("a status posted with the new certificates", MINUTE, || async {
        agent
            .statuses(&revision(&web))
            .into_iter()
            .any(|s| s.received_at > since && s.status_type == "healthy")
            .then_some(())
    })
    .await?;
    let settled_at = deleted.elapsed();
    let after: Vec<String> = agent.poller.log_text()[poller_log_at..]
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("executor"))
        .map(str::to_owned)
        .collect();
    assert!(
        after.is_empty(),
        "failed calls after the new bundle was mounted: {after:#?}"
    );
    for (role, took) in &settled {
        eprintln!(
            "CA replaced: the {role}'s mount holds the new bundle {} ms after the delete",
            took.as_millis()
        );
    }
    eprintln!(
        "a status posted through the new certificates {} ms after the delete",
        settled_at.as_millis()
    );

    // The leaked certificate no longer opens a connection, even to a client that trusts the
    // new CA (so the refusal is the executor's, not the client's).
    let new_ca = std::fs::read_to_string(agent.tls_dirs["poller"].join("ca.crt"))?;
    let refused = raw_client(&addr, &new_ca, Some(&leaked_cert), &agent.ns.name)?
        .list_releases(pb::ListReleasesRequest::default())
        .await;
    match refused {
        Ok(_) => anyhow::bail!("the old operator certificate still works after the CA was replaced"),
        Err(status) => eprintln!("the old certificate is refused: {status}"),
    }
    Ok(())
}
