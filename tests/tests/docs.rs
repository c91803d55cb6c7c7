//! Documentation that must not rot: the minimal handler shown in the READMEs
//! is the compiled example, line for line.

const EXAMPLE: &str = include_str!("../../handlers/examples/echo.rs");

fn example_code() -> String {
    EXAMPLE
        .lines()
        .filter(|line| !line.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

#[test]
fn readmes_show_the_compiled_example() {
    let code = example_code();
    assert!(code.contains("Worker::new(\"echo\")"), "{code}");
    for (name, readme) in [
        ("README.md", include_str!("../../README.md")),
        (
            "handlers/README.md",
            include_str!("../../handlers/README.md"),
        ),
    ] {
        assert!(
            readme.contains(&code),
            "{name} must show handlers/examples/echo.rs exactly (without its //! lines)"
        );
    }
}

/// Every component's arguments in one command: clap refuses (in debug
/// builds) two arguments with one name or one flag, so this also proves that
/// no two crates declare the same variable.
#[derive(clap::Parser)]
struct Everything {
    #[command(flatten)]
    broker: broker::config::BrokerArgs,
    #[command(flatten)]
    store: store::StoreArgs,
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
    #[command(flatten)]
    sdk: sdk::SdkArgs,
    #[command(flatten)]
    handlers: handlers::HandlerArgs,
    #[command(flatten)]
    idp: idp::config::IdpArgs,
    #[command(flatten)]
    log: setup::telemetry::LogArgs,
}

/// `.env.example` is the list of every variable: each one that a crate
/// declares is there exactly once, each one there is declared by exactly one
/// crate's arguments (the per-platform `PLATFORM_<NAME>_*` variables, whose
/// names depend on `PLATFORMS`, are read by `handlers::settings` alone), and
/// the values it sets are accepted together.
#[test]
fn env_example_lists_each_declared_variable_once() {
    use clap::CommandFactory;
    const ENV_EXAMPLE: &str = include_str!("../../.env.example");
    let documented = setup::config::documented_variables(ENV_EXAMPLE);
    let owners: Vec<(&str, Vec<String>)> = vec![
        (
            "broker",
            setup::config::variables_of(&broker::config::BrokerOnly::command()),
        ),
        ("store", of::<store::StoreArgs>()),
        ("cluster", of::<cluster::ClusterArgs>()),
        ("sdk", of::<sdk::SdkArgs>()),
        ("handlers", of::<handlers::HandlerArgs>()),
        ("idp", of::<idp::config::IdpArgs>()),
        ("log", of::<setup::telemetry::LogArgs>()),
    ];
    let declared: Vec<&String> = owners.iter().flat_map(|(_, vars)| vars).collect();
    let everything = setup::config::variables_of(&Everything::command());
    assert_eq!(everything.len(), declared.len());
    for var in &declared {
        let times = documented.iter().filter(|(n, _)| n == *var).count();
        assert_eq!(times, 1, "{var} is in .env.example {times} times");
        let crates: Vec<&str> = owners
            .iter()
            .filter(|(_, vars)| vars.contains(var))
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(crates.len(), 1, "{var} is declared by {crates:?}");
    }
    for (name, _) in &documented {
        let per_platform = name.starts_with("PLATFORM_")
            && (name.ends_with("_HEADERS") || name.ends_with("_TOKEN"));
        assert!(
            per_platform || declared.contains(&name),
            "{name} is in .env.example but no crate declares it"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let all: Everything = setup::config::parse_from_lookup("all", |var| {
        if var == "BROKER_DEV_DIR" {
            return Some(dir.path().display().to_string());
        }
        documented
            .iter()
            .find(|(n, _)| n == var)
            .and_then(|(_, value)| value.clone())
    })
    .expect("documented values parse");
    all.broker.resolve().expect("broker values validate");
    all.idp
        .resolve(&all.store)
        .expect("identity values validate");
    handlers::Settings::compose(all.handlers, all.sdk, all.store, |_| None)
        .expect("handler values validate");
}

fn of<T: clap::Args>() -> Vec<String> {
    setup::config::variables_of(&T::augment_args(clap::Command::new("x")))
}
