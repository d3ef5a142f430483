//! A private certificate authority for tests of TLS connections: servers
//! get certificates it issued, clients trust it or present its certificates.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// A certificate authority of one test.
#[derive(Debug)]
pub struct Authority {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    /// The authority's own certificate, PEM.
    pub pem: String,
}

/// A certificate the authority issued, and its private key (PKCS#8), PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Authority {
    /// A new authority with a fresh key.
    pub fn new(name: &str) -> Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { params, key, pem })
    }

    /// A certificate for `names` (DNS names or IP addresses); the first is
    /// also its common name.
    pub fn issue(&self, names: &[&str]) -> Result<Issued> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )?;
        if let Some(name) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *name);
        }
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to a new file in `dir` (the system's temporary
/// directory when `None`) and returns its path.
pub fn write_file(dir: Option<&Path>, name: &str, contents: &str) -> Result<PathBuf> {
    let path = match dir {
        Some(dir) => dir.join(name),
        None => std::env::temp_dir().join(format!("{}-{name}", uuid::Uuid::new_v4().simple())),
    };
    std::fs::write(&path, contents)?;
    Ok(path)
}
