//! Connecting to RabbitMQ: one node or the nodes of a cluster, over plain
//! AMQP or over TLS (`amqps://`) with a private certificate authority and
//! an optional client certificate.
//!
//! The relay, the subscribers and `shop-dlq` flatten [`BrokerSettings`] into
//! their command lines and open every broker connection through
//! [`BrokerSettings::connect`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

/// Where the broker is and how to reach it.
#[derive(Clone, Args)]
pub struct BrokerSettings {
    /// RabbitMQ broker (amqp:// or amqps://). The nodes of a cluster as a
    /// comma-separated list: each connection starts at a random node and
    /// goes on to the next while a node does not answer.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// PEM file of the certificate authorities trusted to sign the broker's
    /// certificate (amqps:// to a broker with a private CA), trusted in
    /// addition to the system's roots.
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// PEM certificate presented to the broker (amqps:// with client
    /// certificates, e.g. for the EXTERNAL mechanism). Needs --amqp-client-key.
    #[arg(long, env = "AMQP_CLIENT_CERT", requires = "amqp_client_key")]
    pub amqp_client_cert: Option<PathBuf>,

    /// PEM private key of --amqp-client-cert (PKCS#8, or the RSA/EC forms
    /// OpenSSL writes).
    #[arg(long, env = "AMQP_CLIENT_KEY", requires = "amqp_client_cert")]
    pub amqp_client_key: Option<PathBuf>,

    /// Longest wait for one node to accept a connection (TCP, TLS and the
    /// AMQP handshake) before the next node is tried.
    #[arg(long, env = "AMQP_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub amqp_connect_timeout: Duration,
}

impl fmt::Debug for BrokerSettings {
    // The URLs carry passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerSettings")
            .field(
                "nodes",
                &self
                    .nodes()
                    .iter()
                    .map(|url| redact(url))
                    .collect::<Vec<_>>(),
            )
            .field("amqp_ca_file", &self.amqp_ca_file)
            .field("amqp_client_cert", &self.amqp_client_cert)
            .field("amqp_client_key", &self.amqp_client_key)
            .field("amqp_connect_timeout", &self.amqp_connect_timeout)
            .finish()
    }
}

