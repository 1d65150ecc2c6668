//! The shape of a policy in a registry: the CNCF WebAssembly artifact layout
//! (config `application/vnd.wasm.config.v0+json`, one `application/wasm`
//! layer), with the component's WIT world, exports and imports in the
//! config and as annotations, and the policy's fixture files as further
//! layers of their own media type. Building one to push, and reading one
//! pulled, with every size bounded.

use crate::registry::cache::digest_of;
use anyhow::{Context, Result, bail};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The config blob's media type (CNCF TAG Runtime's WASM OCI artifact).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The component layer's media type.
pub const WASM_MEDIA_TYPE: &str = "application/wasm";
/// A fixture file's layer (a JSON array of cases, as `portcullis test` reads).
pub const FIXTURES_MEDIA_TYPE: &str = "application/vnd.portcullis.fixtures.v1+json";
/// The standard annotation naming a layer's file.
pub const TITLE: &str = "org.opencontainers.image.title";
/// Annotation: the WIT world the component targets, when recognised.
pub const WORLD: &str = "dev.portcullis.wit.world";
/// Annotation: the component's exports, comma-separated.
pub const EXPORTS: &str = "dev.portcullis.wit.exports";
/// Annotation: the component's imports, comma-separated.
pub const IMPORTS: &str = "dev.portcullis.wit.imports";

/// The largest manifest or config read.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The largest component read (a Python policy is about 18 MiB).
pub const MAX_MODULE_BYTES: u64 = 128 << 20;
/// The largest fixture file read.
pub const MAX_FIXTURE_BYTES: u64 = 4 << 20;
/// The most fixture layers read.
pub const MAX_FIXTURES: usize = 64;

/// What a component says of itself, read from its binary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// The world it targets, when its exports are those of a world
    /// Portcullis knows.
    #[serde(rename = "target", skip_serializing_if = "Option::is_none")]
    pub world: Option<String>,
    /// Exported interfaces and functions.
    pub exports: Vec<String>,
    /// Imported interfaces and functions.
    pub imports: Vec<String>,
}

/// The worlds of this project's WIT packages, by the interface each exports.
const WORLDS: [(&str, &str); 2] = [
    ("portcullis:policy/hooks", "portcullis:policy/policy"),
    ("portcullis:sink/deliver", "portcullis:sink/sink"),
];

impl Description {
    /// Reads the top-level imports and exports of the component `wasm`;
    /// fails for anything that is not a component.
    pub fn of(wasm: &[u8]) -> Result<Self> {
        use wasmparser::{Parser, Payload};
        let mut description = Self::default();
        let mut depth = 0usize;
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.context("not a WebAssembly binary")? {
                Payload::Version { encoding, .. } => {
                    if depth == 0 && encoding != wasmparser::Encoding::Component {
                        bail!("a core WebAssembly module, not a component");
                    }
                    depth += 1;
                }
                Payload::End(_) => depth = depth.saturating_sub(1),
                Payload::ComponentImportSection(imports) if depth == 1 => {
                    for import in imports {
                        description.imports.push(import?.name.name.to_string());
                    }
                }
                Payload::ComponentExportSection(exports) if depth == 1 => {
                    for export in exports {
                        description.exports.push(export?.name.name.to_string());
                    }
                }
                _ => {}
            }
        }
        description.world = description.exports.iter().find_map(|export| {
            let (interface, version) = match export.split_once('@') {
                Some((interface, version)) => (interface, Some(version)),
                None => (export.as_str(), None),
            };
            let (_, world) = WORLDS.iter().find(|(exported, _)| *exported == interface)?;
            Some(match version {
                Some(version) => format!("{world}@{version}"),
                None => world.to_string(),
            })
        });
        Ok(description)
    }

    fn annotations(&self) -> BTreeMap<String, String> {
        let mut annotations = BTreeMap::new();
        if let Some(world) = &self.world {
            annotations.insert(WORLD.into(), world.clone());
        }
        if !self.exports.is_empty() {
            annotations.insert(EXPORTS.into(), self.exports.join(","));
        }
        if !self.imports.is_empty() {
            annotations.insert(IMPORTS.into(), self.imports.join(","));
        }
        annotations
    }
}

/// The config blob of a WASM artifact.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig<'a> {
    created: String,
    architecture: &'static str,
    os: &'static str,
    layer_digests: Vec<String>,
    component: &'a Description,
}

/// A blob to push: its bytes and descriptor.
pub struct Blob {
    /// The content.
    pub bytes: Vec<u8>,
    /// How the manifest names it.
    pub descriptor: OciDescriptor,
}

