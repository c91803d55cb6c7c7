//! Owns what every crate's configuration shares: parsing a crate's
//! `clap::Args` from something other than the process environment (tests,
//! embedding), and reading `.env.example`, the list of every variable, so
//! each crate can check that its variables are documented there.
//!
//! Each crate declares its variables once, in its own `clap::Args` struct
//! (`broker::config::BrokerArgs`, `handlers::HandlerArgs`,
//! `idp::config::IdpArgs`, `sdk::SdkArgs`,
//! `store::StoreArgs`, [`crate::telemetry::LogArgs`]); binaries
//! flatten the ones their components use.

use clap::{CommandFactory, FromArgMatches};

/// `T`'s command with each value named after its variable
/// (`--conn-rate <BROKER_CONN_RATE>`), so that `--help` and every refusal
/// name the variable an operator sets.
pub fn command<T: CommandFactory>() -> clap::Command {
    T::command().mut_args(|arg| match arg.get_env() {
        Some(var) => {
            let var = var.to_string_lossy().into_owned();
            arg.value_name(var)
        }
        None => arg,
    })
}

/// Parses `T` from the command line and the environment as a binary does
/// (exiting with clap's message and code 2 on a bad value), values named
/// after their variables (see [`command`]). `name` is the binary's name.
pub fn parse_args<T>(name: &'static str) -> T
where
    T: CommandFactory + FromArgMatches,
{
    let matches = command::<T>().name(name).get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Parses `T` from variables read through `get` instead of the process
/// environment (which is ignored): each argument backed by an environment
/// variable takes `get(VARIABLE)` as its value, exactly as if the variable
/// were set. Empty values count as unset, as in the environment.
pub fn parse_from_lookup<T>(
    name: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Result<T, clap::Error>
where
    T: CommandFactory + FromArgMatches,
{
    let mut argv = vec![name.to_owned()];
    let command = command::<T>().mut_args(|arg| {
        if let Some(value) = arg
            .get_env()
            .and_then(|var| get(&var.to_string_lossy()))
            .filter(|value| !value.trim().is_empty())
        {
            if let Some(long) = arg.get_long() {
                argv.push(format!("--{long}={value}"));
            }
        }
        // The real environment must not leak into the result.
        arg.env(None::<&str>)
    });
    let matches = command.try_get_matches_from(argv)?;
    T::from_arg_matches(&matches)
}

/// The variables `.env.example` documents, in order, with their value when
/// the line sets one (`NAME=value`) or `None` when it is commented out
/// (`# NAME=value`).
pub fn documented_variables(env_example: &str) -> Vec<(String, Option<String>)> {
    env_example
        .lines()
        .filter_map(|line| {
            let commented = line.starts_with("# ");
            let (name, value) = line.trim_start_matches("# ").split_once('=')?;
            let is_name = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            is_name.then(|| (name.to_owned(), (!commented).then(|| value.to_owned())))
        })
        .collect()
}

/// The environment variables a command reads, in declaration order.
pub fn variables_of(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|var| var.to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Example {
        #[arg(long, env = "SHARED_CONFIG_TEST_NUMBER", default_value_t = 7)]
        number: u32,
        #[arg(long, env = "SHARED_CONFIG_TEST_NAME")]
        name: Option<String>,
    }

    #[test]
    fn lookup_replaces_the_environment() {
        let parsed: Example = parse_from_lookup("x", |var| {
            (var == "SHARED_CONFIG_TEST_NUMBER").then(|| "9".to_owned())
        })
        .unwrap();
        assert_eq!((parsed.number, parsed.name), (9, None));
        let parsed: Example = parse_from_lookup("x", |_| Some(" ".to_owned())).unwrap();
        assert_eq!(parsed.number, 7, "blank is unset");
        let err = parse_from_lookup::<Example>("x", |var| {
            (var == "SHARED_CONFIG_TEST_NUMBER").then(|| "many".to_owned())
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("SHARED_CONFIG_TEST_NUMBER"),
            "{err}"
        );
    }

    #[test]
    fn reads_env_example_lines() {
        let vars = documented_variables("# comment\nA_B=1\n# C=\n# not a var\nlower=x\n");
        assert_eq!(
            vars,
            vec![
                ("A_B".to_owned(), Some("1".to_owned())),
                ("C".to_owned(), None)
            ]
        );
    }
}
