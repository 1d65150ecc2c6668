//! `portcullis new`: writes a policy project that builds and passes its own
//! fixtures out of the box, in Rust, JavaScript, Python or C.
//!
//! The project carries this binary's copy of the WIT contract (and, for Rust
//! and C, of the guest helpers), so what it builds matches the host that made
//! it. The templates live in `host/templates/`; the reference policies in
//! `examples/policies/` are built with the same build scripts.

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use std::path::{Path, PathBuf};

/// The languages a policy project can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Language {
    /// Rust, with the Portcullis guest SDK (`wasm32-wasip2`).
    Rust,
    /// JavaScript, with componentize-js.
    Js,
    /// Python, with componentize-py.
    Python,
    /// C, with clang, wasi-libc and wit-bindgen.
    C,
}

/// One file of a project: where it goes, what it holds, whether it runs.
struct Template {
    path: &'static str,
    contents: &'static str,
    executable: bool,
}

const fn file(path: &'static str, contents: &'static str) -> Template {
    Template {
        path,
        contents,
        executable: false,
    }
}

const fn script(path: &'static str, contents: &'static str) -> Template {
    Template {
        path,
        contents,
        executable: true,
    }
}

const COMMON: &[Template] = &[
    file("wit/policy.wit", include_str!("../../../wit/policy.wit")),
    file(
        "README.md",
        include_str!("../../templates/common/README.md"),
    ),
    file(
        "portcullis.toml",
        include_str!("../../templates/common/portcullis.toml"),
    ),
    file(
        "fixtures/sample.json",
        include_str!("../../templates/common/fixtures/sample.json"),
    ),
    file(
        "call.json",
        include_str!("../../templates/common/call.json"),
    ),
];

const RUST: &[Template] = &[
    file(
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    file("src/lib.rs", include_str!("../../templates/rust/lib.rs")),
    script("build", include_str!("../../templates/rust/build")),
    file(
        "vendor/portcullis-policy/Cargo.toml",
        include_str!("../../templates/rust/sdk.Cargo.toml"),
    ),
    file(
        "vendor/portcullis-policy/src/lib.rs",
        include_str!("../../../policies/sdk/src/lib.rs"),
    ),
    file(
        "vendor/portcullis-policy/src/secrets.rs",
        include_str!("../../../policies/sdk/src/secrets.rs"),
    ),
    file(
        "vendor/portcullis-policy/src/document.rs",
        include_str!("../../../policies/sdk/src/document.rs"),
    ),
    file(
        "vendor/portcullis-policy/src/coverage.rs",
        include_str!("../../../policies/sdk/src/coverage.rs"),
    ),
];

const JS: &[Template] = &[
    file(
        "package.json",
        include_str!("../../templates/js/package.json"),
    ),
    file("policy.js", include_str!("../../templates/js/policy.js")),
    script("build", include_str!("../../templates/js/build")),
];

const PYTHON: &[Template] = &[
    file("app.py", include_str!("../../templates/python/app.py")),
    file(
        "requirements.txt",
        include_str!("../../templates/python/requirements.txt"),
    ),
    script("build", include_str!("../../templates/python/build")),
];

const C: &[Template] = &[
    file("src/policy.c", include_str!("../../templates/c/policy.c")),
    file(
        "src/portcullis_json.h",
        include_str!("../../../policies/sdk-c/portcullis_json.h"),
    ),
    script("build", include_str!("../../templates/c/build")),
];

impl Language {
    fn templates(self) -> &'static [Template] {
        match self {
            Language::Rust => RUST,
            Language::Js => JS,
            Language::Python => PYTHON,
            Language::C => C,
        }
    }

    /// The words the README fills in: language, policy source, toolchain.
    fn describe(self) -> [&'static str; 3] {
        match self {
            Language::Rust => ["Rust", "src/lib.rs", "cargo, target wasm32-wasip2"],
            Language::Js => ["JavaScript", "policy.js", "componentize-js from npm"],
            Language::Python => ["Python", "app.py", "componentize-py from PyPI"],
            Language::C => [
                "C",
                "src/policy.c",
                "clang + wasi-libc, wit-bindgen, wasm-tools",
            ],
        }
    }

    /// What the project's `.gitignore` lists.
    fn ignored(self) -> &'static str {
        match self {
            Language::Rust => "/dist/\n/target/\n/audit.jsonl\n",
            Language::Js => "/dist/\n/node_modules/\n/audit.jsonl\n",
            Language::Python => "/dist/\n/.venv/\n__pycache__/\n/audit.jsonl\n",
            Language::C => "/dist/\n/target/\n/audit.jsonl\n",
        }
    }
}

