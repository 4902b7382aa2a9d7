//! The command line: which subcommand, `--help` and `--version`, and which
//! arguments are the options' flags. The library reads only the options
//! (variables and flags); what any other word on the command line means is
//! the binary's business, so it is decided here.

use std::ffi::OsString;
use std::fmt;

use kubevirt_vnc_proxy::Config;
use kubevirt_vnc_proxy::config::{self, did_you_mean, is_option_flag, is_option_variable};
use kubevirt_vnc_proxy::events::LogFormat;

/// The subcommands. They may stand anywhere among the flags.
const SUBCOMMANDS: &[&str] = &["token", "check-config"];

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Run the proxy.
    Serve,
    /// `check-config`: every start-up check, without listening.
    CheckConfig,
    /// `token`: mint a token (it reads its own arguments).
    Token,
    /// `-h`, `--help`.
    Help,
    /// `-V`, `--version`.
    Version,
}

/// The command line, sorted.
#[derive(Debug)]
pub struct Cli {
    pub command: Command,
    /// For [`Command::Serve`] and [`Command::CheckConfig`] the options'
    /// flags with their values, in their order; for [`Command::Token`] every
    /// argument but the subcommand.
    pub args: Vec<String>,
    /// The words that are neither a flag, a flag's value nor the subcommand.
    pub errors: Vec<ArgError>,
    /// Where the subcommand stood (from 0), so that a subcommand reading
    /// its own arguments can name one by its place on the command line.
    pub subcommand_at: Option<usize>,
}

/// A word on the command line that means nothing here. Printed as a
/// configuration error is, since it stops the start the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    /// The word when it is a near miss of a subcommand (which is no
    /// secret), otherwise where it stands.
    what: String,
    message: String,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration error: {}: {}", self.what, self.message)
    }
}

/// Sort the arguments (without the program name). A flag without `=` takes
/// the next argument as its value as the library reads it: an option's flag
/// whatever follows, an unknown flag only a word that does not start with
/// `-`. `--help` and `--version` anywhere (not as a value) win over any
/// mistake, except after `token`, which has its own.
pub fn parse(argv: Vec<String>) -> Cli {
    let mut subcommand = None;
    let mut asked = None;
    let mut flags = Vec::new();
    let mut words = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let arg = argv[i].as_str();
        match arg {
            "-h" | "--help" => {
                asked.get_or_insert(Command::Help);
            }
            "-V" | "--version" => {
                asked.get_or_insert(Command::Version);
            }
            _ if arg.starts_with('-') => {
                flags.push(i);
                let takes_next = !arg.contains('=')
                    && argv
                        .get(i + 1)
                        .is_some_and(|next| is_option_flag(arg) || !next.starts_with('-'));
                if takes_next {
                    i += 1;
                    flags.push(i);
                }
            }
            _ if subcommand.is_none() && SUBCOMMANDS.contains(&arg) => subcommand = Some(i),
            _ => words.push(i),
        }
        i += 1;
    }
    let command = match subcommand.map(|i| argv[i].as_str()) {
        Some("token") => {
            let args = argv
                .into_iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != subcommand)
                .map(|(_, a)| a)
                .collect();
            return Cli {
                command: Command::Token,
                args,
                errors: Vec::new(),
                subcommand_at: subcommand,
            };
        }
        Some(_) => Command::CheckConfig,
        None => Command::Serve,
    };
    if let Some(command) = asked {
        return Cli {
            command,
            args: Vec::new(),
            errors: Vec::new(),
            subcommand_at: subcommand,
        };
    }
    Cli {
        command,
        errors: words.iter().map(|&i| unexpected(i, &argv[i])).collect(),
        args: flags.into_iter().map(|i| argv[i].clone()).collect(),
        subcommand_at: subcommand,
    }
}

/// A word at `index` (from 0) that is no flag, value or subcommand. Its
/// text is shown only when it is a near miss of a subcommand: anything
/// else may be a secret pasted in the wrong place, and this line goes to
/// the terminal, a log, or a CI transcript.
fn unexpected(index: usize, word: &str) -> ArgError {
    match did_you_mean(word, SUBCOMMANDS.iter().copied()) {
        Some(meant) => ArgError {
            what: word.to_owned(),
            message: format!("unknown argument; did you mean {meant}? (see --help)"),
        },
        None => ArgError {
            what: "command line".to_owned(),
            message: format!(
                "unexpected argument {} (not shown: it may be a secret; see --help)",
                index + 1
            ),
        },
    }
}

/// A start that cannot go ahead: one line per problem, the command line's
/// first, and the log format to write them in.
pub struct Failure {
    pub lines: Vec<String>,
    pub log_format: LogFormat,
}

/// The command line as text, or the line that says which argument is not
/// (by its place only: it may be a secret). `std::env::args` panicked on
/// such an argument and printed it.
pub fn arguments(argv: impl IntoIterator<Item = OsString>) -> Result<Vec<String>, String> {
    argv.into_iter()
        .enumerate()
        .map(|(i, a)| {
            a.into_string().map_err(|_| {
                format!(
                    "configuration error: command line: argument {} is not valid UTF-8 (not shown: it may be a secret)",
                    i + 1
                )
            })
        })
        .collect()
}

/// The environment as text. A value that is not UTF-8 is left out; when
/// the variable is an option's, its name is returned so that the start
/// fails naming it (never showing the value: it may be a secret).
/// `std::env::vars` panicked on such a value and printed it.
pub fn environment(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut env = Vec::new();
    let mut unreadable = Vec::new();
    for (k, v) in vars {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => env.push((k, v)),
            Err(_) if is_option_variable(&k) => unreadable.push(k),
            Err(_) => {}
        }
    }
    (env, unreadable)
}

