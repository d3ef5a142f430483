//! A RabbitMQ node of a test's own, for tests that stop and start the
//! broker: the shared broker belongs to whoever runs the tests and is never
//! stopped.
//!
//! With servers from the environment, the node runs from this machine's
//! RabbitMQ installation with its own node name, ports, Erlang port mapper,
//! cookie and data directory, all under a temporary directory; otherwise it
//! is a container of its own.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use testcontainers_modules::rabbitmq::RabbitMq;
use testcontainers_modules::testcontainers::ContainerAsync;
use uuid::Uuid;

/// Where Debian's RabbitMQ keeps the scripts that run as the calling user
/// (`/usr/sbin/rabbitmq*` switch to the `rabbitmq` user).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// Longest wait for the node to start or to come back.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// A RabbitMQ node started for one test, stopped when dropped.
#[derive(Debug)]
pub struct PrivateBroker {
    /// AMQP URI of the node.
    pub url: String,
    node: Node,
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
        if crate::servers().await.containers.is_some() {
            return Self::start_container().await;
        }
        let dir = std::env::temp_dir().join(format!("shop-rabbitmq-{}", Uuid::new_v4().simple()));
        let home = dir.join("home");
        std::fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, Uuid::new_v4().simple().to_string())?;
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq.conf"), "")?;
        let [amqp_port, dist_port, epmd_port, cli_port] = free_ports()?;
        let name = format!("shop{amqp_port}@localhost");
        let path = |p: &str| dir.join(p).display().to_string();
        let env = vec![
            ("HOME", home.display().to_string()),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_NODENAME", name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
            ("RABBITMQ_NODE_PORT", amqp_port.to_string()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string()),
            ("ERL_EPMD_PORT", epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
            ("RABBITMQ_CTL_DIST_PORT_MIN", cli_port.to_string()),
            ("RABBITMQ_CTL_DIST_PORT_MAX", cli_port.to_string()),
        ];
        // The node's own port mapper, started here rather than by the node
        // (which would daemonise it beyond reach).
        let mut epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start epmd")?;
        let server = Command::new(format!("{RABBITMQ_BIN}/rabbitmq-server"))
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so dropping it stops every process
            // the script starts.
            .process_group(0)
            .spawn();
        let server = match server {
            Ok(server) => server,
            Err(error) => {
                let _ = epmd.kill();
                let _ = epmd.wait();
                return Err(error).context("failed to start rabbitmq-server");
            }
        };
        let broker = Self {
            url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
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

    async fn start_container() -> Result<Self> {
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        let container = RabbitMq::default()
            .start()
            .await
            .context("failed to start a RabbitMQ container")?;
        let host = container.get_host().await?;
        let port = container.get_host_port_ipv4(5672).await?;
        Ok(Self {
            url: format!("amqp://guest:guest@{host}:{port}/%2f"),
            node: Node::Container(Box::new(container)),
        })
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
        // The whole process group: the script, the Erlang VM and its helpers.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.server.id())])
            .status();
        let _ = self.server.wait();
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ports free on the loopback interface right now.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}
