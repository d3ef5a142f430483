//! gRPC over TLS: a server given a certificate and key serves only TLS, and
//! a client trusting the certificate's issuer talks to it; with a client CA
//! (mutual TLS) only clients holding a certificate from that CA do.

use std::path::PathBuf;

use shop_server::grpc::TlsSettings;
use shop_tests::pki::{Authority, Issued};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn write_temp(name: &str, contents: &str) -> PathBuf {
    shop_tests::pki::write_file(None, name, contents).unwrap()
}

type Server = tokio::task::JoinHandle<anyhow::Result<()>>;

/// A server with health only, on a free port, serving `tls`.
async fn serve(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> anyhow::Result<(u16, CancellationToken, Server)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(shop_server::grpc::serve(
        listener,
        tonic::service::Routes::default(),
        &[],
        shop_server::grpc::Serving {
            tls,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    Ok((port, shutdown, server))
}

#[tokio::test]
async fn a_server_with_a_certificate_serves_tls_to_clients_that_trust_it() -> anyhow::Result<()> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_pem = certified.cert.pem();
    let settings = TlsSettings {
        tls_cert: Some(write_temp("cert.pem", &cert_pem)),
        tls_key: Some(write_temp(
            "key.pem",
            &certified.signing_key.serialize_pem(),
        )),
        tls_client_ca: None,
    };
    let tls = settings.load()?;
    assert!(tls.is_some());

    let (port, shutdown, server) = serve(tls).await?;

    // The client side of this process uses the same TLS provider.
    shop_server::grpc::install_crypto_provider();
    let channel = Endpoint::from_shared(format!("https://localhost:{port}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert_pem)))?
        .connect()
        .await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let plaintext = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a plaintext client got an answer from a TLS server"
    );

    shutdown.cancel();
    server.await??;
    Ok(())
}

#[test]
fn a_missing_certificate_file_is_named_at_start_up() {
    let settings = TlsSettings {
        tls_cert: Some("/nonexistent/cert.pem".into()),
        tls_key: Some("/nonexistent/key.pem".into()),
        tls_client_ca: None,
    };
    let error = settings.load().unwrap_err();
    assert!(
        format!("{error:#}").contains("/nonexistent/cert.pem"),
        "{error:#}"
    );
}

#[tokio::test]
async fn with_a_client_ca_only_clients_holding_its_certificates_connect() -> anyhow::Result<()> {
    let ca = Authority::new("shop test CA")?;
    let Issued {
        cert: server_cert,
        key: server_key,
    } = ca.issue(&["localhost"])?;
    let Issued {
        cert: client_cert,
        key: client_key,
    } = ca.issue(&["shop-client"])?;
    let stranger = Authority::new("stranger CA")?;
    let Issued {
        cert: stranger_cert,
        key: stranger_key,
    } = stranger.issue(&["stranger"])?;
    let tls = TlsSettings {
        tls_cert: Some(write_temp("cert.pem", &server_cert)),
        tls_key: Some(write_temp("key.pem", &server_key)),
        tls_client_ca: Some(write_temp("ca.pem", &ca.pem)),
    }
    .load()?;

    let (port, shutdown, server) = serve(tls).await?;
    shop_server::grpc::install_crypto_provider();
    let check = |identity: Option<(String, String)>| {
        let ca_pem = ca.pem.clone();
        async move {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
            if let Some((cert, key)) = identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            let channel = Endpoint::from_shared(format!("https://localhost:{port}"))?
                .tls_config(config)?
                .connect()
                .await?;
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await?
                .into_inner()
                .status();
            anyhow::Ok(status)
        }
    };

    assert_eq!(
        check(Some((client_cert, client_key))).await?,
        ServingStatus::Serving
    );
    assert!(
        check(None).await.is_err(),
        "a client without a certificate got an answer"
    );
    assert!(
        check(Some((stranger_cert, stranger_key))).await.is_err(),
        "a client with another CA's certificate got an answer"
    );

    shutdown.cancel();
    server.await??;
    Ok(())
}
