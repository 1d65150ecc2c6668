//! Secret references in the config: `${env:NAME}` and `${file:PATH}`,
//! resolved when the config is loaded, so secrets stay out of the file.

use super::*;

pub(super) fn resolve_all(
    values: &BTreeMap<String, String>,
    base: &Path,
    what: &str,
) -> Result<BTreeMap<String, String>> {
    values
        .iter()
        .map(|(key, value)| {
            let resolved = resolve_secret(value, base).with_context(|| format!("{what} {key}"))?;
            Ok((key.clone(), resolved))
        })
        .collect()
}

/// `value` with each `${env:NAME}` / `${file:PATH}` reference in it replaced
/// by what it names.
pub fn resolve_secret(value: &str, base: &Path) -> Result<String> {
    let mut resolved = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        resolved.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .with_context(|| format!("unclosed reference in '{value}'"))?;
        resolved.push_str(&resolve_reference(&rest[start + 2..start + end], base)?);
        rest = &rest[start + end + 1..];
    }
    resolved.push_str(rest);
    Ok(resolved)
}

fn resolve_reference(reference: &str, base: &Path) -> Result<String> {
    if let Some(name) = reference.strip_prefix("env:") {
        return std::env::var(name)
            .with_context(|| format!("environment variable {name} is not set"));
    }
    if let Some(path) = reference.strip_prefix("file:") {
        let path = base.join(path);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    }
    bail!("unknown reference '${{{reference}}}' (use ${{env:NAME}} or ${{file:PATH}})")
}
