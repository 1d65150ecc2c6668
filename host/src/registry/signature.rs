//! Cosign signatures, in cosign's own format so that `cosign verify --key`
//! and Kubewarden-style verifiers accept Portcullis' signatures and it
//! accepts theirs: a "simple signing" JSON payload naming the artifact's
//! manifest digest, signed with an ECDSA P-256 key (SHA-256, ASN.1 DER,
//! base64), stored as a layer of an OCI manifest tagged `sha256-HEX.sig`
//! in the artifact's repository, the signature in the layer's
//! `dev.cosignproject.cosign/signature` annotation. Keys are cosign's:
//! the private key encrypted (scrypt and NaCl secretbox) under a
//! passphrase, the public key PEM. The cryptography is the `sigstore`
//! crate's.

use crate::config::OciReference;
use crate::registry::cache::digest_of;
use crate::registry::client::MANIFEST_MEDIA_TYPE;
use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::signing_key::ecdsa::{ECDSAKeys, EllipticCurve};
use sigstore::crypto::{CosignVerificationKey, Signature, SigningScheme};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A signature layer's media type.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding a layer's base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The payload's `critical.type`.
const PAYLOAD_TYPE: &str = "cosign container image signature";
/// The most signature layers read for one artifact.
pub const MAX_SIGNATURES: usize = 128;
/// The largest signature payload read.
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 10;

/// The tag cosign stores an artifact's signatures under.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// The simple-signing payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    critical: Critical,
    optional: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The payload signing `digest` of `reference`'s repository.
pub fn payload(reference: &OciReference, digest: &str) -> Vec<u8> {
    let payload = Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: format!("{}/{}", reference.registry, reference.repository),
            },
            image: Image {
                docker_manifest_digest: digest.to_string(),
            },
            kind: PAYLOAD_TYPE.into(),
        },
        optional: None,
    };
    serde_json::to_vec(&payload).expect("a payload serializes")
}

/// Whether `payload` is a simple-signing payload for the manifest `digest`.
/// The repository it names is not compared: a copy in a mirror registry
/// keeps its signatures valid, as `cosign verify` allows.
fn payload_signs(payload: &[u8], digest: &str) -> Result<()> {
    let text = std::str::from_utf8(payload).context("the payload is not UTF-8")?;
    crate::protocol::strict_json::check(text)
        .map_err(|refusal| anyhow!("the payload is ambiguous JSON: {refusal}"))?;
    let payload: Payload = serde_json::from_str(text).context("not a simple-signing payload")?;
    if payload.critical.kind != PAYLOAD_TYPE {
        bail!(
            "the payload's type is '{}', not '{PAYLOAD_TYPE}'",
            payload.critical.kind
        );
    }
    if payload.critical.image.docker_manifest_digest != digest {
        bail!(
            "the payload signs {}, not {digest}",
            payload.critical.image.docker_manifest_digest
        );
    }
    Ok(())
}

/// One signature as stored: the payload's descriptor and the signature.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The payload layer.
    pub layer: OciDescriptor,
    /// The base64 signature from its annotation.
    pub signature: String,
}

/// The signatures an artifact's signature manifest holds.
pub fn stored(manifest: &OciImageManifest) -> Vec<Stored> {
    manifest
        .layers
        .iter()
        .filter(|l| l.media_type == SIGNATURE_MEDIA_TYPE)
        .filter_map(|layer| {
            let signature = layer
                .annotations
                .as_ref()?
                .get(SIGNATURE_ANNOTATION)?
                .clone();
            Some(Stored {
                layer: layer.clone(),
                signature,
            })
        })
        .take(MAX_SIGNATURES)
        .collect()
}

/// A public key signatures are checked with.
pub struct TrustedKey {
    /// How reports name it: the file's name and the key's fingerprint.
    pub name: String,
    key: CosignVerificationKey,
}

impl TrustedKey {
    /// Reads a PEM public key (ECDSA, Ed25519 or RSA, as cosign's).
    pub fn load(path: &Path) -> Result<Self> {
        let pem =
            std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
        let key = CosignVerificationKey::try_from_pem(&pem)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("{} is not a PEM public key", path.display()))?;
        let name = format!(
            "{} ({})",
            path.file_name().unwrap_or_default().to_string_lossy(),
            fingerprint(&pem)
        );
        Ok(Self { name, key })
    }

    /// Whether `signature` (base64) over `payload` is this key's.
    pub fn verifies(&self, payload: &[u8], signature: &str) -> bool {
        self.key
            .verify_signature(Signature::Base64Encoded(signature.as_bytes()), payload)
            .is_ok()
    }
}

/// The first 16 hex digits of the sha256 of a key's DER (PEM body), so two
/// copies of one key read alike.
fn fingerprint(pem: &[u8]) -> String {
    let body: String = String::from_utf8_lossy(pem)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = BASE64.decode(body.trim()).unwrap_or_default();
    let digest = digest_of(&der);
    format!("sha256:{}", &digest["sha256:".len()..][..16])
}

