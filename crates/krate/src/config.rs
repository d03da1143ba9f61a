//! Configuration files for `krate server` and `krate agent` (the seeds: configuration in
//! files rather than flags). `/etc/krate/config.yaml`, then `/etc/krate/config.yaml.d/
//! *.yaml` in name order, each a YAML mapping whose keys are the command's flags without
//! the dashes (`port: 7443`, `tls-san: [a.example, b.example]`, `disable-agent: true`).
//! A later file's key replaces an earlier file's; a flag given on the command line (or
//! through its `KRATE_*` environment variable) replaces the files' value. `--config FILE`
//! or `KRATE_CONFIG_FILE` names another file (its `FILE.d/` is read too).
//!
//! The files become flags placed before the command line's, so clap validates their
//! values exactly as it does typed ones and `--help` documents every key. Unknown keys
//! are refused, naming the file and the closest flag. `--print-config` shows the
//! effective configuration with where each value came from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Arg, ArgAction, ArgMatches, Command};

pub const DEFAULT_CONFIG: &str = "/etc/krate/config.yaml";

/// The subcommands that read configuration files.
const CONFIGURED: &[&str] = &["server", "agent"];

/// Flags that are about the configuration itself, not keys of it.
const NOT_KEYS: &[&str] = &["config", "print-config", "help"];

/// `--config` and `--print-config`, flattened into each configured command so that
/// `--help` shows them (what they do happens in [`expand`] and [`print`]).
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// The configuration file: a YAML mapping of this command's flags without the
    /// dashes (`port: 7443`); FILE.d/*.yaml beside it is read after it. Flags on the
    /// command line take precedence.
    #[arg(long, value_name = "FILE", env = "KRATE_CONFIG_FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Print the effective configuration (every key, its value and where it came
    /// from) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Where the value of each key set by a file came from.
pub type Origins = BTreeMap<String, PathBuf>;

/// The command line with the configuration files' flags inserted after the subcommand,
/// and which keys came from which file.
pub fn expand(args: Vec<OsString>, cli: &Command) -> anyhow::Result<(Vec<OsString>, Origins)> {
    let name = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    let Some(sub) = CONFIGURED.contains(&name).then(|| cli.find_subcommand(name)).flatten() else {
        return Ok((args, Origins::new()));
    };
    let given: Vec<String> = args[2..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let files = config_files(&given)?;
    let mut keys: BTreeMap<String, (serde_yaml::Value, PathBuf)> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        if text.trim().is_empty() {
            continue;
        }
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not valid YAML; fix it or move it away", file.display()))?;
        let serde_yaml::Value::Mapping(map) = doc else {
            bail!("{} must be a mapping of flag names to values (e.g. `port: 7443`)", file.display());
        };
        for (key, value) in map {
            let Some(key) = key.as_str().map(str::to_string) else {
                bail!("{}: every key must be a flag name, found {key:?}", file.display());
            };
            keys.insert(key, (value, file.clone()));
        }
    }
    let mut flags = Vec::new();
    let mut origins = Origins::new();
    for (key, (value, file)) in keys {
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_KEYS.contains(&key.as_str()))
            .ok_or_else(|| unknown_key(sub, &key, &file))?;
        if set_elsewhere(arg, &given) {
            continue;
        }
        flags.extend(flags_for(arg, &key, &value).with_context(|| format!("{}: key {key:?}", file.display()))?);
        origins.insert(arg.get_id().to_string(), file);
    }
    let mut expanded = args[..2].to_vec();
    expanded.extend(flags.into_iter().map(OsString::from));
    expanded.extend(args[2..].iter().cloned());
    Ok((expanded, origins))
}

/// The files to read: `--config` / `KRATE_CONFIG_FILE` (which must exist) or the
/// default (if it exists), then the `.d` directory beside it.
fn config_files(given: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let named = given
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--config") {
            Some("") => given.get(i + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(str::to_string),
            None => None,
        })
        .or_else(|| std::env::var("KRATE_CONFIG_FILE").ok().filter(|v| !v.is_empty()));
    let main = match &named {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("configuration file {} does not exist", path.display());
            }
            path
        }
        None => PathBuf::from(DEFAULT_CONFIG),
    };
    let mut files = Vec::new();
    if main.is_file() {
        files.push(main.clone());
    }
    let dir = PathBuf::from(format!("{}.d", main.display()));
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    Ok(files)
}

