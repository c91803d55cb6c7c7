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
