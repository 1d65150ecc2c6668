//! Sharing policies through OCI registries: modules named `oci://…` are
//! pulled into a content-addressed cache and checked against their digests
//! and, under `[trust]`, their cosign signatures (`sources`); `portcullis
//! policy` pushes, signs, verifies, pulls and inspects them. The artifact
//! layout is `artifact`'s, the signature format `signature`'s, the
//! distribution protocol `client`'s (its reads `pull`'s, its credentials
//! `token`'s), the cache `cache`'s.

pub mod artifact;
pub mod cache;
pub mod client;
pub mod pull;
pub mod signature;
pub mod sources;
pub mod token;

pub use sources::{Refused, Sources, resolve};