impl BrokerSettings {
    /// Settings for the given broker URL(s) with every other value at its default.
    pub fn new(amqp_url: &str) -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: BrokerSettings,
        }
        <Wrapper as clap::Parser>::parse_from(["broker", "--amqp-url", amqp_url]).settings
    }

    /// The node URLs, in the order given. A comma starts a new URL only
    /// when `amqp://` or `amqps://` follows it, so one in a password stays.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = Vec::new();
        for piece in self.amqp_url.split(',') {
            let trimmed = piece.trim();
            let starts_url = trimmed.starts_with("amqp://") || trimmed.starts_with("amqps://");
            match nodes.last_mut() {
                Some(last) if !starts_url && !trimmed.is_empty() => {
                    last.push(',');
                    last.push_str(piece.trim_end());
                }
                _ if !trimmed.is_empty() => nodes.push(trimmed.to_owned()),
                _ => {}
            }
        }
        nodes
    }

    /// Checks what clap cannot: every URL parses, and the certificate files
    /// exist and hold what they should.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.nodes().is_empty(),
            "--amqp-url must name at least one node"
        );
        for url in &self.nodes() {
            anyhow::ensure!(
                url.starts_with("amqp://") || url.starts_with("amqps://"),
                "--amqp-url: {} must start with amqp:// or amqps://",
                redact(url)
            );
            // The URL parser reads no IPv6 literal (it would connect to
            // localhost instead): such nodes need a host name.
            anyhow::ensure!(
                !url.contains("@[") && !url.contains("://["),
                "--amqp-url: IPv6 addresses are not supported, use a host name"
            );
            AMQPUri::from_str(url)
                .map_err(|error| anyhow::anyhow!("--amqp-url: {}: {error}", redact(url)))?;
        }
        anyhow::ensure!(
            !self.amqp_connect_timeout.is_zero(),
            "--amqp-connect-timeout must be positive"
        );
        self.tls_config()?;
        Ok(())
    }

    /// Opens a connection named `name` (shown in the broker's management
    /// UI), trying each node once, starting at a random one.
    pub async fn connect(&self, name: &str) -> anyhow::Result<Connection> {
        let nodes = self.nodes();
        anyhow::ensure!(!nodes.is_empty(), "no RabbitMQ node is configured");
        let tls = self.tls_config()?;
        let start = if nodes.len() > 1 {
            rand::random_range(0..nodes.len())
        } else {
            0
        };
        let mut failures = Vec::new();
        for offset in 0..nodes.len() {
            let url = nodes[(start + offset) % nodes.len()].as_str();
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let attempt = async {
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_with_config(url, properties, tls.clone(), runtime).await
            };
            // On timeout the attempt is dropped; lapin's I/O thread for it
            // ends when the node closes the socket or the OS gives up.
            let failure = match tokio::time::timeout(self.amqp_connect_timeout, attempt).await {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {:?}", self.amqp_connect_timeout),
            };
            if nodes.len() > 1 {
                tracing::warn!(node = %redact(url), error = %failure, "RabbitMQ node unreachable; trying the next");
            }
            failures.push(format!("{}: {failure}", redact(url)));
        }
        anyhow::bail!("failed to connect to RabbitMQ ({})", failures.join("; "))
    }

    /// The TLS configuration, read from the files at each connection so that
    /// renewed certificates are picked up when the connection is reopened.
    fn tls_config(&self) -> anyhow::Result<OwnedTLSConfig> {
        let cert_chain = match &self.amqp_ca_file {
            Some(path) => {
                let pem = read_pem(path, "--amqp-ca-file", "CERTIFICATE")?;
                Some(String::from_utf8(pem).context("--amqp-ca-file is not PEM text")?)
            }
            None => None,
        };
        let identity = match (&self.amqp_client_cert, &self.amqp_client_key) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read_pem(cert, "--amqp-client-cert", "CERTIFICATE")?,
                key: read_pem(key, "--amqp-client-key", "PRIVATE KEY")?,
            }),
            (None, None) => None,
            _ => anyhow::bail!("--amqp-client-cert and --amqp-client-key go together"),
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

fn read_pem(path: &Path, flag: &str, label: &str) -> anyhow::Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    // Keys come as `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`.
    anyhow::ensure!(
        text.contains(&format!("{label}-----")) && text.contains("-----BEGIN "),
        "{flag}: {} holds no PEM {label}",
        path.display()
    );
    Ok(pem)
}

/// A node URL without its user name and password, for logs and errors:
/// only its scheme, host, port and virtual host.
pub fn redact(url: &str) -> String {
    let scheme = url.split_once("://").map_or("?", |(scheme, _)| scheme);
    match AMQPUri::from_str(url) {
        Ok(uri) => format!(
            "{scheme}://{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        ),
        Err(_) => format!("{scheme}://<unparsable URL>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_split_trimmed_and_redacted() {
        let settings =
            BrokerSettings::new("amqp://u:secret@a:5672/%2f, amqps://u:se,cret@b:5671/%2f,,");
        assert_eq!(
            settings.nodes(),
            ["amqp://u:secret@a:5672/%2f", "amqps://u:se,cret@b:5671/%2f"]
        );
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("secret") && !debug.contains("se,"),
            "{debug}"
        );
        assert!(debug.contains("amqps://b:5671//"), "{debug}");
        settings.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_named() {
        let error = BrokerSettings::new("http://u:secret@a:5672")
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("--amqp-url"), "{error}");
        assert!(!error.to_string().contains("secret"), "{error}");

        let comma = BrokerSettings::new("amqp://u:12,34@a:5672");
        assert_eq!(comma.nodes().len(), 1);
        comma.validate().unwrap();

        let error = BrokerSettings::new("amqp://[::1]:5672/%2f")
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("IPv6"), "{error}");

        let error = BrokerSettings::new(" , ").validate().unwrap_err();
        assert!(error.to_string().contains("at least one node"), "{error}");

        let mut settings = BrokerSettings::new("amqps://a:5671/%2f");
        settings.amqp_ca_file = Some("/nonexistent/ca.pem".into());
        let error = settings.validate().unwrap_err();
        assert!(error.to_string().contains("--amqp-ca-file"), "{error}");
    }
}
