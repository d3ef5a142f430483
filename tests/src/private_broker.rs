//! A RabbitMQ node of a test's own, for tests that stop and start the
//! broker: the shared broker belongs to whoever runs the tests and is never
//! stopped.
//!
//! With servers from the environment, the node runs from this machine's
//! RabbitMQ installation with its own node name, ports, Erlang port mapper,
//! cookie and data directory, all under a temporary directory; otherwise it
//! is a container of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use shop_broker::BrokerSettings;
use testcontainers_modules::rabbitmq::RabbitMq;
use testcontainers_modules::testcontainers::ContainerAsync;

use crate::local_rabbitmq::{
    NodeFiles, RABBITMQ_BIN, free_ports, kill_group, spawn_server, start_epmd,
};
use crate::pki::{Authority, Issued};

/// Longest wait for the node to start or to come back.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// A RabbitMQ node started for one test, stopped when dropped.
#[derive(Debug)]
pub struct PrivateBroker {
    /// AMQP URI of the node (`amqps://` when it serves TLS).
    pub url: String,
    node: Node,
}

/// TLS for a private node: it takes only TLS connections, with a
/// certificate for 127.0.0.1 and localhost issued by `authority`.
#[derive(Debug, Clone, Copy)]
pub struct BrokerTls<'a> {
    pub authority: &'a Authority,
    /// Refuse clients without a certificate from `authority`.
    pub require_client_certificate: bool,
}

#[derive(Debug)]
enum Node {
    Local(LocalNode),
    Container(Box<ContainerAsync<RabbitMq>>),
}