impl Blob {
    fn new(bytes: Vec<u8>, media_type: &str, annotations: BTreeMap<String, String>) -> Self {
        let descriptor = OciDescriptor {
            media_type: media_type.into(),
            digest: digest_of(&bytes),
            size: bytes.len() as i64,
            urls: None,
            annotations: (!annotations.is_empty()).then_some(annotations),
            artifact_type: None,
        };
        Self { bytes, descriptor }
    }
}

/// An artifact ready to push: its blobs (config first) and its manifest.
pub struct Artifact {
    /// The config, then the layers.
    pub blobs: Vec<Blob>,
    /// The manifest's bytes, as pushed and as its digest is taken.
    pub manifest: Vec<u8>,
    /// What the component says of itself.
    pub description: Description,
}

impl Artifact {
    /// The artifact of the component `wasm` named `file_name`, with
    /// `fixtures` (file name, content) as layers after it.
    pub fn build(wasm: Vec<u8>, file_name: &str, fixtures: Vec<(String, Vec<u8>)>) -> Result<Self> {
        let description = Description::of(&wasm)?;
        let title = |name: &str| BTreeMap::from([(TITLE.to_string(), name.to_string())]);
        let module = Blob::new(wasm, WASM_MEDIA_TYPE, title(file_name));
        let mut layers = vec![module];
        if fixtures.len() > MAX_FIXTURES {
            bail!("at most {MAX_FIXTURES} fixture files travel with a module");
        }
        for (name, bytes) in fixtures {
            serde_json::from_slice::<Vec<serde_json::Value>>(&bytes)
                .with_context(|| format!("fixture {name} is not a JSON array of cases"))?;
            layers.push(Blob::new(bytes, FIXTURES_MEDIA_TYPE, title(&name)));
        }
        let config = WasmConfig {
            created: crate::util::clock::rfc3339_now(),
            architecture: "wasm",
            os: "wasip2",
            layer_digests: vec![layers[0].descriptor.digest.clone()],
            component: &description,
        };
        let config = Blob::new(
            serde_json::to_vec(&config)?,
            CONFIG_MEDIA_TYPE,
            BTreeMap::new(),
        );
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(crate::registry::client::MANIFEST_MEDIA_TYPE.into()),
            config: config.descriptor.clone(),
            layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
            subject: None,
            artifact_type: None,
            annotations: Some(description.annotations()),
        };
        let manifest = serde_json::to_vec(&manifest)?;
        let mut blobs = vec![config];
        blobs.extend(layers);
        Ok(Self {
            blobs,
            manifest,
            description,
        })
    }
}

/// A pulled artifact's manifest, read: where its component and fixtures are.
#[derive(Debug)]
pub struct Contents {
    /// The manifest as read.
    pub manifest: OciImageManifest,
    /// The component's layer.
    pub module: OciDescriptor,
    /// The fixture layers.
    pub fixtures: Vec<OciDescriptor>,
}

impl Contents {
    /// Reads a manifest: exactly one `application/wasm` layer, at most
    /// [`MAX_FIXTURES`] fixture layers, sizes within bounds. Other layers are
    /// ignored; JSON another reader could read differently is refused.
    pub fn read(manifest: &[u8]) -> Result<Self> {
        let manifest = read_manifest(manifest)?;
        let mut modules = manifest
            .layers
            .iter()
            .filter(|l| l.media_type == WASM_MEDIA_TYPE);
        let module = match (modules.next(), modules.next()) {
            (Some(module), None) => module.clone(),
            (None, _) => {
                bail!("the artifact has no {WASM_MEDIA_TYPE} layer: it is not a WebAssembly module")
            }
            (Some(_), Some(_)) => bail!("the artifact has more than one {WASM_MEDIA_TYPE} layer"),
        };
        check_size(&module, MAX_MODULE_BYTES)?;
        let fixtures: Vec<_> = manifest
            .layers
            .iter()
            .filter(|l| l.media_type == FIXTURES_MEDIA_TYPE)
            .cloned()
            .collect();
        if fixtures.len() > MAX_FIXTURES {
            bail!("the artifact has more than {MAX_FIXTURES} fixture layers");
        }
        for fixture in &fixtures {
            check_size(fixture, MAX_FIXTURE_BYTES)?;
        }
        Ok(Self {
            manifest,
            module,
            fixtures,
        })
    }
}

