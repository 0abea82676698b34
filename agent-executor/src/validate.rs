//! Checks on input from the Hub before any of it reaches Helm's command line or a Kubernetes
//! object name. The Hub is not trusted: a bad value becomes that deployment's `error` status
//! and never affects another release.
//!
//! Every value that ends up as a positional argument of `helm` must not start with `-` (it
//! would be read as a flag); values of flags are passed in the `--flag=value` form, which
//! Helm never reads as a flag, but they are checked as well.

use crate::model::{ChartSource, Deployment, RegistryCredentials, SecretString};

/// Helm's limit on release names.
pub const MAX_RELEASE_NAME_LEN: usize = 53;
const MAX_URL_LEN: usize = 2048;
const MAX_CHART_NAME_LEN: usize = 250;
const MAX_VERSION_LEN: usize = 128;

/// Why an input was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("invalid release name {name:?}: {reason}")]
    ReleaseName { name: String, reason: &'static str },
    #[error("invalid namespace {name:?}: {reason}")]
    Namespace { name: String, reason: &'static str },
    #[error("invalid chart URL {url:?}: {reason}")]
    ChartUrl { url: String, reason: &'static str },
    #[error("invalid chart name {name:?}: {reason}")]
    ChartName { name: String, reason: &'static str },
    #[error("invalid chart version {version:?}: {reason}")]
    ChartVersion { version: String, reason: &'static str },
    #[error("invalid registry user name for {host}: {reason}")]
    Username { host: String, reason: &'static str },
    #[error("invalid registryAuth host {host:?}: {reason}")]
    RegistryHost { host: String, reason: &'static str },
}

/// A release name as Helm accepts it: lower-case alphanumerics and `-`, dot-separated
/// DNS-1123 labels (Helm's own rule, so releases Helm or the earlier agent created with dots
/// stay manageable), at most 53 characters.
pub fn release_name(name: &str) -> Result<(), ValidationError> {
    let error = |reason| ValidationError::ReleaseName {
        name: truncate(name),
        reason,
    };
    if name.is_empty() {
        return Err(error("must not be empty"));
    }
    if name.len() > MAX_RELEASE_NAME_LEN {
        return Err(error("must be at most 53 characters"));
    }
    if !name.split('.').all(is_dns_label) {
        return Err(error(
            "must consist of lower case alphanumeric characters or '-', start and end with an alphanumeric character",
        ));
    }
    Ok(())
}

/// A Kubernetes namespace name: one DNS-1123 label of at most 63 characters.
pub fn namespace(name: &str) -> Result<(), ValidationError> {
    let error = |reason| ValidationError::Namespace {
        name: truncate(name),
        reason,
    };
    if name.len() > 63 {
        return Err(error("must be at most 63 characters"));
    }
    if !is_dns_label(name) {
        return Err(error("must be a DNS-1123 label"));
    }
    Ok(())
}

/// Checks the chart coordinates of a deployment and says where the chart comes from.
/// `http://` repositories are accepted only when `allow_http` is set.
pub fn chart_source(deployment: &Deployment, allow_http: bool) -> Result<ChartSource, ValidationError> {
    let url = deployment.chart_url.as_str();
    // Error messages reach logs and the Hub: never with the URL's credentials.
    let url_error = |reason| ValidationError::ChartUrl {
        url: truncate(&redact_url_credentials(url)),
        reason,
    };
    if url.is_empty() {
        return Err(url_error("must not be empty"));
    }
    if url.len() > MAX_URL_LEN {
        return Err(url_error("too long"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(url_error("must not contain whitespace or control characters"));
    }
    chart_version(&deployment.chart_version)?;
    if let Some(rest) = url.strip_prefix("oci://") {
        if userinfo(rest).is_some() {
            return Err(url_error(
                "an oci:// URL must not carry credentials (registryAuth holds them)",
            ));
        }
        let host = url_host(rest).ok_or_else(|| url_error("missing registry host"))?;
        if rest.len() <= host.len() + 1 {
            return Err(url_error("missing repository path"));
        }
        return Ok(ChartSource::Oci {
            reference: url.to_owned(),
            host: host.to_owned(),
        });
    }
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        ("https://", rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        if !allow_http {
            return Err(url_error(
                "plain http:// chart repositories are not allowed (see --allow-http-charts)",
            ));
        }
        ("http://", rest)
    } else {
        return Err(url_error("must start with oci:// or https://"));
    };
    let host = url_host(rest).ok_or_else(|| url_error("missing host"))?;
    let chart = deployment.chart_name.as_str();
    chart_name(chart)?;
    // `user:password@` moves out of the URL, which reaches Helm's command line and logs.
    let (url, url_credentials) = match userinfo(rest) {
        Some((info, after)) => {
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            let credentials = RegistryCredentials {
                username: percent_decode(user),
                password: SecretString::new(percent_decode(password)),
            };
            username(host, &credentials.username)?;
            (format!("{scheme}{after}"), Some(credentials))
        }
        None => (url.to_owned(), None),
    };
    Ok(ChartSource::Repository {
        url,
        host: host.to_owned(),
        chart: chart.to_owned(),
        url_credentials,
    })
}

/// The `user[:password]` of a URL without its scheme, and the rest after the `@`.
fn userinfo(rest: &str) -> Option<(&str, &str)> {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((&rest[..at], &rest[at + 1..]))
}

/// Decodes `%XX` escapes (as in URL user info); anything else stays as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with the credentials of every URL in it (`scheme://user:password@`) replaced by
/// `***`, for log lines and messages (Helm quotes URLs in its errors).
pub fn redact_url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (before, after) = rest.split_at(start + 3);
        out.push_str(before);
        let authority_end = after
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>'))
            .unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &after[at..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// A chart name inside a classic repository.
pub fn chart_name(name: &str) -> Result<(), ValidationError> {
    let error = |reason| ValidationError::ChartName {
        name: truncate(name),
        reason,
    };
    if name.is_empty() {
        return Err(error("required for a classic chart repository"));
    }
    if name.len() > MAX_CHART_NAME_LEN {
        return Err(error("too long"));
    }
    if name.starts_with(['-', '.']) {
        return Err(error("must not start with '-' or '.'"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(error("may only contain letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// A chart version: a semantic version or OCI tag, such as `1.4.0`, `v2.0.0-rc.1+build.5`.
pub fn chart_version(version: &str) -> Result<(), ValidationError> {
    let error = |reason| ValidationError::ChartVersion {
        version: truncate(version),
        reason,
    };
    if version.is_empty() {
        return Err(error("must not be empty"));
    }
    if version.len() > MAX_VERSION_LEN {
        return Err(error("too long"));
    }
    if version.starts_with(['-', '.', '+']) {
        return Err(error("must start with a letter or digit"));
    }
    if !version
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    {
        return Err(error("may only contain letters, digits, '-', '_', '.' and '+'"));
    }
    Ok(())
}

/// A user name passed to Helm's `--username=` for a classic repository.
pub fn username(host: &str, name: &str) -> Result<(), ValidationError> {
    if name.chars().any(char::is_control) {
        return Err(ValidationError::Username {
            host: host.to_owned(),
            reason: "must not contain control characters",
        });
    }
    Ok(())
}

/// A `registryAuth` key, as it becomes a key of a docker config (the pull Secret, Helm's
/// registry config): `host[:port]`, or a registry URL such as Docker Hub's legacy
/// `https://index.docker.io/v1/`. Nothing that could be read as something else: no control
/// characters, spaces, quotes or backslashes, at most 255 bytes.
pub fn registry_host(host: &str) -> Result<(), ValidationError> {
    let error = |reason| ValidationError::RegistryHost {
        host: truncate(&host.escape_debug().to_string()),
        reason,
    };
    if host.is_empty() {
        return Err(error("must not be empty"));
    }
    if host.len() > 255 {
        return Err(error("must be at most 255 bytes"));
    }
    if host
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '"' | '\\' | '\''))
    {
        return Err(error(
            "must not contain control characters, spaces, quotes or backslashes",
        ));
    }
    let rest = host
        .strip_prefix("https://")
        .or_else(|| host.strip_prefix("http://"))
        .unwrap_or(host);
    if url_host(rest).is_none() {
        return Err(error("must be host[:port], optionally with a URL scheme and path"));
    }
    Ok(())
}

/// Checks everything of a deployment that reaches Helm's command line, a docker config or an
/// object name.
pub fn deployment(deployment: &Deployment, allow_http: bool) -> Result<ChartSource, ValidationError> {
    release_name(&deployment.release_name)?;
    for host in deployment.registry_auth.keys() {
        registry_host(host)?;
    }
    let source = chart_source(deployment, allow_http)?;
    if let ChartSource::Repository { host, .. } = &source
        && let Some(credentials) = deployment.registry_auth.get(host.as_str())
    {
        username(host, &credentials.username)?;
    }
    Ok(source)
}

/// `host[:port]` at the start of a URL without its scheme: up to the first `/`, `?` or `#`,
/// without user info.
fn url_host(rest: &str) -> Option<&str> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let valid = !host.is_empty()
        && !host.starts_with(['-', '.', ':'])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'));
    valid.then_some(host)
}

/// A DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, 1 to 63 characters.
fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Bounds the length of an echoed bad value in an error message.
fn truncate(value: &str) -> String {
    const MAX: usize = 80;
    if value.len() <= MAX {
        return value.to_owned();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{RegistryCredentials, SecretString};

    fn deployment_with(url: &str, chart: &str, version: &str) -> Deployment {
        Deployment {
            release_name: "web".into(),
            chart_url: url.into(),
            chart_name: chart.into(),
            chart_version: version.into(),
            ..Deployment::default()
        }
    }

    #[test]
    fn registry_hosts_are_what_a_docker_config_key_can_be() {
        for good in [
            "ghcr.io",
            "registry.example.com:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "https://index.docker.io/v1/",
        ] {
            assert!(registry_host(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "reg\nistry",
            "a b",
            "x\"y",
            "x\\y",
            "-rf",
            "https://",
            ".example.com",
        ] {
            let error = registry_host(bad).unwrap_err().to_string();
            assert!(error.starts_with("invalid registryAuth host"), "{bad}: {error}");
        }
        assert!(registry_host(&"a".repeat(256)).is_err());
    }

    #[test]
    fn release_names_follow_helm() {
        for good in ["web", "my-app", "a", "a1", "x.y", &"a".repeat(53)] {
            assert_eq!(release_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "we_b",
            "we b",
            "web\n",
            &"a".repeat(54),
            "a..b",
            ".a",
            "--set=x",
        ] {
            assert!(release_name(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert_eq!(namespace("customer-ns"), Ok(()));
        assert!(namespace("a.b").is_err());
        assert!(namespace("").is_err());
        assert!(namespace(&"n".repeat(64)).is_err());
    }

    #[test]
    fn oci_charts_are_accepted() {
        let source = chart_source(
            &deployment_with("oci://registry.example.com:5000/org/charts/app", "", "1.4.0"),
            false,
        );
        assert_eq!(
            source,
            Ok(ChartSource::Oci {
                reference: "oci://registry.example.com:5000/org/charts/app".into(),
                host: "registry.example.com:5000".into(),
            })
        );
    }

    #[test]
    fn credentials_in_chart_urls_leave_the_url_and_never_reach_messages() {
        let source = chart_source(
            &deployment_with("https://vendor:s%40cret@charts.example.com/stable", "my-app", "1.0.0"),
            false,
        );
        assert_eq!(
            source,
            Ok(ChartSource::Repository {
                url: "https://charts.example.com/stable".into(),
                host: "charts.example.com".into(),
                chart: "my-app".into(),
                url_credentials: Some(RegistryCredentials {
                    username: "vendor".into(),
                    password: SecretString::new("s@cret"),
                }),
            })
        );
        for (url, chart) in [
            ("https://vendor:s3cret@charts.example.com/stable", "-bad"),
            ("http://vendor:s3cret@charts.example.com/stable", "my-app"),
            ("oci://vendor:s3cret@registry.example.com/charts/app", ""),
            ("ftp://vendor:s3cret@charts.example.com/stable", "my-app"),
        ] {
            let error = chart_source(&deployment_with(url, chart, "1.0.0"), false);
            let message = match error {
                Err(error) => error.to_string(),
                Ok(source) => panic!("{url} accepted: {source:?}"),
            };
            assert!(!message.contains("s3cret"), "{message}");
        }
        assert_eq!(
            redact_url_credentials(
                r#"looks like "https://u:p@charts.example.com/x" is not valid; see https://docs.example.com/a@b"#
            ),
            r#"looks like "https://***@charts.example.com/x" is not valid; see https://docs.example.com/a@b"#
        );
    }

    #[test]
    fn classic_repositories_need_a_chart_name() {
        let source = chart_source(
            &deployment_with("https://charts.example.com/stable", "my-app", "1.0.0"),
            false,
        );
        assert_eq!(
            source,
            Ok(ChartSource::Repository {
                url: "https://charts.example.com/stable".into(),
                host: "charts.example.com".into(),
                chart: "my-app".into(),
                url_credentials: None,
            })
        );
        assert!(chart_source(&deployment_with("https://charts.example.com", "", "1.0.0"), false).is_err());
        assert!(chart_source(&deployment_with("https://charts.example.com", "-app", "1.0.0"), false).is_err());
    }

    #[test]
    fn plain_http_needs_the_flag() {
        let deployment = deployment_with("http://charts.local:8080", "app", "1.0.0");
        assert!(chart_source(&deployment, false).is_err());
        assert!(chart_source(&deployment, true).is_ok());
    }

    #[test]
    fn bad_urls_are_rejected() {
        for bad in [
            "",
            "ftp://x/y",
            "file:///etc/passwd",
            "/local/chart",
            "-oci://x/y",
            "oci://",
            "oci://host",
            "oci://host/",
            "oci://-host/x",
            "oci://host/x y",
            "oci://host/x\ty",
            "https://",
            "https:///path",
            "oci://host/x\u{7f}",
        ] {
            assert!(
                chart_source(&deployment_with(bad, "app", "1.0.0"), true).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn versions_are_sane() {
        for good in ["1.4.0", "v2.0.0-rc.1+build.5", "0.0.1_beta"] {
            assert_eq!(chart_version(good), Ok(()), "{good}");
        }
        for bad in ["", "-1.0.0", "1.0 ", ">=1.0", "1.0\n", "--devel", &"1".repeat(129)] {
            assert!(chart_version(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn repository_user_names_have_no_control_characters() {
        let mut deployment = deployment_with("https://charts.example.com", "app", "1.0.0");
        deployment.release_name = "web".into();
        deployment.registry_auth.insert(
            "charts.example.com".into(),
            RegistryCredentials {
                username: "bad\nuser".into(),
                password: SecretString::new("p"),
            },
        );
        assert!(super::deployment(&deployment, false).is_err());
    }

    #[test]
    fn long_bad_values_are_truncated_in_messages() {
        let message = release_name(&"X".repeat(500)).unwrap_err().to_string();
        assert!(message.len() < 250, "{message}");
    }
}
