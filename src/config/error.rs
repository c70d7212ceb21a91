//! Config errors: each one says what is wrong and how to fix it on the command line.

use std::path::PathBuf;

/// Anything that goes wrong while composing or reading the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A config file (or an override value) is not valid YAML.
    #[error("cannot parse {what}: {msg}")]
    Parse {
        /// Which file or value.
        what: String,
        /// The parser's message.
        msg: String,
    },
    /// The primary config (`--config-name`) was not found.
    #[error("cannot find primary config '{name}' in the config search path: {searched}")]
    NoPrimaryConfig {
        /// The name asked for.
        name: String,
        /// The directories searched, `:`-separated.
        searched: String,
    },
    /// `group=option` names an option that has no file in the group.
    #[error("In '{parent}': could not find '{group}/{option}'\nAvailable options in '{group}':\n{}",
        choices.iter().map(|c| format!("\t{c}")).collect::<Vec<_>>().join("\n"))]
    UnknownOption {
        /// The group (`method`, `modelpool`, ...).
        group: String,
        /// The option asked for.
        option: String,
        /// The config whose defaults list (or the command line) asked for it.
        parent: String,
        /// The options that exist.
        choices: Vec<String>,
    },
    /// A `???` value was used without being set.
    #[error("Missing mandatory value: {key}. Set it on the command line with `{key}=VALUE`")]
    MissingValue {
        /// The full key path.
        key: String,
    },
    /// A command-line word that is not a valid override.
    #[error("cannot parse the override '{arg}': {msg}")]
    BadOverride {
        /// The word as given.
        arg: String,
        /// What is wrong.
        msg: String,
    },
    /// `key=value` for a key that is not in the config.
    #[error("Could not override '{key}'.\nTo append to your config use +{arg}\nKey '{key}' is not in the config{hint}")]
    NoSuchKey {
        /// The key path.
        key: String,
        /// The override as given (without a leading `+`).
        arg: String,
        /// An extra hint (", did you mean ...?"), or empty.
        hint: String,
    },
    /// `+key=value` for a key that exists.
    #[error(
        "Could not append to config. An item is already at '{key}'. Use {key}=... to change it"
    )]
    KeyExists {
        /// The key path.
        key: String,
    },
    /// `group=option` for a group that is not in the defaults list.
    #[error("Could not override '{group}'. No match in the defaults list.\nTo append to your default list use +{group}={option}")]
    GroupNotInDefaults {
        /// The group.
        group: String,
        /// The option.
        option: String,
    },
    /// A `${...}` that cannot be resolved.
    #[error("cannot resolve interpolation '{expr}' at '{key}': {msg}")]
    Interpolation {
        /// The key whose value holds the interpolation.
        key: String,
        /// The interpolation text.
        expr: String,
        /// What went wrong.
        msg: String,
    },
    /// A value has the wrong type or an invalid value.
    #[error("invalid value at '{key}': {msg}")]
    Invalid {
        /// The full key path.
        key: String,
        /// What is wrong and what is expected.
        msg: String,
    },
    /// Something FusionBench's CLI accepts that this implementation does not.
    #[error("{0}")]
    Unsupported(String),
}

impl ConfigError {
    /// A `???` at `key`.
    pub fn missing(key: &str) -> Self {
        ConfigError::MissingValue { key: key.to_string() }
    }
    /// An invalid value at `key`.
    pub fn invalid(key: &str, msg: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.to_string(), msg: msg.into() }
    }
}
