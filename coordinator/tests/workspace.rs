//! Checks on the workspace as a whole: every dependency a member declares is used by its code.
//! (A written form of `cargo machete`: a dependency needed only for a feature or by generated
//! code is listed under `[package.metadata.cargo-machete] ignored`, with the reason beside it.)

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The dependency names of one `[dependencies]`-like section, and the ignored list.
fn declared(manifest: &str, section: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == section;
            continue;
        }
        if inside && let Some((key, _)) = line.split_once('=') {
            let name = key.trim().trim_end_matches(".workspace").trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.push(name.to_string());
            }
        }
    }
    names
}

fn ignored(manifest: &str) -> Vec<String> {
    let Some(start) = manifest.find("[package.metadata.cargo-machete]") else {
        return Vec::new();
    };
    let section = &manifest[start..];
    let Some(list) = section.split_once("ignored").map(|(_, rest)| rest) else {
        return Vec::new();
    };
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// All Rust source under `dirs` of `member`, concatenated.
fn sources(member: &Path, dirs: &[&str]) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut text = String::new();
    for dir in dirs {
        let path = member.join(dir);
        if path.is_file() {
            text.push_str(&std::fs::read_to_string(&path).unwrap());
        } else {
            walk(&path, &mut text);
        }
    }
    text
}

fn used(code: &str, dependency: &str) -> bool {
    // Packages whose library has another name.
    let ident = match dependency {
        "md-5" => "md5".to_string(),
        other => other.replace('-', "_"),
    };
    [
        format!("{ident}::"),
        format!("use {ident}"),
        format!("{ident}!"),
        format!("extern crate {ident}"),
        format!("#[{ident}::"),
    ]
    .iter()
    .any(|pattern| code.contains(pattern.as_str()))
}

#[test]
fn every_declared_dependency_is_used() {
    let root = root();
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = declared(&workspace, "[workspace]");
    assert!(members.iter().any(|m| m == "members"));
    let mut unused = Vec::new();
    for member in ["common", "proto", "coordinator", "worker"] {
        let dir = root.join(member);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let allowed = ignored(&manifest);
        let checks = [
            ("[dependencies]", sources(&dir, &["src"])),
            ("[build-dependencies]", sources(&dir, &["build.rs"])),
            (
                "[dev-dependencies]",
                sources(&dir, &["tests", "src", "benches"]),
            ),
        ];
        for (section, code) in &checks {
            for dependency in declared(&manifest, section) {
                if !allowed.contains(&dependency) && !used(code, &dependency) {
                    unused.push(format!("{member} {section} {dependency}"));
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "declared but never used (remove them, or list them under [package.metadata.cargo-machete] \
         ignored with the reason): {unused:?}"
    );
}

#[test]
fn the_check_sees_a_dependency_that_is_not_used() {
    let manifest = "[dependencies]\nserde.workspace = true\nfoo-bar = \"1\"\n[dev-dependencies]\n";
    assert_eq!(declared(manifest, "[dependencies]"), ["serde", "foo-bar"]);
    let code = "use serde::Deserialize;";
    assert!(used(code, "serde"));
    assert!(!used(code, "foo-bar"));
    assert!(used("foo_bar::x()", "foo-bar"));
    let manifest = "[package.metadata.cargo-machete]\nignored = [\"a\", \"b-c\"]\n";
    assert_eq!(ignored(manifest), ["a", "b-c"]);
}
