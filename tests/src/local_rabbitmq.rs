//! What the private RabbitMQ nodes started from this machine's installation
//! share: their files, their environment, their port mapper and how they
//! are started and killed.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use uuid::Uuid;

/// Where Debian's RabbitMQ keeps the scripts that run as the calling user
/// (`/usr/sbin/rabbitmq*` switch to the `rabbitmq` user).
pub(crate) const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A temporary directory with what local nodes share: a home with its own
/// Erlang cookie, an empty environment file and no plugins. The caller
/// writes `rabbitmq.conf` into it.
#[derive(Debug)]
pub(crate) struct NodeFiles {
    pub(crate) dir: PathBuf,
    home: PathBuf,
}

impl NodeFiles {
    pub(crate) fn create(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", Uuid::new_v4().simple()));
        let home = dir.join("home");
        std::fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, Uuid::new_v4().simple().to_string())?;
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        Ok(Self { dir, home })
    }

    /// The environment of node `name`, its data under `data`, for the
    /// server and for every CLI call: nothing of the system's RabbitMQ
    /// (configuration, cookie, port mapper, CLI ports) is used.
    pub(crate) fn env(
        &self,
        name: &str,
        data: &Path,
        dist_port: u16,
        epmd_port: u16,
        cli_port: u16,
    ) -> Vec<(&'static str, String)> {
        let path = |p: &str| self.dir.join(p).display().to_string();
        vec![
            ("HOME", self.home.display().to_string()),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            (
                "RABBITMQ_MNESIA_BASE",
                data.join("mnesia").display().to_string(),
            ),
            ("RABBITMQ_LOG_BASE", data.join("log").display().to_string()),
            ("RABBITMQ_NODENAME", name.to_owned()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string()),
            ("ERL_EPMD_PORT", epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
            ("RABBITMQ_CTL_DIST_PORT_MIN", cli_port.to_string()),
            ("RABBITMQ_CTL_DIST_PORT_MAX", cli_port.to_string()),
        ]
    }
}

/// A port mapper of the nodes' own, started here rather than by a node
/// (which would daemonise it beyond reach).
pub(crate) fn start_epmd(port: u16) -> Result<Child> {
    Command::new("epmd")
        .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start epmd")
}

/// Starts `rabbitmq-server` with `env`, in a process group of its own so
/// that [`kill_group`] stops every process the script starts.
pub(crate) fn spawn_server(env: &[(&'static str, String)]) -> Result<Child> {
    Command::new(format!("{RABBITMQ_BIN}/rabbitmq-server"))
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("failed to start rabbitmq-server")
}

/// SIGKILL to `server`'s whole process group (the script, the Erlang VM
/// and its helpers), as a crash would; then reaps it.
pub(crate) fn kill_group(server: &mut Child) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", server.id())])
        .status();
    let _ = server.wait();
}

/// Ports free on the loopback interface right now.
pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}
