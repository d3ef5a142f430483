//! A RabbitMQ cluster of a test's own, for tests that kill broker nodes.
//!
//! With servers from the environment, the nodes run from this machine's
//! RabbitMQ installation, each with its own node name, ports and data
//! directory, sharing one private Erlang port mapper and one cookie under a
//! temporary directory; nodes 2.. join node 1 with `join_cluster`. Otherwise
//! each node is a container on a network of the test's own, joining the
//! first by peer discovery from config, its AMQP port published on a fixed
//! host port so that a restarted node keeps its URL. A node is killed with
//! SIGKILL (no shutdown, as in a crash) and restarted on its data, where it
//! rejoins the cluster.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testcontainers_modules::rabbitmq::RabbitMq;
use testcontainers_modules::testcontainers::ContainerAsync;
use uuid::Uuid;

use crate::local_rabbitmq::{
    NodeFiles, RABBITMQ_BIN, free_ports, kill_group, spawn_server, start_epmd,
};

/// Longest wait for a node to start, join or come back.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(240);

/// A cluster started for one test, stopped when dropped.
#[derive(Debug)]
pub struct PrivateCluster {
    /// The local nodes' directory and port mapper (none for containers).
    local: Option<(PathBuf, Child)>,
    nodes: Vec<ClusterNode>,
}

#[derive(Debug)]
struct ClusterNode {
    name: String,
    url: String,
    process: Process,
}

#[derive(Debug)]
enum Process {
    Local {
        env: Vec<(&'static str, String)>,
        server: Option<Child>,
    },
    Container {
        container: Box<ContainerAsync<RabbitMq>>,
        running: bool,
    },
}

impl ClusterNode {
    fn running(&self) -> bool {
        match &self.process {
            Process::Local { server, .. } => server.is_some(),
            Process::Container { running, .. } => *running,
        }
    }

    async fn start(&mut self) -> Result<()> {
        match &mut self.process {
            Process::Local { env, server } => {
                *server = Some(spawn_server(env)?);
            }
            Process::Container { container, running } => {
                container
                    .start()
                    .await
                    .context("failed to restart the node")?;
                *running = true;
            }
        }
        Ok(())
    }

    async fn kill(&mut self) {
        match &mut self.process {
            Process::Local { server, .. } => {
                if let Some(mut server) = server.take() {
                    kill_group(&mut server);
                }
            }
            Process::Container { container, running } => {
                // A stop with no grace period is a SIGKILL.
                let _ = container.stop_with_timeout(Some(0)).await;
                *running = false;
            }
        }
    }

