//! `shop-healthcheck`: asks a gRPC server for its health and exits 0 when it
//! is SERVING, 1 otherwise. For container health checks and exec probes.
//! With `GRPC_TLS_CA` naming a PEM file, it connects over TLS and trusts
//! that issuer (the server name is `localhost` unless `GRPC_TLS_DOMAIN`
//! says otherwise); with `GRPC_TLS_CLIENT_CERT` and `GRPC_TLS_CLIENT_KEY`
//! it presents that certificate, for servers that require client
//! certificates. Given an `http://host:port/path` URL instead (the
//! gateway's `/health`), it exits 0 when the answer is 200.

use std::process::ExitCode;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(addr), service) = (args.next(), args.next().unwrap_or_default()) else {
        eprintln!("usage: shop-healthcheck <host:port> [service] | <http://host:port/path>");
        return ExitCode::from(2);
    };
    if let Some(target) = addr.strip_prefix("http://") {
        return match tokio::time::timeout(Duration::from_secs(2), http_ok(target)).await {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(error)) => {
                eprintln!("{addr}: {error}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("{addr}: no answer within 2s");
                ExitCode::FAILURE
            }
        };
    }
    match check(&addr, service).await {
        Ok(ServingStatus::Serving) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{addr}: {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{addr}: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn check(addr: &str, service: String) -> anyhow::Result<ServingStatus> {
    let endpoint = match std::env::var_os("GRPC_TLS_CA") {
        Some(ca) => {
            shop_server::grpc::install_crypto_provider();
            let domain = std::env::var("GRPC_TLS_DOMAIN").unwrap_or_else(|_| "localhost".into());
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca)?))
                .domain_name(domain);
            if let (Some(cert), Some(key)) = (
                std::env::var_os("GRPC_TLS_CLIENT_CERT"),
                std::env::var_os("GRPC_TLS_CLIENT_KEY"),
            ) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(cert)?,
                    std::fs::read(key)?,
                ));
            }
            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?
        }
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?,
    };
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await?;
    Ok(response.into_inner().status())
}

/// `GET` over HTTP/1.0; fine when the status is 200.
async fn http_ok(target: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = target.split_once('/').unwrap_or((target, ""));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split_whitespace().nth(1).unwrap_or_default();
    anyhow::ensure!(status == "200", "HTTP status {status}");
    Ok(())
}
