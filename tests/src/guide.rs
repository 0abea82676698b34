//! The operator's guide (`docs/operator-guide.md`) as tests run it: each shell block marked
//! `<!-- run: <id> -->` is taken from the file as it is, its placeholders filled, and run with
//! `bash` as the cluster admin, with the test environment's `kubectl`, `helm` and `grpcurl` first
//! on the `PATH`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;

use crate::{TestEnv, tools::Run};

/// The guide, as users read it.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-guide.md")
}

/// A fenced code block of the guide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The id of the `<!-- run: <id> -->` marker on the line before the fence, if any.
    pub id: Option<String>,
    /// The fence's info string (`sh`, `yaml`, ...).
    pub lang: String,
    pub body: String,
}

impl Block {
    /// A shell block: what a reader pastes into a terminal.
    pub fn is_shell(&self) -> bool {
        matches!(self.lang.as_str(), "sh" | "shell" | "bash" | "console")
    }
}

/// The fenced blocks of `markdown`, in order.
pub fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut marker: Option<String> = None;
    let mut open: Option<(Option<String>, String, Vec<&str>)> = None;
    for line in markdown.lines() {
        if let Some((id, lang, body)) = open.as_mut() {
            if line.trim_start() == "```" {
                found.push(Block {
                    id: id.take(),
                    lang: std::mem::take(lang),
                    body: body.join("\n") + "\n",
                });
                open = None;
            } else {
                body.push(line);
            }
            continue;
        }
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            open = Some((marker.take(), lang.trim().to_owned(), Vec::new()));
        } else if let Some(id) = line
            .trim()
            .strip_prefix("<!-- run:")
            .and_then(|rest| rest.strip_suffix("-->"))
        {
            marker = Some(id.trim().to_owned());
        } else if !line.trim().is_empty() {
            marker = None;
        }
    }
    found
}

/// The body of the shell block marked `id`.
pub fn block(id: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path())?;
    let mut matching = blocks(&text).into_iter().filter(|b| b.id.as_deref() == Some(id));
    let found = matching
        .next()
        .with_context(|| format!("the guide has no block marked {id}"))?;
    anyhow::ensure!(matching.next().is_none(), "the guide marks two blocks {id}");
    Ok(found.body)
}

/// The placeholders the guide uses; each must be filled before a block runs.
pub const PLACEHOLDERS: [&str; 5] = [
    "<namespace>",
    "<release-name>",
    "<REVISION>",
    "<CURRENT_REVISION>",
    "<connect URL>",
];

/// The script a test runs for block `id`: `fills` replaced (placeholders, and a forwarded
/// `localhost` port by the address the process listens on), and the `kubectl port-forward`
/// lines left out (the tests reach a process on its own address).
pub fn script(id: &str, fills: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut text: String = block(id)?
        .lines()
        .filter(|line| !line.contains(" port-forward "))
        .map(|line| format!("{line}\n"))
        .collect();
    for (from, to) in fills {
        anyhow::ensure!(text.contains(from), "block {id} has no {from:?} to fill");
        text = text.replace(from, to);
    }
    for placeholder in PLACEHOLDERS {
        anyhow::ensure!(
            !text.contains(placeholder),
            "block {id}: {placeholder} left unfilled in\n{text}"
        );
    }
    Ok(text)
}

/// Runs block `id` with `fills` (see [`script`]) with `bash -e` in `dir`, as the admin; returns
/// its output whether it succeeded or not.
pub async fn run(id: &str, fills: &[(&str, &str)], dir: &Path) -> anyhow::Result<Run> {
    let script = script(id, fills)?;
    let env = TestEnv::get();
    std::fs::create_dir_all(dir)?;
    let path = format!("{}:{}", env.bin.display(), std::env::var("PATH").unwrap_or_default());
    let homes: BTreeMap<&str, PathBuf> = [
        ("HELM_CONFIG_HOME", dir.join(".helm/config")),
        ("HELM_CACHE_HOME", dir.join(".helm/cache")),
        ("HELM_DATA_HOME", dir.join(".helm/data")),
    ]
    .into();
    eprintln!("guide block {id}:\n{script}");
    let started = Instant::now();
    let output = tokio::process::Command::new("bash")
        .args(["-e", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .env("KUBECONFIG", &env.admin_kubeconfig)
        .env("SSL_CERT_FILE", &env.ca_file)
        .envs(homes)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running the guide's block {id}"))?;
    let run: Run = output.into();
    eprintln!(
        "guide block {id}: {} in {:.1?}\n{}{}",
        if run.success { "succeeded" } else { "FAILED" },
        started.elapsed(),
        run.stdout,
        run.stderr
    );
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_names_the_block_that_follows_it() {
        let text = "intro\n\n<!-- run: one -->\n```sh\nkubectl get pods\necho done\n```\n\n\
                    text between\n```yaml\nkind: Pod\n```\n<!-- run: stale -->\nprose\n```sh\nls\n```\n";
        let found = blocks(text);
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].id.as_deref(), Some("one"));
        assert_eq!(found[0].body, "kubectl get pods\necho done\n");
        assert!(found[0].is_shell());
        assert_eq!(found[1].lang, "yaml");
        assert_eq!(found[1].id, None);
        // A marker followed by prose marks nothing.
        assert_eq!(found[2].id, None);
    }
}
