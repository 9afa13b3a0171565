//! The cluster's certificates: a CA, the certificates it signs for servers and clients, and
//! the kubeconfigs that carry them. The CA's public-key hash (`sha256:…`, as kubeadm
//! computes it) is what a joining node pins.

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

/// A certificate or key that could not be made or read.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct PkiError {
    pub what: String,
    pub reason: String,
}

fn pki_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |e| PkiError {
        what,
        reason: e.to_string(),
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both: etcd peers connect to each other either way, and etcd's gateway dials its own
    /// server as a client.
    Peer,
}

/// A leaf certificate to issue: subject common name, organizations (Kubernetes groups for a
/// client) and, for servers, the names and addresses it answers on.
#[derive(Debug, Clone)]
pub struct Leaf<'a> {
    pub common_name: &'a str,
    pub organizations: &'a [&'a str],
    pub sans: Vec<String>,
    pub usage: Usage,
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can sign.
pub struct Ca {
    pub pair: CertPair,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert", &self.pair.cert_pem)
            .finish()
    }
}

impl Ca {
    /// A new self-signed CA.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(pki_err("generating the CA key"))?;
        let mut params =
            CertificateParams::new(Vec::new()).map_err(pki_err("CA certificate parameters"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        // Ten years, as kubeadm's CA; leaves are re-issued on the node long before.
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(pki_err("signing the CA certificate"))?;
        let pair = CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pair,
        })
    }

    /// A CA from its certificate and key (a node restarting, or a CA the site brings).
    pub fn load(pair: CertPair) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&pair.key_pem).map_err(pki_err("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&pair.cert_pem, key)
            .map_err(pki_err("reading the CA certificate"))?;
        Ok(Ca { pair, issuer })
    }

    /// Issues a leaf certificate with a new key.
    pub fn issue(&self, leaf: &Leaf<'_>) -> Result<CertPair, PkiError> {
        let what = format!("certificate for {}", leaf.common_name);
        let key = KeyPair::generate().map_err(pki_err(what.clone()))?;
        let mut params =
            CertificateParams::new(leaf.sans.clone()).map_err(pki_err(what.clone()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        for o in leaf.organizations {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match leaf.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_err(what))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `sha256:<hex>` of this CA's public key.
    pub fn cert_hash(&self) -> Result<String, PkiError> {
        ca_cert_hash(&self.pair.cert_pem)
    }
}

/// A new key pair, PEM (private) and PEM (public): the service-account signing key.
pub fn key_pair() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(pki_err("generating a key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The public half, PEM, of a PEM private key (a service-account key given to a node).
pub fn public_key_pem(private_pem: &str) -> Result<String, PkiError> {
    Ok(KeyPair::from_pem(private_pem)
        .map_err(pki_err("reading the private key"))?
        .public_key_pem())
}

/// `sha256:<hex>` of a certificate's SubjectPublicKeyInfo: what kubeadm's
/// `--discovery-token-ca-cert-hash` pins.
pub fn ca_cert_hash(cert_pem: &str) -> Result<String, PkiError> {
    let bad = |reason: String| PkiError {
        what: "CA certificate".into(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw))
    ))
}

/// How a kubeconfig's user authenticates.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    Certificate(&'a CertPair),
    /// A bearer token (a bootstrap token while a kubelet has no certificate yet).
    Token(&'a str),
}

/// A kubeconfig with one cluster, one user and one context.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, credential: Credential<'_>) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user_fields = match credential {
        Credential::Certificate(pair) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&pair.cert_pem),
            b64(&pair.key_pem)
        ),
        Credential::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kiln\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n{user_fields}contexts:\n- name: kiln\n  context:\n    cluster: kiln\n    user: {user}\ncurrent-context: kiln\n",
        b64(ca_pem)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_ca_signs_leaves_and_keeps_its_hash() {
        let ca = Ca::generate("kiln-test").unwrap();
        let hash = ca.cert_hash().unwrap();
        assert!(
            hash.starts_with("sha256:") && hash.len() == 7 + 64,
            "{hash}"
        );
        let again = Ca::load(ca.pair.clone()).unwrap();
        assert_eq!(again.cert_hash().unwrap(), hash);
        let leaf = again
            .issue(&Leaf {
                common_name: "system:node:a",
                organizations: &["system:nodes"],
                sans: vec![],
                usage: Usage::Client,
            })
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.issuer().to_string(), "CN=kiln-test");
        assert_eq!(
            cert.subject().to_string(),
            "CN=system:node:a, O=system:nodes"
        );
        // A different CA has a different hash: the pin tells them apart.
        assert_ne!(
            Ca::generate("kiln-test").unwrap().cert_hash().unwrap(),
            hash
        );
    }

    #[test]
    fn garbage_is_not_a_ca() {
        let e = ca_cert_hash("not a certificate").unwrap_err();
        assert!(e.to_string().starts_with("CA certificate: not PEM"), "{e}");
    }
}
