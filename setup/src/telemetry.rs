//! Owns logging for every binary: the `RUST_LOG` filter and `LOG_FORMAT`
//! ([`LogArgs`]) and the one [`init_tracing`]. Colour codes are written only
//! to a terminal: in a log file they would split fields (`code=` would read
//! `\x1b[3mcode\x1b[0m\x1b[2m=`), and `grep code=` would find nothing.

use std::io::IsTerminal;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The default filter: the router (mqtt_router) logs every subscription at info, so it is
/// kept to warnings.
pub const DEFAULT_FILTER: &str = "info,mqtt_router=warn";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (`key=value` fields).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging configuration, flattened into every binary's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// tracing filter (e.g. `info,broker=debug`).
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = DEFAULT_FILTER)]
    pub log_filter: String,
    /// `text` or `json` log lines.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Default for LogArgs {
    fn default() -> Self {
        LogArgs {
            log_filter: DEFAULT_FILTER.to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RUST_LOG is not a valid filter ({0}): use e.g. `info` or `info,broker=debug`")]
    Filter(String),
}

/// The subscriber for `args` writing to `writer`, with colour codes only
/// when `ansi` (the writer is a terminal).
pub fn subscriber<W>(
    args: &LogArgs,
    writer: W,
    ansi: bool,
) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_new(&args.log_filter).map_err(|e| LogError::Filter(e.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    Ok(match args.log_format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    })
}

/// Logs to stderr, structured, filtered by `RUST_LOG`; colours only when
/// stderr is a terminal. A second call keeps the first subscriber.
pub fn init_tracing(args: &LogArgs) -> Result<(), LogError> {
    let ansi = std::io::stderr().is_terminal();
    let subscriber = subscriber(args, std::io::stderr, ansi)?;
    // Already set (a test harness, a second component in one process): keep it.
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;
    use std::sync::{Arc, Mutex};

    /// Writes into a file that is not a terminal, exactly as the binaries
    /// choose colours for stderr.
    fn log_to_file(ansi_override: Option<bool>) -> String {
        let file = tempfile::tempfile().unwrap();
        let ansi = ansi_override.unwrap_or_else(|| file.is_terminal());
        let shared = Arc::new(Mutex::new(file.try_clone().unwrap()));
        let writer = move || FileWriter(Arc::clone(&shared));
        let text = subscriber(&LogArgs::default(), writer, ansi).unwrap();
        tracing::subscriber::with_default(text, || {
            tracing::info!(code = 135, reason = "not authorized", "refused");
        });
        let mut file = file;
        file.rewind().unwrap();
        std::io::read_to_string(file).unwrap()
    }

    struct FileWriter(Arc<Mutex<std::fs::File>>);

    impl std::io::Write for FileWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().flush()
        }
    }

    #[test]
    fn a_file_gets_no_colour_codes_and_greppable_fields() {
        let text = log_to_file(None);
        assert!(!text.contains("\x1b["), "{text:?}");
        assert!(text.contains("code=135"), "{text:?}");
        // The check above means something: with colours, fields are split.
        let coloured = log_to_file(Some(true));
        assert!(coloured.contains("\x1b["), "{coloured:?}");
        assert!(!coloured.contains("code=135"), "{coloured:?}");
    }

    #[test]
    fn json_lines_and_bad_filters() {
        let args = LogArgs {
            log_format: LogFormat::Json,
            ..LogArgs::default()
        };
        let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&buffer);
        let writer = move || VecWriter(Arc::clone(&sink));
        let json = subscriber(&args, writer, false).unwrap();
        tracing::subscriber::with_default(json, || tracing::warn!(code = 7, "x"));
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["fields"]["code"], 7);

        let bad = LogArgs {
            log_filter: "info,=[".to_owned(),
            ..LogArgs::default()
        };
        let err = subscriber(&bad, std::io::sink, false).err().unwrap();
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
    }

    struct VecWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for VecWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