/// Checks that `name` can name a package in every language's tooling.
pub fn validate_name(name: &str) -> Result<()> {
    let well_formed = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !well_formed {
        bail!(
            "policy name '{name}': use 1 to 64 lowercase letters, digits and '-', starting with a letter"
        );
    }
    Ok(())
}

/// The project's files with `{{name}}` and the README's words filled in.
pub fn render(name: &str, language: Language) -> Vec<(&'static str, String, bool)> {
    let [language_name, source, toolchain] = language.describe();
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{language}}", language_name)
            .replace("{{source}}", source)
            .replace("{{toolchain}}", toolchain)
    };
    COMMON
        .iter()
        .chain(language.templates())
        .map(|t| (t.path, fill(t.contents), t.executable))
        .chain([(".gitignore", language.ignored().to_string(), false)])
        .collect()
}

/// Writes a new project for policy `name` into `dir`, which must not exist
/// or be empty, and returns the files written.
pub fn create(dir: &Path, name: &str, language: Language) -> Result<Vec<PathBuf>> {
    validate_name(name)?;
    if dir
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        bail!("{} already exists and is not empty", dir.display());
    }
    let mut written = Vec::new();
    for (relative, contents, executable) in render(name, language) {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        if executable {
            make_executable(&path)?;
        }
        written.push(path);
    }
    Ok(written)
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path)?.permissions();
    permissions.set_mode(permissions.mode() | 0o111);
    std::fs::set_permissions(path, permissions)
        .with_context(|| format!("making {} executable", path.display()))
}

/// `portcullis new`: writes the project and says what to do next.
pub fn run(name: &str, language: Language, dir: Option<&Path>) -> Result<()> {
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    let written = create(&dir, name, language)?;
    println!(
        "created {} ({} files, {})",
        dir.display(),
        written.len(),
        language.describe()[0]
    );
    println!("next:\n  cd {}", dir.display());
    println!("  ./build");
    println!("  portcullis test dist/policy.wasm fixtures/*.json");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names_must_suit_every_toolchain() {
        for good in ["guard", "no-deletes", "team-a2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Guard", "2fast", "a_b", "../x", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_language_gets_the_contract_the_fixtures_and_a_build_script() {
        for language in Language::value_variants() {
            let files = render("demo", *language);
            let paths: Vec<_> = files.iter().map(|(path, _, _)| *path).collect();
            for expected in [
                "wit/policy.wit",
                "fixtures/sample.json",
                "build",
                ".gitignore",
            ] {
                assert!(paths.contains(&expected), "{language:?} lacks {expected}");
            }
            assert!(files.iter().all(|(_, text, _)| !text.contains("{{")));
            assert!(files.iter().any(|(path, _, run)| *path == "build" && *run));
            let readme = &files.iter().find(|(p, _, _)| *p == "README.md").unwrap().1;
            assert!(readme.starts_with("# demo\n"));
        }
    }

    #[test]
    fn a_project_is_not_written_over_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
        let error = create(dir.path(), "demo", Language::C).unwrap_err();
        assert!(error.to_string().contains("not empty"));
        let fresh = dir.path().join("fresh");
        let written = create(&fresh, "demo", Language::Rust).unwrap();
        assert!(written.contains(&fresh.join("vendor/portcullis-policy/src/lib.rs")));
        assert!(fresh.join("build").metadata().unwrap().permissions().mode() & 0o111 != 0);
    }
}
