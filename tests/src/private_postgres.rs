//! A PostgreSQL server of a test's own that takes only TLS connections, for
//! tests of encrypted database traffic: the shared server belongs to
//! whoever runs the tests and is never reconfigured.
//!
//! With servers from the environment, the server runs from this machine's
//! PostgreSQL installation (as the `postgres` user when the tests run as
//! root) in a temporary directory on a port of its own; otherwise it is a
//! container of its own.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::Connection as _;
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::ContainerAsync;
use uuid::Uuid;

use crate::pki::{Authority, Issued};

/// Longest wait for the server to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Client authentication: TCP connections only, and only over TLS.
const HBA: &str = "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n";

/// A PostgreSQL server started for one test, stopped when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    /// Host and port of the server, `host:port`.
    pub address: String,
    /// The authority's certificate, which clients verify the server with.
    pub ca_file: PathBuf,
    server: Server,
}

#[derive(Debug)]
enum Server {
    Local {
        dir: PathBuf,
        process: Child,
    },
    /// Held so that the container lives as long as the server is used.
    Container(#[allow(dead_code)] Box<ContainerAsync<Postgres>>),
}

impl PrivatePostgres {
    /// Starts a server with a certificate for 127.0.0.1 and localhost from
    /// `authority`, refusing every connection that is not TLS.
    pub async fn start_tls(authority: &Authority) -> Result<Self> {
        let server = authority.issue(&["localhost", "127.0.0.1"])?;
        let ca_file = crate::pki::write_file(None, "postgres-ca.pem", &authority.pem)?;
        let started = if crate::servers().await.containers.is_some() {
            Self::start_container(&server).await?
        } else {
            Self::start_local(&server)?
        };
        let (address, server) = started;
        let postgres = Self {
            address,
            ca_file,
            server,
        };
        postgres.await_startup().await?;
        Ok(postgres)
    }

    /// A connection URL for `database` with `sslmode`, verifying the server
    /// with the authority's certificate for the TLS modes that verify.
    pub fn url(&self, database: &str, sslmode: &str) -> String {
        format!(
            "postgres://postgres@{}/{database}?sslmode={sslmode}&sslrootcert={}",
            self.address,
            self.ca_file.display()
        )
    }

    async fn await_startup(&self) -> Result<()> {
        let url = self.url("postgres", "verify-full");
        crate::eventually(
            STARTUP_TIMEOUT,
            "the private PostgreSQL server to start",
            || async { Ok(sqlx::PgConnection::connect(&url).await.ok()) },
        )
        .await?
        .close()
        .await?;
        Ok(())
    }

    fn start_local(server: &Issued) -> Result<(String, Server)> {
        let bin =
            installed_bin().context("no PostgreSQL installation under /usr/lib/postgresql")?;
        let dir = std::env::temp_dir().join(format!("shop-postgres-{}", Uuid::new_v4().simple()));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("server.crt"), &server.cert)?;
        std::fs::write(dir.join("server.key"), &server.key)?;
        std::fs::write(dir.join("pg_hba.conf"), HBA)?;
        std::fs::set_permissions(dir.join("server.key"), PermissionsExt::from_mode(0o600))?;
        // PostgreSQL refuses to run as root: as root, the files and the
        // server belong to the `postgres` user.
        let owner = if running_as_root()? {
            Some(user_ids("postgres")?)
        } else {
            None
        };
        if let Some((uid, gid)) = owner {
            for path in [
                &dir,
                &dir.join("server.crt"),
                &dir.join("server.key"),
                &dir.join("pg_hba.conf"),
            ] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
            }
        }
        let as_owner = |command: &mut Command| {
            if let Some((uid, gid)) = owner {
                command.uid(uid).gid(gid);
            }
            command
                .env_remove("PGDATA")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(&data);
        as_owner(&mut initdb);
        let status = initdb.status().context("failed to run initdb")?;
        anyhow::ensure!(status.success(), "initdb failed: {status}");

        let port = free_port()?;
        let path = |name: &str| dir.join(name).display().to_string();
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", dir.display())])
            .args(["-c", "ssl=on"])
            .args(["-c", &format!("ssl_cert_file={}", path("server.crt"))])
            .args(["-c", &format!("ssl_key_file={}", path("server.key"))])
            .args(["-c", &format!("hba_file={}", path("pg_hba.conf"))])
            .args(["-c", "fsync=off"])
            .args(["-c", "max_connections=300"])
            .process_group(0);
        as_owner(&mut postgres);
        let process = postgres.spawn().context("failed to start postgres")?;
        Ok((format!("127.0.0.1:{port}"), Server::Local { dir, process }))
    }

    async fn start_container(server: &Issued) -> Result<(String, Server)> {
        use testcontainers_modules::testcontainers::ImageExt;
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        // The image's own initialisation connects over the container's Unix
        // socket; from outside, only TLS over TCP is let in.
        let hba = format!("local all all trust\n{HBA}hostssl all all all trust\n");
        let script = "install -o postgres -m 600 /certs/server.key /var/lib/postgresql/server.key \
                      && exec docker-entrypoint.sh postgres -c ssl=on \
                      -c ssl_cert_file=/certs/server.crt \
                      -c ssl_key_file=/var/lib/postgresql/server.key \
                      -c hba_file=/certs/pg_hba.conf -c fsync=off";
        let container = Postgres::default()
            .with_tag(crate::POSTGRES_TAG)
            .with_copy_to("/certs/server.crt", server.cert.clone().into_bytes())
            .with_copy_to("/certs/server.key", server.key.clone().into_bytes())
            .with_copy_to("/certs/pg_hba.conf", hba.into_bytes())
            // The image's entrypoint runs any command other than `postgres`
            // as it is: the shell installs the key, then hands over to it.
            .with_cmd(["sh", "-c", script])
            .start()
            .await
            .context("failed to start a PostgreSQL container")?;
        let host = container.get_host().await?;
        let port = container.get_host_port_ipv4(5432).await?;
        Ok((
            format!("{host}:{port}"),
            Server::Container(Box::new(container)),
        ))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Server::Local { dir, process } = &mut self.server {
            // A fast shutdown: the server ends its sessions, releases its
            // shared memory and exits.
            let _ = Command::new("kill")
                .args(["-s", "INT", "--", &format!("-{}", process.id())])
                .stderr(Stdio::null())
                .status();
            let _ = process.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// The `bin` directory of the newest PostgreSQL installed from Debian's packages.
fn installed_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn running_as_root() -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

/// The user and group ids of `user`, from the password database.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&user) && fields.len() > 3)
        .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
        .with_context(|| format!("no user {user} in /etc/passwd"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
