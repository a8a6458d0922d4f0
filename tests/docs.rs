//! The documentation stays true to the code and to itself: every setting the
//! binary reads is in the README's configuration table, every flag of every
//! subcommand's `--help` is in the README's tables and every flag there is
//! in some `--help`, relative links and
//! their anchors resolve, and the architecture picture is a PNG committed
//! beside its Graphviz source.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `LEASEHOLD_*` variables of `leasehold serve`, from its clap `env = "..."`.
fn serve_env_vars() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    for file in ["src/cli/mod.rs", "src/cli/serve.rs"] {
        let text = read(&repo().join(file));
        for piece in text.split("env = \"").skip(1) {
            if let Some((name, _)) = piece.split_once('"') {
                vars.insert(name.to_string());
            }
        }
    }
    vars
}

#[test]
fn every_serve_setting_is_in_the_readme_table() {
    let readme = read(&repo().join("README.md"));
    let vars = serve_env_vars();
    assert!(vars.len() >= 20, "{vars:?}");
    for var in &vars {
        assert!(
            readme
                .lines()
                .any(|l| l.starts_with("| `--") && l.contains(&format!("`{var}`"))),
            "README's configuration table has no row for {var}"
        );
    }
}

/// The long flags `leasehold SUBCOMMAND --help` lists (without `--help`).
fn help_flags(subcommand: &str) -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([subcommand, "--help"])
        .output()
        .expect("run leasehold --help");
    assert!(out.status.success(), "{subcommand} --help");
    let text = String::from_utf8(out.stdout).expect("UTF-8 help");
    let flags: BTreeSet<String> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.split_once(", ") {
                Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                _ => line,
            };
            line.starts_with("--").then(|| flag_at(line))
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    assert!(!flags.is_empty(), "no flags in {subcommand} --help");
    flags
}

/// The `--flag` at the start of `text`.
fn flag_at(text: &str) -> String {
    let end = text[2..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .map_or(text.len(), |i| i + 2);
    text[..end].to_string()
}

/// One row of a README flag table: its flags, and the subcommands named in
/// parentheses in its first cell (`None`: every subcommand of the table).
struct Row {
    flags: BTreeSet<String>,
    only: Option<BTreeSet<String>>,
    line: String,
}

/// The rows of the flag table under the README heading `heading`.
fn table(readme: &str, heading: &str) -> Vec<Row> {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading}"));
    let section = &readme[start + heading.len() + 2..];
    let section = &section[..section.find("\n##").unwrap_or(section.len())];
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `--")) {
        let first = line.split('|').nth(1).unwrap_or_default();
        let flags: BTreeSet<String> = first
            .match_indices("`--")
            .map(|(i, _)| flag_at(&first[i + 1..]))
            .collect();
        let only = first.split_once('(').map(|(_, names)| {
            names
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<BTreeSet<_>>()
        });
        rows.push(Row {
            flags,
            only,
            line: line.to_string(),
        });
    }
    assert!(rows.len() >= 10, "{heading}: {} rows", rows.len());
    rows
}

/// Flags every subcommand has (global ones), documented with `serve`'s.
const GLOBAL: [&str; 2] = ["--log-format", "--worker-threads"];
/// The subcommands the README's command-line table documents.
const CLIENT_COMMANDS: [&str; 9] = [
    "lock",
    "elect",
    "watch",
    "acquire",
    "release",
    "renew",
    "describe",
    "list",
    "force-release",
];

#[test]
fn every_help_flag_is_in_a_readme_table_and_back() {
    let readme = read(&repo().join("README.md"));
    let config: BTreeSet<String> = table(&readme, "## Configuration")
        .into_iter()
        .flat_map(|r| r.flags)
        .collect();
    assert_eq!(
        help_flags("serve"),
        config,
        "`leasehold serve --help` and the README's Configuration table differ"
    );
    let rows = table(&readme, "### Command line");
    for command in CLIENT_COMMANDS {
        let help = help_flags(command);
        for flag in help.iter().filter(|f| !GLOBAL.contains(&f.as_str())) {
            let documented = rows.iter().any(|r| {
                r.flags.contains(flag) && r.only.as_ref().is_none_or(|o| o.contains(command))
            });
            assert!(
                documented,
                "README's command-line table lacks `{command} {flag}`"
            );
        }
        for row in &rows {
            if row.only.as_ref().is_none_or(|o| o.contains(command)) {
                for flag in &row.flags {
                    assert!(
                        help.contains(flag),
                        "`{command} --help` has no {flag}: {}",
                        row.line
                    );
                }
            }
        }
    }
    for row in &rows {
        for command in row.only.iter().flatten() {
            assert!(CLIENT_COMMANDS.contains(&command.as_str()), "{}", row.line);
        }
    }
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `(target, line)` of every relative Markdown link `](target)`.
fn relative_links(markdown: &str) -> Vec<(String, String)> {
    let mut links = Vec::new();
    for line in markdown.lines() {
        for piece in line.split("](").skip(1) {
            let Some((target, _)) = piece.split_once(')') else {
                continue;
            };
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            links.push((target.to_string(), line.to_string()));
        }
    }
    links
}

#[test]
fn relative_links_and_anchors_resolve() {
    let files = [
        "README.md",
        "documentation/architecture.md",
        "documentation/api.md",
        "documentation/operations.md",
        "documentation/semantics.md",
        "documentation/redis.md",
        "documentation/security.md",
        "deploy/README.md",
        "clients/python/README.md",
    ];
    let mut checked = 0;
    for file in files {
        let path = repo().join(file);
        let text = read(&path);
        let dir = path.parent().expect("parent");
        for (target, line) in relative_links(&text) {
            let (file_part, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved: PathBuf = if file_part.is_empty() {
                path.clone()
            } else {
                dir.join(file_part)
            };
            assert!(
                resolved.exists(),
                "{file}: link to {target} does not resolve: {line}"
            );
            if let Some(anchor) = anchor {
                let targets = anchors(&read(&resolved));
                assert!(
                    targets.contains(anchor),
                    "{file}: no heading #{anchor} in {file_part}: {targets:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} links checked");
}

#[test]
fn architecture_picture_is_a_png_beside_its_source() {
    let dir = repo().join("documentation");
    let dot = read(&dir.join("architecture.dot"));
    assert!(dot.contains("digraph"), "Graphviz source");
    for shown in ["KeepAlive", "Redis Cluster", "SPUBLISH", "leasehold serve"] {
        assert!(dot.contains(shown), "the diagram shows {shown}");
    }
    let png = std::fs::read(dir.join("architecture.png")).expect("architecture.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width >= 800 && height >= 200, "{width}x{height}");
    let md = read(&dir.join("architecture.md"));
    assert!(md.contains("](architecture.png)") && md.contains("architecture.dot"));
}
