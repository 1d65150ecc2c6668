//! Argument guard: refuses tool calls whose arguments break a rule — a path
//! outside the allowed roots, a value that looks like a secret, or a value
//! containing a forbidden text. Paths are checked lexically (`.` and `..`
//! resolved, no filesystem access), so a relative path is refused when roots
//! are set.

use portcullis_policy::{Exchange, Globs, Policy, Value, Verdict, secrets};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Tools the rules apply to.
    #[serde(default = "everything")]
    tools: Globs,
    /// Directories path arguments must stay inside; empty disables the check.
    #[serde(default)]
    roots: Vec<String>,
    /// Names of the arguments that hold a path or a list of paths.
    #[serde(default = "path_arguments")]
    path_arguments: Vec<String>,
    /// Refuse arguments that look like secrets.
    #[serde(default = "yes")]
    secrets: bool,
    /// Texts no argument value may contain.
    #[serde(default)]
    forbid: Vec<Forbidden>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Forbidden {
    contains: String,
    reason: String,
}

fn everything() -> Globs {
    Globs::new(&["*"])
}

fn yes() -> bool {
    true
}

fn path_arguments() -> Vec<String> {
    ["path", "paths", "source", "destination"]
        .map(String::from)
        .to_vec()
}

/// Resolves `.` and `..` in an absolute path; `None` for a relative path.
fn normalize(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

fn inside(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
        || root.is_empty()
}

impl Settings {
    fn check_path(&self, name: &str, path: &str) -> Result<(), String> {
        let inside_a_root = normalize(path).is_some_and(|p| {
            self.roots
                .iter()
                .filter_map(|r| normalize(r))
                .any(|r| inside(&p, &r))
        });
        if inside_a_root {
            Ok(())
        } else {
            Err(format!(
                "argument '{name}' path '{path}' is outside the allowed roots"
            ))
        }
    }

    fn check_value(&self, name: &str, value: &Value) -> Result<(), String> {
        match value {
            Value::String(text) => {
                if self.secrets
                    && let Some(found) = secrets::find(text).first()
                {
                    return Err(format!(
                        "argument '{name}' holds what looks like a {}",
                        found.kind
                    ));
                }
                match self.forbid.iter().find(|f| text.contains(&f.contains)) {
                    Some(f) => Err(format!("argument '{name}': {}", f.reason)),
                    None => Ok(()),
                }
            }
            Value::Array(items) => items.iter().try_for_each(|v| self.check_value(name, v)),
            Value::Object(fields) => fields
                .iter()
                .try_for_each(|(k, v)| self.check_value(&format!("{name}.{k}"), v)),
            _ => Ok(()),
        }
    }

    fn check(&self, arguments: &Value) -> Result<(), String> {
        let Some(fields) = arguments.as_object() else {
            return Ok(());
        };
        for (name, value) in fields {
            if !self.roots.is_empty() && self.path_arguments.contains(name) {
                let paths: Vec<&Value> = match value {
                    Value::Array(items) => items.iter().collect(),
                    single => vec![single],
                };
                for path in paths {
                    let text = path
                        .as_str()
                        .ok_or_else(|| format!("argument '{name}' is not a path string"))?;
                    self.check_path(name, text)?;
                }
            }
            self.check_value(name, value)?;
        }
        Ok(())
    }
}

struct ArgumentGuard;

impl Policy for ArgumentGuard {
    type Settings = Settings;

    fn check(settings: &Settings) -> Result<(), String> {
        match settings.roots.iter().find(|r| normalize(r).is_none()) {
            Some(root) => Err(format!("root '{root}' must be an absolute path")),
            None => Ok(()),
        }
    }

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        let tool = exchange.tool.as_deref().unwrap_or("");
        if !exchange.is_tool_call() || !settings.tools.matches(tool) {
            return Verdict::allow();
        }
        match settings.check(&exchange.arguments()) {
            Ok(()) => Verdict::allow(),
            Err(reason) => Verdict::deny(reason).tag("bad-arguments"),
        }
    }
}

portcullis_policy::export!(ArgumentGuard);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_dots_and_refuses_relative_paths() {
        assert_eq!(normalize("/a/./b/../c/").as_deref(), Some("/a/c"));
        assert_eq!(normalize("/../etc").as_deref(), Some("/etc"));
        assert_eq!(normalize("a/b"), None);
    }

    #[test]
    fn inside_respects_component_boundaries() {
        assert!(inside("/tmp/sandbox/x", "/tmp/sandbox"));
        assert!(inside("/tmp/sandbox", "/tmp/sandbox/"));
        assert!(!inside("/tmp/sandbox-evil/x", "/tmp/sandbox"));
        assert!(inside("/anything", "/"));
    }
}
