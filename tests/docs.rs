//! The documents stay true: the README (the operator's manual) must name every option the
//! binary has, and every variable it names must exist; src/LIFECYCLE.md must name every
//! session state where the code defines it.

use std::process::Command;

fn help_vars() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split("[env ")
        .skip(1)
        .filter_map(|rest| rest.split(']').next().map(str::to_owned))
        .collect()
}

#[test]
fn the_readme_documents_every_option() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let vars = help_vars();
    assert!(vars.len() > 30, "{vars:?}");
    for var in &vars {
        assert!(
            readme.contains(&format!("| `{var}` |")),
            "README.md's configuration table lacks {var}"
        );
    }
    // And the table names nothing the binary does not know.
    for line in readme
        .lines()
        .filter(|l| l.starts_with("| `") && l.contains("` | `--"))
    {
        let var = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            vars.iter().any(|v| v == var),
            "README documents unknown option {var}"
        );
    }
}

/// The variants of `enum State` in src/session.rs, with their line numbers.
fn session_states() -> Vec<(String, usize)> {
    let src = std::fs::read_to_string("src/session.rs").unwrap();
    let lines: Vec<&str> = src.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("enum State"))
        .expect("enum State in src/session.rs");
    let mut states = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        if line.starts_with('}') {
            break;
        }
        // A variant starts four spaces in with an upper-case name.
        let Some(rest) = line.strip_prefix("    ") else {
            continue;
        };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
        let after = &rest[name.len()..];
        if name.starts_with(|c: char| c.is_ascii_uppercase())
            && (after.starts_with(" {") || after.starts_with(',') || after.starts_with('('))
        {
            states.push((name, i + 1));
        }
    }
    states
}

#[test]
fn the_lifecycle_document_names_every_session_state_where_it_is() {
    let doc = std::fs::read_to_string("src/LIFECYCLE.md").unwrap();
    let states = session_states();
    assert!(states.len() >= 8, "{states:?}");
    let diagram = doc
        .split("```")
        .nth(1)
        .expect("a diagram in src/LIFECYCLE.md");
    let table: Vec<String> = states
        .iter()
        .map(|(name, line)| format!("| `{name}` | `src/session.rs:{line}` |"))
        .collect();
    for ((name, _), row) in states.iter().zip(&table) {
        assert!(
            diagram.contains(name.as_str()),
            "src/LIFECYCLE.md's diagram lacks the state {name}"
        );
        assert!(
            doc.lines().any(|l| l.starts_with(row.as_str())),
            "src/LIFECYCLE.md's state table should have a row starting {row}; the rows now:\n{}",
            table.join("\n")
        );
    }
    // And it names no state the code does not have.
    for line in doc.lines().filter(|l| l.contains("| `src/session.rs:")) {
        let name = line
            .trim_start_matches("| `")
            .split('`')
            .next()
            .unwrap_or("");
        assert!(
            states.iter().any(|(s, _)| s == name),
            "src/LIFECYCLE.md documents a state the code lacks: {name}"
        );
    }
}

/// `--help`'s options: (variable, flag, default, help line).
fn help_options() -> Vec<(String, String, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut options = Vec::new();
    for pair in lines.windows(2) {
        let (head, help) = (pair[0].trim(), pair[1].trim());
        let Some((flag, rest)) = head.split_once(" <value>") else {
            continue;
        };
        let var = rest.split("[env ").nth(1).and_then(|r| r.split(']').next());
        let default = rest
            .split("[default: ")
            .nth(1)
            .and_then(|r| r.rsplit_once(']'));
        if let (Some(var), Some((default, _))) = (var, default) {
            options.push((var.into(), flag.into(), default.into(), help.into()));
        }
    }
    options
}

#[test]
fn the_readme_table_is_the_help_table() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let options = help_options();
    assert_eq!(options.len(), help_vars().len(), "{options:?}");
    for (var, flag, default, help) in options {
        let default = if default == "none" {
            default
        } else {
            format!("`{default}`")
        };
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{var}` |")))
            .unwrap_or_else(|| panic!("README.md has no row for {var}"));
        // The README may set names in code type; the words are the help's.
        let want = format!("| `{var}` | `{flag}` | {default} | {help} |");
        assert_eq!(
            row.replace('`', ""),
            want.replace('`', ""),
            "README.md's row for {var} should say what --help says"
        );
        assert!(row.contains(&format!("| `{flag}` | {default} |")), "{row}");
    }
}