/// The configuration from the environment and the sorted command line,
/// with every problem of both. `unreadable` names the options' variables
/// whose value is not UTF-8 (see [`environment`]).
pub fn configure(
    env: Vec<(String, String)>,
    unreadable: &[String],
    cli: Cli,
) -> Result<Config, Failure> {
    let mut lines: Vec<String> = cli.errors.iter().map(ToString::to_string).collect();
    lines.extend(unreadable.iter().map(|var| {
        format!("configuration error: {var}: not valid UTF-8 (not shown: it may be a secret)")
    }));
    match Config::from_sources_all(env, cli.args) {
        Ok(c) if lines.is_empty() => Ok(c),
        Ok(c) => Err(Failure {
            lines,
            log_format: c.log_format,
        }),
        Err(e) => {
            // A variable left out for not being text is not also missing.
            lines.extend(
                e.errors
                    .iter()
                    .filter(|e| !unreadable.contains(&e.var))
                    .map(ToString::to_string),
            );
            Err(Failure {
                lines,
                log_format: e.log_format,
            })
        }
    }
}

/// The `--help` text: usage and subcommands around the library's option
/// table.
pub fn help() -> String {
    format!(
        "kubevirt-vnc-proxy: WebSocket proxy from noVNC to KubeVirt VNC, guarded by JWT\n\n\
         USAGE: kubevirt-vnc-proxy [check-config] [OPTIONS]   run the proxy, or only check its configuration\n\
         \x20      kubevirt-vnc-proxy token [TOKEN OPTIONS]      mint a token (see token --help)\n\
         A subcommand may stand anywhere among the options.\n\n\
         {}\
         \x20 -h, --help      print this help\n\
         \x20 -V, --version   print the version\n\
         \n\
         SUBCOMMANDS:\n\
         \x20 token          mint a LabOrchestrator-compatible token from SECRET_KEY (see token --help)\n\
         \x20 check-config   validate the configuration and credential files; exit 0 or 2\n",
        config::help_text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sort(args: &[&str]) -> (Command, String, Vec<String>) {
        let cli = parse(args.iter().map(|s| s.to_string()).collect());
        let errors = cli.errors.iter().map(ToString::to_string).collect();
        (cli.command, cli.args.join(" "), errors)
    }

    #[test]
    fn a_subcommand_may_stand_anywhere() {
        use Command::{CheckConfig, Serve, Token};
        let ok = |c: Command, rest: &str| (c, rest.to_owned(), Vec::<String>::new());
        assert_eq!(
            sort(&["check-config", "--port", "5002"]),
            ok(CheckConfig, "--port 5002")
        );
        assert_eq!(
            sort(&["--port", "5002", "check-config"]),
            ok(CheckConfig, "--port 5002")
        );
        assert_eq!(
            sort(&["--port=5002", "check-config", "--host", "h"]),
            ok(CheckConfig, "--port=5002 --host h")
        );
        assert_eq!(
            sort(&["--secret-key", "k", "token", "--vmi", "a"]),
            ok(Token, "--secret-key k --vmi a")
        );
        // A flag's value is never a subcommand; after token, a second one
        // is token's business.
        assert_eq!(
            sort(&["--api-path", "token"]),
            ok(Serve, "--api-path token")
        );
        assert_eq!(
            sort(&["token", "--vmi", "check-config", "check-config"]),
            ok(Token, "--vmi check-config check-config")
        );
        // token reads its own --help.
        assert_eq!(sort(&["token", "--help"]), ok(Token, "--help"));
        // An option's flag takes the next argument whatever it is; an
        // unknown one only a word, as the library reads them.
        assert_eq!(
            sort(&[
                "--secret-key",
                "-starts-with-a-dash",
                "--bogus",
                "--port",
                "1"
            ]),
            ok(Serve, "--secret-key -starts-with-a-dash --bogus --port 1")
        );
    }

    #[test]
    fn help_and_version_win_over_any_mistake() {
        assert_eq!(sort(&["--bogus", "x", "stray", "-h"]).0, Command::Help);
        assert_eq!(
            sort(&["--help", "check-config", "--version"]).0,
            Command::Help
        );
        assert_eq!(sort(&["check-config", "-V"]).0, Command::Version);
        // Not as a flag's value.
        assert_eq!(sort(&["--api-path", "--help"]).0, Command::Serve);
    }

    #[test]
    fn a_stray_word_is_named_by_its_position_unless_it_is_a_near_miss() {
        let (command, args, errors) = sort(&[
            "--port",
            "5002",
            "hunter2-but-longer",
            "chek-config",
            "--host",
            "h",
        ]);
        assert_eq!(
            (command, args.as_str()),
            (Command::Serve, "--port 5002 --host h")
        );
        assert_eq!(
            errors,
            [
                "configuration error: command line: unexpected argument 3 (not shown: it may be a secret; see --help)",
                "configuration error: chek-config: unknown argument; did you mean check-config? (see --help)",
            ]
        );
    }

    #[test]
    fn the_usage_line_shows_where_subcommands_go() {
        let help = help();
        let usage = help.lines().find(|l| l.starts_with("USAGE:")).unwrap();
        assert!(usage.contains("[check-config] [OPTIONS]"), "{usage}");
        assert!(help.contains("kubevirt-vnc-proxy token"), "{help}");
        assert!(help.contains("anywhere among the options"), "{help}");
        assert!(help.contains("  --port <value>   [env PORT]"), "{help}");
    }
}
