//! Image provenance: ed25519 keys and the signature over a build's `manifest.json`, which
//! holds the size and sha256 of every artifact, so one signature covers the whole bundle.
//!
//! Keys are the PEM files OpenSSL reads and writes (`PRIVATE KEY`: PKCS#8 v1, `PUBLIC KEY`:
//! SubjectPublicKeyInfo), so `openssl genpkey -algorithm ed25519` makes a key kiln signs
//! with, and `openssl pkeyutl -verify -rawin` checks a signature kiln made. The signature
//! file holds the 64 raw signature bytes.

use base64::Engine;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

/// The signature over `manifest.json`, beside it in a build's output directory.
pub const SIGNATURE_FILE: &str = "manifest.json.sig";
/// Where an image built with a signing key carries that key's public half:
/// `<fingerprint>.pub`, what the node trusts for what it installs next.
pub const TRUSTED_KEYS_DIR: &str = "/usr/share/kiln/trusted-keys";

/// DER of a PKCS#8 v1 ed25519 private key up to its 32-byte seed (RFC 8410).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER of an ed25519 SubjectPublicKeyInfo up to its 32-byte key (RFC 8410).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
const PRIVATE_LABEL: &str = "PRIVATE KEY";
const PUBLIC_LABEL: &str = "PUBLIC KEY";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM \"{0}\" block")]
    NoPem(&'static str),
    #[error("the PEM \"{0}\" block is not base64")]
    Base64(&'static str),
    #[error("not an ed25519 {0} (make one with `kiln key generate`)")]
    NotEd25519(&'static str),
    #[error("the system's random source failed")]
    Random,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the signature does not verify with key {fingerprint}")]
pub struct BadSignature {
    pub fingerprint: String,
}

/// A private signing key.
pub struct SigningKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    // The seed is secret: only the public half shows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public().fingerprint())
            .finish_non_exhaustive()
    }
}

impl Clone for SigningKey {
    fn clone(&self) -> SigningKey {
        SigningKey::from_seed(self.seed)
    }
}

impl SigningKey {
    /// A new key from the system's random source.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| KeyError::Random)?;
        Ok(SigningKey::from_seed(seed))
    }

    fn from_seed(seed: [u8; 32]) -> SigningKey {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .expect("every 32-byte seed is an ed25519 key");
        SigningKey { seed, pair }
    }

    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        let der = pem_decode(text, PRIVATE_LABEL)?;
        let seed = der
            .strip_prefix(&PKCS8_PREFIX[..])
            .and_then(|s| <[u8; 32]>::try_from(s).ok())
            .ok_or(KeyError::NotEd25519("private key"))?;
        Ok(SigningKey::from_seed(seed))
    }

    pub fn to_pem(&self) -> String {
        pem_encode(PRIVATE_LABEL, &[&PKCS8_PREFIX[..], &self.seed].concat())
    }

    pub fn public(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(key)
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// A public key that verifies signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl PublicKey {
    pub fn from_pem(text: &str) -> Result<PublicKey, KeyError> {
        let der = pem_decode(text, PUBLIC_LABEL)?;
        der.strip_prefix(&SPKI_PREFIX[..])
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(PublicKey)
            .ok_or(KeyError::NotEd25519("public key"))
    }

    pub fn to_pem(&self) -> String {
        pem_encode(PUBLIC_LABEL, &[&SPKI_PREFIX[..], &self.0].concat())
    }

    /// `ed25519:` and the first 16 hex digits of the key's sha256: how errors, file names
    /// and manifests name a key.
    pub fn fingerprint(&self) -> String {
        format!("ed25519:{}", &hex::encode(Sha256::digest(self.0))[..16])
    }

    /// The file name an image keeps this key under, in [`TRUSTED_KEYS_DIR`].
    pub fn file_name(&self) -> String {
        format!("{}.pub", self.fingerprint().replace(':', "-"))
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), BadSignature> {
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(message, signature)
            .map_err(|_| BadSignature {
                fingerprint: self.fingerprint(),
            })
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(text: &str, label: &'static str) -> Result<Vec<u8>, KeyError> {
    let (begin, end) = (
        format!("-----BEGIN {label}-----"),
        format!("-----END {label}-----"),
    );
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .ok_or(KeyError::NoPem(label))?;
    let b64: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| KeyError::Base64(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032, section 7.1, test 2: a fixed key, message and signature.
    const SEED: &str = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb";
    const PUBLIC: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    const SIGNATURE: &str = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00";

    fn rfc_key() -> SigningKey {
        SigningKey::from_seed(hex::decode(SEED).unwrap().try_into().unwrap())
    }

    #[test]
    fn signs_as_rfc_8032_says() {
        let key = rfc_key();
        assert_eq!(hex::encode(key.public().0), PUBLIC);
        assert_eq!(hex::encode(key.sign(&[0x72])), SIGNATURE);
        key.public().verify(&[0x72], &key.sign(&[0x72])).unwrap();
    }

    #[test]
    fn keys_round_trip_through_openssl_pem() {
        let key = rfc_key();
        let private = key.to_pem();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"));
        let again = SigningKey::from_pem(&private).unwrap();
        assert_eq!(again.public(), key.public());
        let public = key.public().to_pem();
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
        assert_eq!(PublicKey::from_pem(&public).unwrap(), key.public());
    }

    #[test]
    fn a_changed_message_or_another_key_does_not_verify() {
        let key = rfc_key();
        let signature = key.sign(b"manifest");
        let err = key.public().verify(b"manifesT", &signature).unwrap_err();
        assert_eq!(err.fingerprint, key.public().fingerprint());
        let other = SigningKey::generate().unwrap();
        assert_ne!(other.public(), key.public());
        assert!(other.public().verify(b"manifest", &signature).is_err());
        assert!(key.public().verify(b"manifest", &signature[..63]).is_err());
    }

    #[test]
    fn other_keys_and_garbage_are_refused_by_name() {
        let public = rfc_key().public().to_pem();
        assert_eq!(
            SigningKey::from_pem(&public).unwrap_err(),
            KeyError::NoPem("PRIVATE KEY")
        );
        let rsa_ish = pem_encode(PUBLIC_LABEL, &[0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(
            PublicKey::from_pem(&rsa_ish).unwrap_err(),
            KeyError::NotEd25519("public key")
        );
        let broken = "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n";
        assert_eq!(
            PublicKey::from_pem(broken).unwrap_err(),
            KeyError::Base64("PUBLIC KEY")
        );
    }

    #[test]
    fn fingerprints_name_the_key() {
        let key = rfc_key().public();
        let fp = key.fingerprint();
        assert!(fp.starts_with("ed25519:") && fp.len() == 8 + 16, "{fp}");
        assert_eq!(key.file_name(), format!("{}.pub", fp.replace(':', "-")));
    }
}
