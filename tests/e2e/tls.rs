//! A private CA and TLS for the test servers, to prove the host trusts
//! the platform's roots (here: a bundle named by `SSL_CERT_FILE`).

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;

/// A CA, its PEM on disk, and a server config for `localhost` it signed.
pub struct PrivateCa {
    pub ca_file: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
    /// The server's certificate and key, PEM, for servers of other kinds.
    leaf_pem: (String, String),
    _dir: tempfile::TempDir,
}

impl PrivateCa {
    pub fn new() -> PrivateCa {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        PrivateCa {
            ca_file,
            server: Arc::new(server),
            leaf_pem: (leaf.pem(), leaf_key.serialize_pem()),
            _dir: dir,
        }
    }

    /// Writes the server's certificate and key into `dir`.
    pub fn leaf_pem_files(&self, dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert, &self.leaf_pem.0).unwrap();
        std::fs::write(&key, &self.leaf_pem.1).unwrap();
        (cert, key)
    }
}