/// Whether the command line or the flag's environment variable sets it already.
fn set_elsewhere(arg: &Arg, given: &[String]) -> bool {
    let long = format!("--{}", arg.get_long().unwrap_or_default());
    let on_command_line = given.iter().any(|a| *a == long || a.starts_with(&format!("{long}=")))
        || arg.get_short().is_some_and(|s| given.iter().any(|a| a.starts_with(&format!("-{s}"))));
    let in_environment = arg.get_env().is_some_and(|env| std::env::var_os(env).is_some_and(|v| !v.is_empty()));
    on_command_line || in_environment
}

/// The flags that say what `value` says for `arg`.
fn flags_for(arg: &Arg, key: &str, value: &serde_yaml::Value) -> anyhow::Result<Vec<String>> {
    use serde_yaml::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => bail!("expected a single value, found {}", kind_of(other)),
    };
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, Value::Bool(true)) => Ok(vec![format!("--{key}")]),
        (ArgAction::SetTrue, Value::Bool(false)) => Ok(vec![]),
        (ArgAction::SetTrue, other) => bail!("expected true or false, found {}", kind_of(other)),
        (ArgAction::Append, Value::Sequence(items)) => {
            items.iter().map(|item| Ok(format!("--{key}={}", scalar(item)?))).collect()
        }
        (_, Value::Sequence(_)) if arg.get_value_delimiter().is_some() => {
            let Value::Sequence(items) = value else { unreachable!() };
            let joined: Vec<String> = items.iter().map(scalar).collect::<anyhow::Result<_>>()?;
            Ok(vec![format!("--{key}={}", joined.join(","))])
        }
        (_, value) => Ok(vec![format!("--{key}={}", scalar(value)?)]),
    }
}

fn kind_of(value: &serde_yaml::Value) -> &'static str {
    use serde_yaml::Value;
    match value {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn unknown_key(sub: &Command, key: &str, file: &Path) -> anyhow::Error {
    let closest = sub
        .get_arguments()
        .filter_map(Arg::get_long)
        .filter(|long| !NOT_KEYS.contains(long))
        .min_by_key(|long| distance(key, long));
    let hint = closest.filter(|c| distance(key, c) <= 3).map(|c| format!(" (did you mean {c:?}?)")).unwrap_or_default();
    anyhow::anyhow!(
        "{}: unknown key {key:?}{hint}; the keys are the flags of `krate {}` without the dashes (see `krate {} --help`)",
        file.display(),
        sub.get_name(),
        sub.get_name()
    )
}

/// Levenshtein distance, for suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// `--print-config`: every key of `sub` with its effective value and its source.
pub fn print(sub: &Command, matches: &ArgMatches, origins: &Origins) -> String {
    use clap::parser::ValueSource;
    let mut out = format!(
        "# krate {}: effective configuration (command line > environment > {DEFAULT_CONFIG} and config.yaml.d > defaults)\n",
        sub.get_name()
    );
    for arg in sub.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        if NOT_KEYS.contains(&long) {
            continue;
        }
        let values: Vec<String> =
            matches.get_raw(id).map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect()).unwrap_or_default();
        let source = match (origins.get(id), matches.value_source(id)) {
            (Some(file), _) => file.display().to_string(),
            (None, Some(ValueSource::CommandLine)) => "command line".to_string(),
            (None, Some(ValueSource::EnvVariable)) => "environment".to_string(),
            (None, Some(ValueSource::DefaultValue)) => "default".to_string(),
            _ => "unset".to_string(),
        };
        let value = match (arg.get_action(), values.as_slice()) {
            (ArgAction::Append, _) => {
                format!("[{}]", values.iter().map(|v| yaml_scalar(v)).collect::<Vec<_>>().join(", "))
            }
            (_, []) => {
                out.push_str(&format!("# {long}:  (unset)\n"));
                continue;
            }
            (_, [one]) => yaml_scalar(one),
            (_, many) => yaml_scalar(&many.join(",")),
        };
        out.push_str(&format!("{long}: {value}  # {source}\n"));
    }
    out
}