/// The name of the first of `keys` that signed the manifest `digest`, given
/// its stored signatures and a way to fetch a payload by its descriptor.
pub fn signer(
    keys: &[TrustedKey],
    digest: &str,
    signatures: &[Stored],
    mut payload_of: impl FnMut(&OciDescriptor) -> Result<Vec<u8>>,
) -> Result<String> {
    let mut seen = Vec::new();
    for stored in signatures {
        let payload = match payload_of(&stored.layer) {
            Ok(payload) => payload,
            Err(e) => {
                seen.push(format!("{:#}", e));
                continue;
            }
        };
        if let Err(e) = payload_signs(&payload, digest) {
            seen.push(format!("{e:#}"));
            continue;
        }
        if let Some(key) = keys
            .iter()
            .find(|k| k.verifies(&payload, &stored.signature))
        {
            return Ok(key.name.clone());
        }
        seen.push("signed by a key not in [trust]".into());
    }
    let trusted: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
    if signatures.is_empty() {
        bail!("it is not signed (trusted keys: {})", trusted.join(", "));
    }
    bail!(
        "none of its {} signature(s) is valid by a trusted key ({}): {}",
        signatures.len(),
        trusted.join(", "),
        seen.join("; ")
    )
}

/// A signing key, decrypted.
pub struct SigningKey {
    pair: SigStoreKeyPair,
}

impl SigningKey {
    /// A new ECDSA P-256 key, as `cosign generate-key-pair` makes.
    pub fn generate() -> Result<Self> {
        let keys = ECDSAKeys::new(EllipticCurve::P256)
            .map_err(|e| anyhow!("cannot generate a key: {e}"))?;
        Ok(Self {
            pair: SigStoreKeyPair::ECDSA(keys),
        })
    }

    /// Reads an encrypted cosign private key.
    pub fn load(path: &Path, password: &[u8]) -> Result<Self> {
        let pem =
            std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
        let pair = SigStoreKeyPair::from_encrypted_pem(&pem, password)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "cannot decrypt {} (a cosign private key; is the password right?)",
                    path.display()
                )
            })?;
        Ok(Self { pair })
    }

    /// The private key, encrypted under `password`, and the public key, both
    /// PEM.
    pub fn to_pem(&self, password: &[u8]) -> Result<(String, String)> {
        let private = self
            .pair
            .private_key_to_encrypted_pem(password)
            .map_err(|e| anyhow!("cannot encrypt the key: {e}"))?;
        let public = self
            .pair
            .public_key_to_pem()
            .map_err(|e| anyhow!("cannot write the public key: {e}"))?;
        Ok((private.to_string(), public))
    }

    /// The base64 signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<String> {
        let signer = self
            .pair
            .to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1)
            .map_err(|e| anyhow!("only ECDSA P-256 keys sign here: {e}"))?;
        let signature = signer
            .sign(payload)
            .map_err(|e| anyhow!("cannot sign: {e}"))?;
        Ok(BASE64.encode(signature))
    }
}

/// A signature manifest to push, and the blobs it needs first.
pub struct Signatures {
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// (digest, content) of the payload and the config.
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// The signature manifest holding `existing`'s signatures plus a new one
/// (`payload`, `signature`), unless it holds that one already.
pub fn add_signature(
    existing: Option<&OciImageManifest>,
    payload: &[u8],
    signature: &str,
) -> Result<Signatures> {
    let payload_digest = digest_of(payload);
    let mut layers: Vec<OciDescriptor> = existing.map(|m| m.layers.clone()).unwrap_or_default();
    let already = layers.iter().any(|l| {
        l.digest == payload_digest
            && l.annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION))
                .map(String::as_str)
                == Some(signature)
    });
    if !already {
        if layers.len() >= MAX_SIGNATURES {
            bail!("the artifact already carries {MAX_SIGNATURES} signatures");
        }
        layers.push(OciDescriptor {
            media_type: SIGNATURE_MEDIA_TYPE.into(),
            digest: payload_digest.clone(),
            size: payload.len() as i64,
            urls: None,
            annotations: Some(BTreeMap::from([(
                SIGNATURE_ANNOTATION.to_string(),
                signature.to_string(),
            )])),
            artifact_type: None,
        });
    }
    // As cosign writes it: an image config whose layers are the payloads.
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        "config": {},
    }))?;
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            digest: digest_of(&config),
            size: config.len() as i64,
            urls: None,
            annotations: None,
            artifact_type: None,
        },
        layers,
        subject: None,
        artifact_type: None,
        annotations: None,
    };
    Ok(Signatures {
        manifest: serde_json::to_vec(&manifest)?,
        blobs: vec![
            (payload_digest, payload.to_vec()),
            (digest_of(&config), config),
        ],
    })
}