#[derive(Debug)]
struct LocalNode {
    name: String,
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    epmd: Child,
    server: Child,
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts connections.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a node that serves only AMQPS and waits until it is up.
    pub async fn start_tls(tls: BrokerTls<'_>) -> Result<Self> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<BrokerTls<'_>>) -> Result<Self> {
        let certificates = match tls {
            Some(tls) => Some(TlsFiles::new(tls)?),
            None => None,
        };
        if crate::servers().await.containers.is_some() {
            return Self::start_container(certificates).await;
        }
        let files = NodeFiles::create("shop-rabbitmq")?;
        let dir = files.dir.clone();
        let [amqp_port, dist_port, epmd_port, cli_port] = free_ports()?;
        let config = match &certificates {
            Some(files) => {
                files.write(&dir)?;
                files.config(&dir, &format!("127.0.0.1:{amqp_port}"))
            }
            None => String::new(),
        };
        std::fs::write(dir.join("rabbitmq.conf"), config)?;
        let name = format!("shop{amqp_port}@localhost");
        let mut env = files.env(&name, &dir, dist_port, epmd_port, cli_port);
        if certificates.is_none() {
            env.push(("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()));
            env.push(("RABBITMQ_NODE_PORT", amqp_port.to_string()));
        }
        let mut epmd = start_epmd(epmd_port)?;
        let server = match spawn_server(&env) {
            Ok(server) => server,
            Err(error) => {
                let _ = epmd.kill();
                let _ = epmd.wait();
                return Err(error);
            }
        };
        let scheme = if certificates.is_some() {
            "amqps"
        } else {
            "amqp"
        };
        let broker = Self {
            url: format!("{scheme}://guest:guest@127.0.0.1:{amqp_port}/%2f"),
            node: Node::Local(LocalNode {
                name,
                dir,
                env,
                epmd,
                server,
            }),
        };
        broker.await_startup().await?;
        Ok(broker)
    }

    async fn start_container(certificates: Option<TlsFiles>) -> Result<Self> {
        use testcontainers_modules::testcontainers::ImageExt;
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        let image = RabbitMq::default().with_tag(crate::RABBITMQ_TAG);
        let container = match &certificates {
            None => image.start().await,
            Some(files) => {
                let dir = Path::new("/etc/rabbitmq");
                image
                    .with_copy_to("/etc/rabbitmq/ca.pem", files.ca.clone().into_bytes())
                    .with_copy_to(
                        "/etc/rabbitmq/server.pem",
                        files.server.cert.clone().into_bytes(),
                    )
                    .with_copy_to(
                        "/etc/rabbitmq/server.key",
                        files.server.key.clone().into_bytes(),
                    )
                    .with_copy_to(
                        "/etc/rabbitmq/conf.d/20-tls.conf",
                        files.config(dir, "5671").into_bytes(),
                    )
                    .start()
                    .await
            }
        }
        .context("failed to start a RabbitMQ container")?;
        let host = container.get_host().await?;
        let url = match certificates {
            None => {
                let port = container.get_host_port_ipv4(5672).await?;
                format!("amqp://guest:guest@{host}:{port}/%2f")
            }
            Some(_) => {
                let port = container.get_host_port_ipv4(5671).await?;
                format!("amqps://guest:guest@{host}:{port}/%2f")
            }
        };
        Ok(Self {
            url,
            node: Node::Container(Box::new(container)),
        })
    }

    /// Client settings for this node: its URL and, for a TLS node, the
    /// authority to trust and the client certificate to present.
    pub fn client(&self, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> BrokerSettings {
        let mut settings = BrokerSettings::new(&self.url);
        settings.amqp_ca_file = ca.map(Path::to_path_buf);
        settings.amqp_client_cert = identity.map(|(cert, _)| cert.to_path_buf());
        settings.amqp_client_key = identity.map(|(_, key)| key.to_path_buf());
        settings
    }

    /// Stops the RabbitMQ application: clients lose their connections and
    /// cannot reconnect until [`PrivateBroker::start_app`].
    pub async fn stop_app(&self) -> Result<()> {
        self.rabbitmqctl(&["stop_app"]).await
    }

    /// Starts the RabbitMQ application again and waits until it is up.
    pub async fn start_app(&self) -> Result<()> {
        self.rabbitmqctl(&["start_app"]).await?;
        self.await_startup().await
    }

    async fn await_startup(&self) -> Result<()> {
        // `await_startup` fails at once while the node has not registered
        // with its port mapper yet, so it is asked again until it answers.
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.rabbitmqctl(&["await_startup"]).await {
                Ok(()) => return Ok(()),
                Err(error) if tokio::time::Instant::now() > deadline => {
                    return Err(error.context("the private RabbitMQ node did not start"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn rabbitmqctl(&self, args: &[&str]) -> Result<()> {
        match &self.node {
            Node::Container(container) => {
                let mut cmd = vec!["rabbitmqctl"];
                cmd.extend_from_slice(args);
                let result = container
                    .exec(testcontainers_modules::testcontainers::core::ExecCommand::new(cmd))
                    .await?;
                let code = result.exit_code().await?;
                anyhow::ensure!(code == Some(0), "rabbitmqctl {args:?} exited with {code:?}");
            }
            Node::Local(node) => {
                let status = tokio::process::Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"))
                    .envs(node.env.iter().map(|(k, v)| (*k, v)))
                    .arg("-n")
                    .arg(&node.name)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await
                    .context("failed to run rabbitmqctl")?;
                anyhow::ensure!(status.success(), "rabbitmqctl {args:?} failed: {status}");
            }
        }
        Ok(())
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        kill_group(&mut self.server);
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The certificates of a TLS node.
#[derive(Debug)]
struct TlsFiles {
    ca: String,
    server: Issued,
    require_client_certificate: bool,
}

impl TlsFiles {
    fn new(tls: BrokerTls<'_>) -> Result<Self> {
        Ok(Self {
            ca: tls.authority.pem.clone(),
            server: tls.authority.issue(&["localhost", "127.0.0.1"])?,
            require_client_certificate: tls.require_client_certificate,
        })
    }

    /// Writes the certificate files into `dir`.
    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("ca.pem"), &self.ca)?;
        std::fs::write(dir.join("server.pem"), &self.server.cert)?;
        std::fs::write(dir.join("server.key"), &self.server.key)?;
        Ok(())
    }

    /// The node's TLS configuration: its files in `dir`, and a TLS-only
    /// listener on `listener`.
    fn config(&self, dir: &Path, listener: &str) -> String {
        let path = |name: &str| dir.join(name).display().to_string();
        format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = {listener}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {}\n",
            path("ca.pem"),
            path("server.pem"),
            path("server.key"),
            self.require_client_certificate,
        )
    }
}