/// A flag's text as a file would hold it: numbers and booleans bare, strings quoted
/// only where YAML needs it.
fn yaml_scalar(text: &str) -> String {
    let value = match text {
        "true" => serde_yaml::Value::from(true),
        "false" => serde_yaml::Value::from(false),
        _ => text.parse::<u64>().map(serde_yaml::Value::from).unwrap_or_else(|_| text.into()),
    };
    serde_yaml::to_string(&value).unwrap_or_default().trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn expand_with(files: &[(&str, &str)], command_line: &[&str]) -> anyhow::Result<(Vec<String>, Origins)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config.yaml.d")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let config = dir.path().join("config.yaml");
        let mut args: Vec<OsString> = ["krate", "server", "--config"].iter().map(OsString::from).collect();
        args.push(config.into_os_string());
        args.extend(command_line.iter().map(OsString::from));
        let (expanded, origins) = expand(args, &crate::Cli::command())?;
        let expanded = expanded.iter().skip(2).map(|a| a.to_string_lossy().into_owned());
        Ok((expanded.filter(|a| !a.contains("config")).collect(), origins))
    }

    #[test]
    fn keys_become_flags_before_the_command_line() {
        let (args, origins) = expand_with(
            &[(
                "config.yaml",
                "port: 7443\ntls-san: [a.example, b.example]\ndisable-agent: true\ndisable-controllers: false\n",
            )],
            &["--bind-address", "0.0.0.0"],
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--disable-agent",
                "--port=7443",
                "--tls-san=a.example",
                "--tls-san=b.example",
                "--bind-address",
                "0.0.0.0"
            ]
        );
        assert_eq!(origins.keys().collect::<Vec<_>>(), ["disable_agent", "disable_controllers", "port", "tls_san"]);
    }

    #[test]
    fn later_files_and_the_command_line_win() {
        let (args, _) = expand_with(
            &[
                ("config.yaml", "port: 7443\nservice-cidr: 10.1.0.0/16\n"),
                ("config.yaml.d/10-port.yaml", "port: 8443\n"),
                ("config.yaml.d/20-ignored.txt", "bogus: 1\n"),
            ],
            &["--service-cidr=10.2.0.0/16"],
        )
        .unwrap();
        assert_eq!(args, ["--port=8443", "--service-cidr=10.2.0.0/16"]);
    }

    #[test]
    fn unknown_keys_and_wrong_shapes_are_refused_with_the_file() {
        let err = expand_with(&[("config.yaml", "prot: 7443\n")], &[]).unwrap_err().to_string();
        assert!(err.contains("config.yaml: unknown key \"prot\" (did you mean \"port\"?)"), "{err}");
        let err = expand_with(&[("config.yaml", "disable-agent: yes please\n")], &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("key \"disable-agent\": expected true or false, found a string"),
            "{err:#}"
        );
        let err = expand_with(&[("config.yaml", "port: [1, 2]\n")], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("expected a single value, found a list"), "{err:#}");
        let err = expand_with(&[("config.yaml", "- port\n")], &[]).unwrap_err().to_string();
        assert!(err.contains("must be a mapping of flag names"), "{err}");
        let err = expand_with(&[("config.yaml", "config: other.yaml\n")], &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key \"config\""), "{err}");
    }

    #[test]
    fn a_named_file_that_does_not_exist_is_an_error() {
        let args = ["krate", "server", "--config=/nonexistent/krate.yaml"].map(OsString::from).to_vec();
        let err = expand(args, &crate::Cli::command()).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/krate.yaml does not exist"), "{err}");
    }

    #[test]
    fn other_commands_are_left_alone() {
        let args = ["krate", "version", "--config=/nonexistent"].map(OsString::from).to_vec();
        assert_eq!(expand(args.clone(), &crate::Cli::command()).unwrap().0, args);
    }
}