    async fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        let env = match &self.process {
            Process::Local { env, .. } => env,
            Process::Container { container, .. } => {
                use testcontainers_modules::testcontainers::core::{CmdWaitFor, ExecCommand};
                let mut cmd = vec!["rabbitmqctl"];
                cmd.extend_from_slice(args);
                let command = ExecCommand::new(cmd).with_cmd_ready_condition(CmdWaitFor::exit());
                let mut result = container.exec(command).await?;
                let stdout = result.stdout_to_vec().await?;
                let stderr = result.stderr_to_vec().await?;
                let code = result.exit_code().await?;
                anyhow::ensure!(
                    code == Some(0),
                    "rabbitmqctl {args:?} exited with {code:?}: {}",
                    String::from_utf8_lossy(&stderr).trim()
                );
                return Ok(String::from_utf8_lossy(&stdout).into_owned());
            }
        };
        let output = tokio::process::Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"))
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("failed to run rabbitmqctl")?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl {args:?} on {} failed: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    async fn await_startup(&self) -> Result<()> {
        // `await_startup` fails at once while the node has not registered
        // with the port mapper yet, so it is asked again until it answers.
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.rabbitmqctl(&["await_startup"]).await {
                Ok(_) => return Ok(()),
                Err(error) if tokio::time::Instant::now() > deadline => {
                    return Err(error.context(format!("node {} did not start", self.name)));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

impl PrivateCluster {
    /// Starts `size` nodes and clusters them.
    pub async fn start(size: usize) -> Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster has at least one node");
        if crate::servers().await.containers.is_some() {
            return Self::start_containers(size).await;
        }
        let files = NodeFiles::create("shop-cluster")?;
        std::fs::write(files.dir.join("rabbitmq.conf"), "")?;
        let [epmd_port, cli_port] = free_ports()?;
        let epmd = start_epmd(epmd_port)?;
        let mut cluster = Self {
            local: Some((files.dir.clone(), epmd)),
            nodes: Vec::new(),
        };
        for index in 0..size {
            let [amqp_port, dist_port] = free_ports()?;
            let name = format!("shop{amqp_port}@localhost");
            let data = files.dir.join(format!("node{index}"));
            let mut env = files.env(&name, &data, dist_port, epmd_port, cli_port);
            env.push(("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()));
            env.push(("RABBITMQ_NODE_PORT", amqp_port.to_string()));
            let server = spawn_server(&env)?;
            cluster.nodes.push(ClusterNode {
                name,
                url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
                process: Process::Local {
                    env,
                    server: Some(server),
                },
            });
        }
        for node in &cluster.nodes {
            node.await_startup().await?;
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            node.rabbitmqctl(&["stop_app"]).await?;
            node.rabbitmqctl(&["join_cluster", &first]).await?;
            node.rabbitmqctl(&["start_app"]).await?;
            node.await_startup().await?;
        }
        Ok(cluster)
    }

    /// The nodes as containers on a network of their own: the first starts
    /// alone, the others join it at their first start (peer discovery from
    /// config). Each node's AMQP port is published on a fixed host port, so
    /// a restarted node keeps its URL.
    async fn start_containers(size: usize) -> Result<Self> {
        use testcontainers_modules::testcontainers::ImageExt;
        use testcontainers_modules::testcontainers::core::IntoContainerPort;
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        let id = Uuid::new_v4().simple().to_string();
        let network = format!("shop-cluster-{id}");
        // Each node's host name is its container name, which every
        // container runtime resolves on the network.
        let hosts: Vec<String> = (0..size)
            .map(|index| format!("{network}-{index}"))
            .collect();
        let peers: String = hosts
            .iter()
            .enumerate()
            .map(|(index, host)| {
                format!(
                    "cluster_formation.classic_config.nodes.{} = rabbit@{host}\n",
                    index + 1
                )
            })
            .collect();
        let config = format!("cluster_formation.peer_discovery_backend = classic_config\n{peers}");
        let mut cluster = Self {
            local: None,
            nodes: Vec::new(),
        };
        for (index, host) in hosts.iter().enumerate() {
            let [port] = free_ports()?;
            let mut image = RabbitMq::default()
                .with_tag(crate::RABBITMQ_TAG)
                .with_network(&network)
                .with_hostname(host)
                .with_container_name(host)
                .with_env_var("RABBITMQ_ERLANG_COOKIE", &id)
                .with_mapped_port(port, 5672.tcp())
                .with_startup_timeout(STARTUP_TIMEOUT);
            if index > 0 {
                image = image.with_copy_to(
                    "/etc/rabbitmq/conf.d/20-cluster.conf",
                    config.clone().into_bytes(),
                );
            }
            let container = image
                .start()
                .await
                .context("failed to start a RabbitMQ container")?;
            let address = container.get_host().await?;
            cluster.nodes.push(ClusterNode {
                name: format!("rabbit@{host}"),
                url: format!("amqp://guest:guest@{address}:{port}/%2f"),
                process: Process::Container {
                    container: Box::new(container),
                    running: true,
                },
            });
        }
        // Peer discovery that fails leaves each node alone: make sure they
        // formed one cluster.
        cluster.nodes[0]
            .rabbitmqctl(&[
                "await_online_nodes",
                &size.to_string(),
                "--timeout",
                "120000",
            ])
            .await
            .context("the RabbitMQ containers did not form one cluster")?;
        Ok(cluster)
    }

    /// Every node's AMQP URL, comma-separated (what `--amqp-url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `index`'s AMQP URL.
    pub fn url(&self, index: usize) -> &str {
        &self.nodes[index].url
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Each quorum queue whose name starts with `prefix`, with the index of
    /// the node leading it (`None` while it has no leader), as a running
    /// node sees them. A queue whose recorded leader is down may be
    /// missing.
    pub async fn leaders(&self, prefix: &str) -> Result<Vec<(String, Option<usize>)>> {
        let node = self
            .nodes
            .iter()
            .find(|node| node.running())
            .context("no node is running")?;
        let listing = node
            .rabbitmqctl(&[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "type",
                "leader",
            ])
            .await?;
        let mut leaders = Vec::new();
        for line in listing.lines() {
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            let (name, leader) = match fields.as_slice() {
                [name, "quorum", leader] => (*name, *leader),
                [name, "quorum"] => (*name, ""),
                _ => continue,
            };
            if !name.starts_with(prefix) {
                continue;
            }
            let index = match leader {
                "" => None,
                leader => Some(
                    self.nodes
                        .iter()
                        .position(|node| node.name == leader)
                        .with_context(|| format!("{name} is led by unknown node {leader}"))?,
                ),
            };
            leaders.push((name.to_owned(), index));
        }
        Ok(leaders)
    }

    /// Client connections open on node `index` itself (`list_connections`
    /// would list the whole cluster's).
    pub async fn connections(&self, index: usize) -> Result<usize> {
        let output = self.nodes[index]
            .rabbitmqctl(&["eval", "length(rabbit_networking:connections_local())."])
            .await?;
        output
            .trim()
            .parse()
            .with_context(|| format!("connections of node {index}: {output:?}"))
    }

    /// Kills node `index` with SIGKILL: no shutdown, its connections drop.
    pub async fn kill(&mut self, index: usize) {
        self.nodes[index].kill().await;
    }

    /// Starts node `index` again on its data and waits until it is up.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        self.nodes[index].start().await?;
        self.nodes[index].await_startup().await
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Containers remove themselves when dropped; local nodes are
        // killed here.
        for node in &mut self.nodes {
            if let Process::Local { server, .. } = &mut node.process
                && let Some(mut server) = server.take()
            {
                kill_group(&mut server);
            }
        }
        if let Some((dir, mut epmd)) = self.local.take() {
            let _ = epmd.kill();
            let _ = epmd.wait();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