/// The passphrase of a private key: `PORTCULLIS_KEY_PASSWORD`, else asked
/// on the terminal (twice when `confirm`).
pub fn password(confirm: bool) -> Result<Vec<u8>> {
    if let Some(password) = std::env::var_os("PORTCULLIS_KEY_PASSWORD") {
        return Ok(password.into_encoded_bytes());
    }
    let first = rpassword::prompt_password("Passphrase for the private key: ")
        .context("no terminal to ask for the key's passphrase on: set PORTCULLIS_KEY_PASSWORD")?;
    if confirm {
        let again = rpassword::prompt_password("Again: ").context("cannot read the passphrase")?;
        if again != first {
            bail!("the passphrases differ");
        }
    }
    Ok(first.into_bytes())
}

/// `P.key` and `P.pub` for the prefix `P`.
pub fn key_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let with = |extension: &str| {
        let mut path = prefix.as_os_str().to_owned();
        path.push(extension);
        PathBuf::from(path)
    };
    (with(".key"), with(".pub"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> OciReference {
        "oci://localhost:5000/team/ro:1".parse().unwrap()
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn trusted(key: &SigningKey, dir: &Path, name: &str) -> TrustedKey {
        let (_, public) = key.to_pem(b"").unwrap();
        let path = dir.join(name);
        std::fs::write(&path, public).unwrap();
        TrustedKey::load(&path).unwrap()
    }

    #[test]
    fn a_signature_verifies_by_its_key_only_and_for_its_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let payload = payload(&reference(), DIGEST);
        let signature = ours.sign(&payload).unwrap();
        let Signatures { manifest, blobs } = add_signature(None, &payload, &signature).unwrap();
        let manifest: OciImageManifest = serde_json::from_slice(&manifest).unwrap();
        let signatures = stored(&manifest);
        let fetch = |d: &OciDescriptor| {
            let (_, bytes) = blobs
                .iter()
                .find(|(digest, _)| *digest == d.digest)
                .unwrap();
            Ok(bytes.clone())
        };
        let keys = [trusted(&ours, dir.path(), "team.pub")];
        assert!(
            signer(&keys, DIGEST, &signatures, fetch)
                .unwrap()
                .starts_with("team.pub (sha256:")
        );
        let other = DIGEST.replace("0123", "3210");
        assert!(signer(&keys, &other, &signatures, fetch).is_err());
        let strangers = [trusted(&theirs, dir.path(), "other.pub")];
        let refused = signer(&strangers, DIGEST, &signatures, fetch).unwrap_err();
        assert!(refused.to_string().contains("not in [trust]"), "{refused}");
        assert!(
            signer(&keys, DIGEST, &[], fetch)
                .unwrap_err()
                .to_string()
                .contains("not signed")
        );
    }

    #[test]
    fn signing_twice_adds_one_layer_and_another_signer_adds_another() {
        let (a, b) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let payload = payload(&reference(), DIGEST);
        let signature = a.sign(&payload).unwrap();
        let read = |s: Signatures| serde_json::from_slice::<OciImageManifest>(&s.manifest).unwrap();
        let first = read(add_signature(None, &payload, &signature).unwrap());
        let again = read(add_signature(Some(&first), &payload, &signature).unwrap());
        assert_eq!(again.layers.len(), 1);
        let both = read(add_signature(Some(&again), &payload, &b.sign(&payload).unwrap()).unwrap());
        assert_eq!(stored(&both).len(), 2);
    }

    #[test]
    fn an_encrypted_key_reads_back_with_its_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let (private, _) = key.to_pem(b"correct horse").unwrap();
        assert!(private.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"));
        let path = dir.path().join("p.key");
        std::fs::write(&path, private).unwrap();
        assert!(SigningKey::load(&path, b"wrong").is_err());
        let loaded = SigningKey::load(&path, b"correct horse").unwrap();
        let payload = payload(&reference(), DIGEST);
        let keys = [trusted(&key, dir.path(), "k.pub")];
        assert!(keys[0].verifies(&payload, &loaded.sign(&payload).unwrap()));
    }

    #[test]
    fn payloads_with_other_types_or_extra_fields_are_refused() {
        let good = payload(&reference(), DIGEST);
        assert!(payload_signs(&good, DIGEST).is_ok());
        let text = String::from_utf8(good).unwrap();
        let other_type = text.replace(PAYLOAD_TYPE, "something else");
        assert!(payload_signs(other_type.as_bytes(), DIGEST).is_err());
        let repeated = text.replacen(
            "\"docker-manifest-digest\"",
            &format!("\"docker-manifest-digest\":\"{DIGEST}\",\"docker-manifest-digest\""),
            1,
        );
        assert!(payload_signs(repeated.as_bytes(), DIGEST).is_err());
    }
}
