//! `--config FILE` for the daemons (`serve`, `protect`): every flag can come from a TOML file,
//! one key per flag with the flag's long name (`recovery-points = 24`, `allow = ["a.crt"]`,
//! `metrics = "127.0.0.1:9100"`, a switch as `true`). The file's values go before the command
//! line's, so a flag given on the command line wins (for a repeatable flag, the command line's
//! occurrences replace the file's). An unknown key is refused with its name.

use clap::CommandFactory;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

/// The commands that take `--config`.
const COMMANDS: [&str; 2] = ["serve", "protect"];

/// The command line with the config file's flags put in, or the command line as it was when
/// there is no `--config`. Errors name the file and the key.
pub fn expand<C: CommandFactory>(arguments: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(command) = arguments.get(1).and_then(|word| word.to_str()) else {
        return Ok(arguments);
    };
    if !COMMANDS.contains(&command) {
        return Ok(arguments);
    }
    let rest = &arguments[2..];
    let Some(path) = config_path(rest) else {
        return Ok(arguments);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|error| format!("--config {}: {error}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|error| format!("--config {}: {error}", path.display()))?;
    let subcommand = C::command()
        .find_subcommand(command)
        .cloned()
        .ok_or_else(|| format!("no command {command}"))?;
    let known: BTreeSet<String> = subcommand
        .get_arguments()
        .filter_map(|argument| argument.get_long().map(str::to_owned))
        .filter(|long| long != "config" && long != "help")
        .collect();
    let given: BTreeSet<String> = rest
        .iter()
        .filter_map(|word| word.to_str()?.strip_prefix("--"))
        .map(|flag| flag.split('=').next().unwrap_or(flag).to_owned())
        .collect();
    let mut from_file: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) {
            return Err(format!(
                "--config {}: unknown key {key:?} for `blockrep {command}` (known: {})",
                path.display(),
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if given.contains(&flag) {
            continue; // The command line says otherwise.
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for value in values {
            let text = match value {
                toml::Value::Boolean(true) => {
                    from_file.push(format!("--{flag}").into());
                    continue;
                }
                toml::Value::Boolean(false) => continue,
                toml::Value::String(text) => text.clone(),
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Float(number) => number.to_string(),
                other => {
                    return Err(format!(
                        "--config {}: {key} = {other} is not a string, number, switch or list of them",
                        path.display()
                    ));
                }
            };
            from_file.push(format!("--{flag}").into());
            from_file.push(text.into());
        }
    }
    let mut expanded = arguments[..2].to_vec();
    expanded.extend(from_file);
    expanded.extend(rest.iter().cloned());
    Ok(expanded)
}

/// The file `--config FILE` or `--config=FILE` names.
fn config_path(arguments: &[OsString]) -> Option<PathBuf> {
    let mut words = arguments.iter();
    while let Some(word) = words.next() {
        let word = word.to_str()?;
        if word == "--config" {
            return words.next().map(PathBuf::from);
        }
        if let Some(path) = word.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}
