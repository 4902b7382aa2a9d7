//! The README is the operator's manual: it must name every option the
//! binary has, and every variable it names must exist.

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