/// An OCI image manifest from `bytes`, refusing JSON that parsers could
/// read differently (repeated names, odd numbers, lone surrogates).
pub fn read_manifest(bytes: &[u8]) -> Result<OciImageManifest> {
    let text = std::str::from_utf8(bytes).context("the manifest is not UTF-8")?;
    crate::protocol::strict_json::check(text)
        .map_err(|refusal| anyhow::anyhow!("the manifest is ambiguous JSON: {refusal}"))?;
    // An index that also carries layers reads as one thing to other tools
    // and as another here: neither is taken.
    let shape: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).context("the manifest is not a JSON object")?;
    if shape.contains_key("manifests") {
        bail!("an image index, not an image manifest");
    }
    if let Some(media_type) = shape.get("mediaType")
        && media_type.as_str() != Some(crate::registry::client::MANIFEST_MEDIA_TYPE)
    {
        bail!("a manifest of media type {media_type}, not an OCI image manifest");
    }
    let manifest: OciImageManifest =
        serde_json::from_str(text).context("not an OCI image manifest")?;
    if manifest.schema_version != 2 {
        bail!(
            "manifest schema version {} (expected 2)",
            manifest.schema_version
        );
    }
    Ok(manifest)
}

/// Refuses a descriptor whose size is negative or over `limit`, or whose
/// digest is not sha256.
pub fn check_size(descriptor: &OciDescriptor, limit: u64) -> Result<()> {
    if !crate::config::is_sha256_digest(&descriptor.digest) {
        bail!("layer digest '{}' is not sha256", descriptor.digest);
    }
    if descriptor.size < 0 || descriptor.size as u64 > limit {
        bail!(
            "layer {} is {} bytes; at most {limit} are read",
            descriptor.digest,
            descriptor.size
        );
    }
    Ok(())
}

/// The file name a layer was pushed with, else its digest.
pub fn title(descriptor: &OciDescriptor) -> String {
    descriptor
        .annotations
        .as_ref()
        .and_then(|a| a.get(TITLE))
        .cloned()
        .unwrap_or_else(|| descriptor.digest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component() -> Vec<u8> {
        // The smallest component: the preamble of the component encoding.
        vec![0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00]
    }

    #[test]
    fn an_artifact_reads_back_as_built() {
        let fixtures = vec![("ro.fixtures.json".to_string(), b"[]".to_vec())];
        let artifact = Artifact::build(component(), "ro.wasm", fixtures).unwrap();
        let contents = Contents::read(&artifact.manifest).unwrap();
        assert_eq!(contents.module.digest, digest_of(&component()));
        assert_eq!(title(&contents.module), "ro.wasm");
        assert_eq!(contents.fixtures.len(), 1);
        assert_eq!(title(&contents.fixtures[0]), "ro.fixtures.json");
        assert_eq!(contents.manifest.config.media_type, CONFIG_MEDIA_TYPE);
        assert_eq!(artifact.blobs.len(), 3);
    }

    #[test]
    fn refuses_core_modules_and_bad_fixtures() {
        let core = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
        assert!(Artifact::build(core, "m.wasm", vec![]).is_err());
        let bad = vec![("f.json".to_string(), b"{}".to_vec())];
        assert!(Artifact::build(component(), "m.wasm", bad).is_err());
    }

    #[test]
    fn refuses_manifests_without_one_module_or_with_oversized_layers() {
        let layer = |media: &str, size: i64| serde_json::json!({"mediaType": media, "digest": digest_of(media.as_bytes()), "size": size});
        let manifest = |layers: Vec<serde_json::Value>| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "config": layer(CONFIG_MEDIA_TYPE, 2),
                "layers": layers,
            }))
            .unwrap()
        };
        assert!(Contents::read(&manifest(vec![])).is_err());
        assert!(
            Contents::read(&manifest(vec![
                layer(WASM_MEDIA_TYPE, 1),
                layer(WASM_MEDIA_TYPE, 1)
            ]))
            .is_err()
        );
        assert!(Contents::read(&manifest(vec![layer(WASM_MEDIA_TYPE, -1)])).is_err());
        assert!(Contents::read(&manifest(vec![layer(WASM_MEDIA_TYPE, 1 << 40)])).is_err());
        assert!(Contents::read(&manifest(vec![layer(WASM_MEDIA_TYPE, 10)])).is_ok());
        let index = br#"{"schemaVersion":2,"manifests":[],"config":{"mediaType":"a","digest":"b","size":1},"layers":[]}"#;
        assert!(
            read_manifest(index)
                .unwrap_err()
                .to_string()
                .contains("index")
        );
        let repeated = br#"{"schemaVersion":2,"schemaVersion":2,"config":{},"layers":[]}"#;
        assert!(
            read_manifest(repeated)
                .unwrap_err()
                .to_string()
                .contains("ambiguous")
        );
    }
}
